"""The default bigram read-out: the model's own next-token distribution after each token, read
the way the tokenizer builds text.

The ground-truth study (docs/readouts.md) scored every data-free read-out against known bigram
statistics. Single attention-free paths do not recover them: on a tied model ``E→U`` is
LN(w_i)·w_j, which peaks at j = i (it predicts the context token itself), and the last MLP alone
carries little of the bigram. The model's own output does, read on contexts built the way the
tokenizer builds text (:mod:`.convention`):

- the tokenizer adds a start token (BOS): each token b is read as ``BOS b``,
  ``p(c | b) = p_model(c | BOS, b)``, which is how a text starting with b looks to the model;
- it adds none: b alone at position 0 is off-distribution for pretrained models (position 0 is an
  attention sink: SmolLM2 predicts the same few tokens after every word, 0 of 40 collocations),
  so b is read in second position after a first token a and the next-token distributions are
  mixed over the ``count`` tokens a the model itself expects most:
  ``p(c | b) = Σ_a w_a · p_model(c | a, b)``, w = the model's mean one-token prediction, top-count.

Either way the first tokens are the model's and fixed per model (computed once over a fixed,
evenly spaced sample of the vocabulary, never from the rows a caller asks for), so a row's
distribution does not depend on which other rows are read. Everything comes from the model; no
text is read.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from jetgraph.applications.ngrams.convention import InputConvention, input_convention
from jetgraph.applications.ngrams.mixture import FirstTokens

DEFAULT_READOUT = "h_last→U"
DEFAULT_FIRST_TOKENS = 16  # the mixture's size when the convention puts nothing before a context
SAMPLE_TOKENS = 4096  # contexts the model's mean prediction is averaged over (evenly spaced ids)

_MEAN_PREDICTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def first_token_count(convention: InputConvention, count: int | None) -> int:
    """How many expected first tokens the read-out mixes over: ``count`` as given, or by default
    none when the convention has a prefix (BOS is the text's start) and 16 when it has none."""
    if count is None:
        return 0 if convention.prefix else DEFAULT_FIRST_TOKENS
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"the number of first tokens must be an int >= 0, got {count!r}")
    return count


def sample_tokens(vocab: int, size: int = SAMPLE_TOKENS) -> torch.Tensor:
    """The fixed contexts a model's mean prediction is averaged over: every id for a vocabulary
    of at most ``size``, else ``size`` evenly spaced ids (fixed per vocabulary)."""
    if vocab <= size:
        return torch.arange(vocab)
    return torch.linspace(0, vocab - 1, size).round().long().unique()


def prediction_contexts(vocab: int, convention: InputConvention) -> torch.Tensor:
    """The contexts :func:`mean_prediction` reads: ``prefix ⊕ b`` for each sampled token b,
    [samples, len(prefix) + 1] (what a plan of that pass prices)."""
    rows = sample_tokens(vocab).view(-1, 1)
    prefix = torch.tensor(convention.prefix, dtype=torch.long)
    return torch.cat([prefix.expand(len(rows), len(prefix)), rows], 1)


def prediction_plan(prog, convention: InputConvention, chunk: int = 1024):
    """The cost of :func:`mean_prediction` (one model run per sampled context), as a labelled plan
    phase; nothing when it is cached already."""
    import dataclasses

    from jetgraph.applications.ngrams.sweep import ngram_plan

    plan = ngram_plan(prog, DEFAULT_READOUT, contexts=prediction_contexts(_vocab(prog), convention), top=1,
                      chunk=chunk)
    if convention.prefix in _MEAN_PREDICTIONS.get(prog, {}):
        plan = dataclasses.replace(plan, flops=0.0, seconds=0.0, elements=0.0)
    return dataclasses.replace(plan, what="the model's mean prediction (sources, expected first tokens)")


@torch.no_grad()
def mean_prediction(prog, convention: InputConvention, chunk: int = 1024) -> torch.Tensor:
    """The unigram read-out: the mean over the sampled tokens b (:func:`sample_tokens`) of the
    model's next-token distribution on ``prefix ⊕ b``, float64 [V]. Computed once per program and
    prefix (cached while the program lives)."""
    from jetgraph.applications.ngrams.sweep import full_table

    vocab = _vocab(prog)
    convention.validate(vocab)
    cache = _MEAN_PREDICTIONS.setdefault(prog, {})
    if convention.prefix not in cache:
        contexts = prediction_contexts(vocab, convention)
        total = torch.zeros(vocab, dtype=torch.double)
        step = _rows_per_call(chunk, vocab)
        for start in range(0, len(contexts), step):
            logits = full_table(prog, DEFAULT_READOUT, contexts=contexts[start:start + step], chunk=step)
            total += logits.double().softmax(-1).sum(0)
        cache[convention.prefix] = total / len(contexts)
    return cache[convention.prefix]


@torch.no_grad()
def expected_first_tokens(prog, count: int, convention: InputConvention | Sequence[int] | None = None,
                          chunk: int = 1024, tokenizer: object = None) -> tuple[list[int], list[float]]:
    """The ``count`` tokens the model expects first, and their weights (summing to 1): after the
    convention's prefix, the model's prediction there (with BOS: the tokens documents start
    with); without a prefix, its mean one-token prediction (:func:`mean_prediction`). Top
    ``count`` (at most the vocabulary), renormalised; fixed per model."""
    from jetgraph.applications.ngrams.sweep import full_table

    convention = input_convention(convention, tokenizer, _vocab(prog))
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"the number of first tokens must be at least 1, got {count!r}")
    count = min(count, _vocab(prog))
    if convention.prefix:
        context = torch.tensor([convention.prefix], dtype=torch.long)
        distribution = full_table(prog, DEFAULT_READOUT, contexts=context).double().softmax(-1)[0]
    else:
        distribution = mean_prediction(prog, convention, chunk)
    weights, index = distribution.topk(count)
    return index.tolist(), (weights / weights.sum()).tolist()


