"""Jet n-grams: n-gram tables read from the weights (paper §4).

A path that skips every attention unit sees one token only, so evaluated on every vocabulary
token it is a bigram table: ``E→U`` (the embedding decoded directly), ``E→mlp3→U``, MLP
compositions. A path through one attention unit, evaluated on token pairs, is a skip-bigram /
trigram table. Paths are written in the path language (:mod:`jetgraph.passes.pathspec`).

- :mod:`.contexts`: the rows of a table (every token, every pair, or given), made lazily;
- :mod:`.query`: what a table asks (:class:`NgramQuery`) and how it runs (:class:`RunOptions`);
- :mod:`.reader`: one path's rows on any contexts, compiled once (:class:`PathReader`);
- :mod:`.sweep`: the streamed sweep (chunks through the batched evaluator, global top-k, resume);
- :mod:`.evaluator`: last-position logits of a path, sharing per-token prefixes;
- :mod:`.state`: the reductions per chunk, their exact merge and checkpoints;
- :mod:`.shard`: one table over the ranks of torch.distributed (torchrun);
- :mod:`.table`: the result and its export;
- :mod:`.keywords`: keyword lists and their token ids;
- :mod:`.compare`: model diffs and comparison with a reference table;
- :mod:`.convention`: how read-outs of the model's stream build contexts (the tokenizer's BOS);
- :mod:`.readout`: the default bigram read-out (the model after each token, read after the
  tokenizer's BOS, or averaged over the first tokens it expects when there is none);
- :mod:`.sources`: rows chosen by the model (the tokens it predicts most), not by id order;
- :mod:`.mixture`: a path's next-token distribution averaged over first tokens (the sweep's
  evaluator for the default read-out);
- :mod:`.tables`: several tables read the same way, planned before the model passes their rows
  and prefixes need (what ``jetgraph.ngrams`` and ``jetgraph ngrams`` share).
"""

from jetgraph.applications.ngrams.compare import compare_to_reference, diff_tables
from jetgraph.applications.ngrams.contexts import Contexts, all_contexts
from jetgraph.applications.ngrams.convention import InputConvention, input_convention
from jetgraph.applications.ngrams.keywords import keyword_ids, load_keywords
from jetgraph.applications.ngrams.mixture import FirstTokens
from jetgraph.applications.ngrams.query import NgramQuery, RunOptions
from jetgraph.applications.ngrams.reader import PathReader
from jetgraph.applications.ngrams.readout import DEFAULT_READOUT, bigram_readout, expected_first_tokens
from jetgraph.applications.ngrams.shard import Shard, ShardError, current_shard
from jetgraph.applications.ngrams.sources import common_tokens
from jetgraph.applications.ngrams.sweep import full_table, ngram_plan, ngram_table
from jetgraph.applications.ngrams.table import NgramTable
from jetgraph.applications.ngrams.tables import TableSet

__all__ = [
           "DEFAULT_READOUT",
           "Contexts",
           "FirstTokens",
           "InputConvention",
           "NgramQuery",
           "NgramTable",
           "PathReader",
           "RunOptions",
           "Shard",
           "ShardError",
           "TableSet",
           "all_contexts",
           "bigram_readout",
           "common_tokens",
           "compare_to_reference",
           "current_shard",
           "diff_tables",
           "expected_first_tokens",
           "full_table",
           "input_convention",
           "keyword_ids",
           "load_keywords",
           "ngram_plan",
           "ngram_table",
]
