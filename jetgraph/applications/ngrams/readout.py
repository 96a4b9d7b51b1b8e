"""The default bigram read-out: the model's own next-token distribution after each token,
averaged over the tokens it expects before it.

The ground-truth study (docs/readouts.md) scored every data-free read-out against known bigram
statistics. Single attention-free paths do not recover them: on a tied model ``E→U`` is
LN(w_i)·w_j, which peaks at j = i (it predicts the context token itself), and the last MLP alone
carries little of the bigram. The model's own output does, but read on one token alone at
position 0 it is off-distribution: pretrained models use position 0 as an attention sink (SmolLM2
predicts the same few tokens after every word: 0 of 40 collocations), and tiny ones see position 0
rarely in training. So the default reads each token b in second position, after a first token a,
and mixes the next-token distributions over the ``count`` tokens a the model itself expects most:

    p(c | b) = Σ_a w_a · p_model(c | a, b),   w = the model's mean one-token prediction, top-count.

Everything comes from the model; no text is read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_READOUT = "h_last→U"
DEFAULT_FIRST_TOKENS = 16


@torch.no_grad()
def expected_first_tokens(prog, count: int = DEFAULT_FIRST_TOKENS, tokens: Sequence[int] | None = None,
                          chunk: int = 1024) -> tuple[list[int], list[float]]:
    """The ``count`` tokens the model predicts most (at most the vocabulary), and their weights
    (summing to 1): the mean over the tokens b (``tokens``, default every token) of the model's
    next-token distribution for b alone at position 0, its top ``count`` renormalised."""
    from jetgraph.applications.ngrams.sweep import full_table

    vocab = int(prog.decoder.unembedding.shape[0])
    if count < 1:
        raise ValueError(f"the number of first tokens must be at least 1, got {count}")
    count = min(count, vocab)
    rows = torch.arange(vocab) if tokens is None else torch.as_tensor(list(tokens), dtype=torch.long)
    total = torch.zeros(vocab, dtype=torch.double)
    chunk = _rows_per_call(chunk, vocab)
    for start in range(0, len(rows), chunk):
        ids = rows[start:start + chunk].view(-1, 1)
        total += full_table(prog, DEFAULT_READOUT, contexts=ids, chunk=chunk).double().softmax(-1).sum(0)
    weights, index = (total / len(rows)).topk(count)
    return index.tolist(), (weights / weights.sum()).tolist()


def placeholder_average(vocab: int, count: int = DEFAULT_FIRST_TOKENS) -> tuple[list[int], list[float]]:
    """First tokens of the right number, for planning: a mixture's cost does not depend on
    which tokens it mixes, so a plan needs no pass over the vocabulary first."""
    count = max(1, min(count, vocab))
    return list(range(count)), [1.0 / count] * count


@torch.no_grad()
def bigram_readout(prog, count: int = DEFAULT_FIRST_TOKENS, tokens: Sequence[int] | None = None,
                   chunk: int = 1024) -> torch.Tensor:
    """The default read-out as a dense [rows, V] float64 table of log-probabilities (rows: every
    token, or ``tokens``); ``count`` 0 reads each token alone at position 0."""
    vocab = int(prog.decoder.unembedding.shape[0])
    rows = torch.arange(vocab) if tokens is None else torch.as_tensor(list(tokens), dtype=torch.long)
    reader = RowReader(prog, DEFAULT_READOUT, count, rows.tolist(), chunk)
    return torch.cat([reader(rows[start:start + reader.chunk].view(-1, 1))
                      for start in range(0, len(rows), reader.chunk)])


class RowReader:
    """log p(next token | context) of one read-out, for any batch of contexts: a path's own
    rows (``"E→U"``, ``"E→attn0→U"`` on token pairs), or the default read-out mixed over the
    ``count`` first tokens the model expects over ``tokens`` (fixed once, at construction, so
    that every batch is read with the same mixture). ``reader(contexts)`` with contexts
    [n, length] gives float64 [n, V]."""

    def __init__(self, prog, path: str = DEFAULT_READOUT, count: int = DEFAULT_FIRST_TOKENS,
                 tokens: Sequence[int] | None = None, chunk: int = 1024) -> None:
        from jetgraph.passes.paths import context_length, path_term, reads_whole_context

        self.prog, self.path = prog, path
        term = path_term(prog, path)
        self.vocab = int(prog.decoder.unembedding.shape[0])
        self.length = context_length(term)
        self.mixes = reads_whole_context(term) and count > 0
        self.chunk = _rows_per_call(chunk, self.vocab)
        self.first, self.weights = ((expected_first_tokens(prog, count, tokens, chunk)) if self.mixes
                                    else ([], []))

    @torch.no_grad()
    def __call__(self, contexts: torch.Tensor) -> torch.Tensor:
        from jetgraph.applications.ngrams.sweep import full_table

        contexts = torch.as_tensor(contexts, dtype=torch.long)
        contexts = contexts.view(-1, 1) if contexts.dim() == 1 else contexts
        def read(rows: torch.Tensor) -> torch.Tensor:
            return full_table(self.prog, self.path, contexts=rows, chunk=self.chunk).double()

        if not self.mixes:
            return read(contexts).log_softmax(-1)
        total = torch.zeros(len(contexts), self.vocab, dtype=torch.double)
        for a, w in zip(self.first, self.weights, strict=True):
            prefixed = torch.cat([torch.full((len(contexts), 1), a, dtype=torch.long), contexts], 1)
            total += w * read(prefixed).softmax(-1)
        return total.log()

    def describe(self) -> str:
        """The read-out in words, for tables and file headers."""
        if self.mixes:
            return f"{self.path}, averaged over {len(self.first)} expected first tokens"
        return self.path


def _rows_per_call(chunk: int, vocab: int) -> int:
    """Rows per dense call: the chunk, held to 16M logits (64 MB in float32) at a time."""
    return max(1, min(chunk, (1 << 24) // vocab))
