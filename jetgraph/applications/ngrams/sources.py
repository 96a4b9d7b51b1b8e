"""Which tokens a table's rows are read for, chosen by the model rather than by id order.

Low token ids are not the commonest words in general: a Gemma-3-like tokenizer keeps 99
``<unusedN>`` tokens, 256 byte tokens and HTML tags below id 2,000, so "the first 300 ids" gives a
table of tags predicting themselves. :func:`common_tokens` gives the N tokens the model itself
predicts most (the unigram read-out under the input convention, data-free) without the
tokenizer's special, unused and byte tokens.
"""

from __future__ import annotations

import re

import torch

from jetgraph.applications.ngrams.convention import InputConvention
from jetgraph.applications.ngrams.readout import mean_prediction

# token strings that are placeholders or raw bytes, not text: <unused12>, [unused3], <0x0A>,
# <|reserved_special_token_5|>, <extra_id_7>
PLACEHOLDER = re.compile(r"^(<unused\d+>|\[unused\d+\]|<0x[0-9A-Fa-f]{2}>|<\|reserved_special_token_\d+\|>"
                         r"|<extra_id_\d+>)$")


def excluded_tokens(tokenizer: object) -> set[int]:
    """The tokenizer's special tokens (BOS, EOS, pad, added special tokens) and its unused and
    byte tokens: never sources of a table chosen by the model."""
    if tokenizer is None:
        return set()
    excluded = {int(t) for t in getattr(tokenizer, "all_special_ids", [])}
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    excluded |= {int(i) for i, token in decoder.items() if getattr(token, "special", False)}
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}  # type: ignore[attr-defined]
    excluded |= {int(i) for token, i in vocab.items() if PLACEHOLDER.match(token)}
    return excluded


def common_tokens(prog, count: int, convention: InputConvention, tokenizer: object = None,
                  chunk: int = 1024) -> list[int]:
    """The ``count`` tokens the model predicts most under ``convention`` (the mean of its
    next-token distribution over a fixed sample of contexts), without :func:`excluded_tokens`;
    ascending ids (the tables' row order). Data-free and fixed per model."""
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"the number of source tokens must be an int >= 1, got {count!r}")
    scores = mean_prediction(prog, convention, chunk).clone()
    excluded = [t for t in excluded_tokens(tokenizer) if t < len(scores)]
    if excluded:
        scores[torch.tensor(excluded)] = -1.0
    available = int((scores >= 0).sum())
    return sorted(scores.topk(min(count, available)).indices.tolist())
