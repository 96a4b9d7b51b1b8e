"""Applications of jet expansions: lenses, n-gram tables, keyword masses, model diffs."""

from jetgraph.applications.lens import LensResult, iterative_lens, joint_lens, lens_metrics, write_lens_csv
from jetgraph.applications.ngrams import (
    NgramTable,
    bootstrap_mean,
    compare_to_reference,
    diff_tables,
    full_table,
    keyword_ids,
    load_keywords,
    ngram_plan,
    ngram_table,
    path_term,
)

__all__ = [
    "LensResult",
    "NgramTable",
    "bootstrap_mean",
    "compare_to_reference",
    "diff_tables",
    "full_table",
    "iterative_lens",
    "joint_lens",
    "keyword_ids",
    "lens_metrics",
    "load_keywords",
    "ngram_plan",
    "ngram_table",
    "path_term",
    "write_lens_csv",
]
