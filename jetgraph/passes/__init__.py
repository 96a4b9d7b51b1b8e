"""Passes: pure functions over captured graphs, the residual IR and expansions."""

from jetgraph.passes.expand import (
    Expansion,
    ExpansionValues,
    Term,
    expand,
    expand_stream,
    source_terms,
    stream_term,
)
from jetgraph.passes.lift import lift
from jetgraph.passes.paths import (
    PathExpansion,
    PathSpec,
    closed_form,
    count_paths,
    expand_paths,
    nested_paths,
    split_term_counts,
)

__all__ = [
    "Expansion",
    "ExpansionValues",
    "PathExpansion",
    "PathSpec",
    "Term",
    "closed_form",
    "count_paths",
    "expand",
    "expand_paths",
    "expand_stream",
    "lift",
    "nested_paths",
    "source_terms",
    "split_term_counts",
    "stream_term",
]