def readout_prefixes(prog, convention: InputConvention, count: int | None = None,
                     chunk: int = 1024) -> FirstTokens | None:
    """What the read-out puts before each context, with weights: the convention's prefix then each
    expected first token (a mixture), the prefix alone, or None (the context alone)."""
    count = first_token_count(convention, count)
    if count:
        first, weights = expected_first_tokens(prog, count, convention, chunk)
        return FirstTokens(tuple((*convention.prefix, a) for a in first), tuple(weights))
    return FirstTokens((convention.prefix,)) if convention.prefix else None


def placeholder_prefixes(vocab: int, convention: InputConvention,
                         count: int | None = None) -> FirstTokens | None:
    """First tokens of the right number and length, for planning: a mixture's cost does not
    depend on which tokens it mixes, so a plan needs no pass over the vocabulary first."""
    count = min(first_token_count(convention, count), vocab)
    if count:
        return FirstTokens(tuple((*convention.prefix, a) for a in range(count)))
    return FirstTokens((convention.prefix,)) if convention.prefix else None


def describe_prefixes(first_tokens: FirstTokens | None, tokenizer: object = None) -> str:
    """What each row was read after, in words (tables, file headers, CLI)."""
    if first_tokens is None:
        return "each token alone at position 0"
    return first_tokens.describe(tokenizer)


@torch.no_grad()
def bigram_readout(prog, count: int | None = None, tokens: Sequence[int] | None = None, *,
                   convention: InputConvention | Sequence[int] | None = None, tokenizer: object = None,
                   chunk: int = 1024) -> torch.Tensor:
    """The default read-out as a dense [rows, V] float64 table of log-probabilities (rows: every
    token, or ``tokens``), read under the input convention (:mod:`.convention`)."""
    vocab = _vocab(prog)
    rows = torch.arange(vocab) if tokens is None else torch.as_tensor(list(tokens), dtype=torch.long)
    reader = RowReader(prog, DEFAULT_READOUT, count, convention=convention, tokenizer=tokenizer, chunk=chunk)
    return torch.cat([reader(rows[start:start + reader.chunk].view(-1, 1))
                      for start in range(0, len(rows), reader.chunk)])


class RowReader:
    """log p(next token | context) of one read-out, for any batch of contexts: a path's own
    rows (``"E→U"``, ``"E→attn0→U"`` on token pairs), or a read-out of the model's stream
    (the default) read after the input convention's prefix and mixed over ``count`` expected
    first tokens (fixed once per model, so every batch is read with the same mixture).
    ``reader(contexts)`` with contexts [n, length] gives float64 [n, V]: the default read-out's
    :class:`~jetgraph.applications.ngrams.reader.PathReader` with its first tokens found."""

    def __init__(self, prog, path: str = DEFAULT_READOUT, count: int | None = None, *,
                 convention: InputConvention | Sequence[int] | None = None, tokenizer: object = None,
                 chunk: int = 1024) -> None:
        from jetgraph.applications.ngrams.reader import path_reader

        self.prog, self.path = prog, path
        self.vocab = _vocab(prog)
        self.chunk = _rows_per_call(chunk, self.vocab)
        self.convention: InputConvention | None = None
        first_tokens = None
        self.first: list[int] = []  # the expected first tokens mixed over (empty: no mixture)
        if path_reader(prog, path).whole_context:
            self.convention = input_convention(convention, tokenizer, self.vocab)
            first_tokens = readout_prefixes(prog, self.convention, count, chunk)
            if first_token_count(self.convention, count):
                self.first = [sequence[-1] for sequence in first_tokens.ids]  # type: ignore[union-attr]
        self.reader = path_reader(prog, path, first_tokens)
        self.length = self.reader.length or 1

    @property
    def first_tokens(self) -> FirstTokens | None:
        """What each row is read after (None: each row alone)."""
        return self.reader.first_tokens

    @torch.no_grad()
    def __call__(self, contexts: torch.Tensor) -> torch.Tensor:
        contexts = torch.as_tensor(contexts, dtype=torch.long)
        contexts = contexts.view(-1, 1) if contexts.dim() == 1 else contexts
        return torch.cat([self.reader.log_probs(contexts[i:i + self.chunk])
                          for i in range(0, len(contexts), self.chunk)]) if len(contexts) else \
            torch.empty(0, self.vocab, dtype=torch.double)

    def describe(self, tokenizer: object = None) -> str:
        """The read-out in words, for tables and file headers."""
        if self.convention is None:
            return self.path
        return f"{self.path}, {describe_prefixes(self.first_tokens, tokenizer)}"


def _vocab(prog) -> int:
    return int(prog.decoder.unembedding.shape[0])


def _rows_per_call(chunk: int, vocab: int) -> int:
    """Rows per dense call: the chunk, held to 16M logits (64 MB in float32) at a time."""
    return max(1, min(chunk, (1 << 24) // vocab))
