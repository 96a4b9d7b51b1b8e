"""Applications of jet expansions: lenses, n-gram tables, keyword masses, model diffs.

- :mod:`.lens`: the iterative and joint jet lenses;
- :mod:`.ngrams`: n-gram tables read from paths (a package: contexts, sweep, table, keywords,
  comparisons);
- :mod:`.statistics`: bootstrap confidence intervals;
- :mod:`.plots`: lens pictures and curves;
- :mod:`.groundtruth`: tiny models trained on known bigram statistics, and read-outs scored
  against them;
- :mod:`.sketch`: a jet n-gram language model read from a model, scored by perplexity;
- :mod:`.targets`, :mod:`.roles`, :mod:`.curves`, :mod:`.diffs`, :mod:`.masses`: the paper's
  analysis tables (component roles checked by interventions, checkpoint curves, model diffs,
  keyword masses);
- :mod:`.entry_points`: ``jetgraph.lens`` and ``jetgraph.ngrams``, one call from a model.
"""

from jetgraph.applications.lens import (
    LensAverage,
    LensResult,
    iterative_lens,
    iterative_lenses,
    joint_lens,
    lens_over_prompts,
    pad_batch,
    write_lens_csv,
)
from jetgraph.applications.ngrams import (
    DEFAULT_READOUT,
    Contexts,
    FirstTokens,
    InputConvention,
    NgramQuery,
    NgramTable,
    PathReader,
    RunOptions,
    common_tokens,
    compare_to_reference,
    diff_tables,
    full_table,
    keyword_ids,
    load_keywords,
    ngram_plan,
    ngram_table,
)
from jetgraph.applications.statistics import bootstrap_mean

__all__ = [
    "DEFAULT_READOUT",
    "Contexts",
    "FirstTokens",
    "InputConvention",
    "LensAverage",
    "LensResult",
    "NgramQuery",
    "NgramTable",
    "PathReader",
    "RunOptions",
    "bootstrap_mean",
    "common_tokens",
    "compare_to_reference",
    "diff_tables",
    "full_table",
    "iterative_lens",
    "iterative_lenses",
    "joint_lens",
    "keyword_ids",
    "lens_over_prompts",
    "load_keywords",
    "ngram_plan",
    "ngram_table",
    "pad_batch",
    "write_lens_csv",
]
