"""Passes: pure functions over captured graphs, the residual IR and expansions."""

from jetgraph.passes.expand import Expansion, ExpansionValues, Term, expand, source_terms, stream_term
from jetgraph.passes.lift import lift

__all__ = ["Expansion", "ExpansionValues", "Term", "expand", "lift", "source_terms", "stream_term"]
