"""Passes: the expansion IR and the rewrites over it.

- :mod:`.terms`: the IR's nodes (:class:`Term`) and the one walk over them;
- :mod:`.expansion`: the IR's graph (:class:`Expansion`: terms, nodes in topological order,
  evaluation, export);
- :mod:`.evaluate`: what a term computes (shared with the batched codegen) and the reference
  evaluator;
- :mod:`.rewrite`: Algorithm 1, a unit rewritten into its jet expansion around centres;
- :mod:`.fit`: fitted softmax weights over centres;
- :mod:`.paths`: Algorithm 2, input→output paths enumerated lazily, and path counts;
- :mod:`.pathspec`: the path language (one parser, one printer);
- :mod:`.metrics`: how well approximate logits agree with the model's;
- :mod:`.positions`: a unit's graph run at the last position, its earlier positions once per
  group of contexts that share them (pair tables).
"""

from jetgraph.passes.evaluate import RunInputs, evaluate_terms
from jetgraph.passes.expansion import Expansion, ExpansionValues
from jetgraph.passes.metrics import METRICS, logit_agreement
from jetgraph.passes.paths import (
    PathExpansion,
    closed_form,
    context_length,
    context_tokens,
    count_paths,
    expand_paths,
    nested_paths,
    path_term,
    split_term_counts,
    starts_at_model_state,
)
from jetgraph.passes.pathspec import PathSpec, format_path, parse_path
from jetgraph.passes.rewrite import expand, expand_stream
from jetgraph.passes.terms import Term, source_terms, stream_term

__all__ = [
    "METRICS",
    "Expansion",
    "ExpansionValues",
    "PathExpansion",
    "PathSpec",
    "RunInputs",
    "Term",
    "closed_form",
    "context_length",
    "context_tokens",
    "count_paths",
    "evaluate_terms",
    "expand",
    "expand_paths",
    "expand_stream",
    "format_path",
    "logit_agreement",
    "nested_paths",
    "parse_path",
    "path_term",
    "source_terms",
    "split_term_counts",
    "starts_at_model_state",
    "stream_term",
]
