"""A path's next-token distribution read after token sequences put before each context.

:class:`FirstTokens` is that weighted set of token sequences (the *first tokens* of each row:
a BOS alone, BOS and each token the model expects first, or those tokens alone).
``MixtureEvaluator`` evaluates a path on ``s ⊕ context`` for every prefix ``s`` of a small
weighted set (all of one length) and returns log Σ_s w_s softmax(path(s ⊕ context)): a proper
log-distribution, so the sweep's top-k, normalisers and keyword masses apply to it unchanged.
One prefix of weight 1 is the plain read after a BOS. The default bigram read-out
(:mod:`.readout`) is the model itself (``h_last→U``) read this way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from jetgraph.applications.ngrams.evaluator import PathEvaluator


@dataclass(frozen=True)
class FirstTokens:
    """The token sequences read before each context of a path from the model's stream, and their
    weights: each row's next-token distribution is ``Σ_i weights[i] · p(· | ids[i] ⊕ row)``.

    ``ids``: one or more token sequences of one length >= 1 (a bare int is a one-token
    sequence); ``weights``: one per sequence, non-negative, summing to 1 (default: uniform).
    :meth:`expected` builds the default read-out's: the tokenizer's BOS, or the tokens the model
    expects first when there is none."""

    ids: tuple[tuple[int, ...], ...]
    weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        try:
            ids = tuple((int(s),) if isinstance(s, int) else tuple(int(t) for t in s) for s in self.ids)
        except TypeError:
            raise TypeError(f"FirstTokens ids are token sequences (or bare ids), got {self.ids!r}") from None
        if not ids or len({len(s) for s in ids}) != 1 or not ids[0]:
            raise ValueError("FirstTokens needs at least one token sequence, all of one length >= 1")
        if min(min(s) for s in ids) < 0:
            raise ValueError(f"FirstTokens ids must be token ids >= 0, got {[list(s) for s in ids]}")
        weights = tuple(float(w) for w in self.weights) if self.weights else (1.0 / len(ids),) * len(ids)
        if len(weights) != len(ids):
            raise ValueError(f"FirstTokens needs one weight per sequence: {len(ids)} sequences, "
                             f"{len(weights)} weights")
        if min(weights) < 0 or abs(sum(weights) - 1) > 1e-6:
            raise ValueError(f"FirstTokens weights must be non-negative and sum to 1, got sum {sum(weights)}")
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "weights", weights)

    @classmethod
    def of(cls, ids: Sequence[Sequence[int] | int], weights: Sequence[float] | None = None) -> FirstTokens:
        """From any sequences (lists, tuples, a [n, length] tensor) and optional weights."""
        if isinstance(ids, torch.Tensor):
            ids = ids.view(len(ids), -1).tolist()
        return cls(tuple(ids), tuple(weights) if weights is not None else ())  # type: ignore[arg-type]

    @classmethod
    def expected(cls, prog, count: int | None = None, *, convention=None, tokenizer: object = None,
                 chunk: int = 1024) -> FirstTokens | None:
        """What the default read-out reads before each row (:mod:`.readout`): the convention's
        prefix (the tokenizer's BOS) then each of the ``count`` tokens the model expects first
        (default: 0 with a BOS, 16 without), the prefix alone, or None (each row alone)."""
        from jetgraph.applications.ngrams.convention import input_convention
        from jetgraph.applications.ngrams.readout import readout_prefixes

        vocab = int(prog.decoder.unembedding.shape[0])
        return readout_prefixes(prog, input_convention(convention, tokenizer, vocab), count, chunk)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def length(self) -> int:
        """Tokens per sequence (what each row is lengthened by)."""
        return len(self.ids[0])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequences as long [n, length] and the weights as float64 [n]."""
        return torch.tensor(self.ids, dtype=torch.long), torch.tensor(self.weights, dtype=torch.double)

    def check_vocabulary(self, vocab: int) -> FirstTokens:
        if max(max(s) for s in self.ids) >= vocab:
            raise ValueError(f"first_tokens' token ids must lie in [0, {vocab})")
        return self

    def as_lists(self) -> tuple[list[list[int]], list[float]]:
        """``(sequences, weights)`` as plain lists (tables' metadata, JSON)."""
        return [list(s) for s in self.ids], list(self.weights)

    def describe(self, tokenizer: object = None) -> str:
        """What each row is read after, in words (tables, file headers, CLI)."""
        def show(sequence: Sequence[int]) -> str:
            return repr(tokenizer.decode(list(sequence))) if tokenizer is not None else str(list(sequence))

        if len(self.ids) == 1:
            return f"each token read after {show(self.ids[0])}"
        shown = ", ".join(f"{show(s)} {w:.2f}" for s, w in zip(self.ids, self.weights, strict=True))
        return f"each row averaged over the {len(self.ids)} first tokens the model expects most: {shown}"


class MixtureEvaluator:
    """``evaluator(ids)``: [rows, vocab] log of the weighted mean of the inner path's
    next-token probabilities over the contexts ``first[i] ⊕ ids`` (``first``: [prefixes, length]
    token ids; weights sum to 1)."""

    def __init__(self, inner: PathEvaluator, first: torch.Tensor, weights: torch.Tensor) -> None:
        if first.dim() != 2 or first.shape[:1] != weights.shape or first.numel() == 0:
            raise ValueError("a mixture needs one weight per prefix, and at least one prefix of one token")
        if (weights < 0).any() or abs(float(weights.sum()) - 1) > 1e-6:
            raise ValueError("mixture weights must be non-negative and sum to 1, got sum "
                             f"{float(weights.sum())}")
        self.inner, self.first, self.weights = inner, first.long(), weights.double()
        self.device = inner.device
        self.vocab = inner.vocab

    @property
    def shared_bytes(self) -> int:
        return self.inner.shared_bytes

    def flops(self, rows: int, groups: int | None = None) -> float:
        return len(self.first) * self.inner.flops(rows, None)

    def verify(self, probe: torch.Tensor) -> None:
        self.inner.verify(self._with(probe, 0))

    def _with(self, ids: torch.Tensor, index: int) -> torch.Tensor:
        head = self.first[index].to(ids.device).expand(ids.shape[0], -1)
        return torch.cat([head, ids], 1)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if len(self.first) == 1:  # one prefix (a BOS): the path's own logits, normalised by the table
            return self.inner(self._with(ids, 0)).float()
        total = None  # float64 [rows, V], accumulated in place: see :data:`MIXTURE_BYTES_PER_ENTRY`
        for index, weight in enumerate(self.weights.tolist()):
            probs = torch.softmax(self.inner(self._with(ids, index)), -1, dtype=torch.double)
            total = probs.mul_(weight) if total is None else total.add_(probs, alpha=weight)
        return total.log_().float()


# bytes per [row, token] entry at a mixture's peak: the inner path's float32 logits, their float64
# softmax, the float64 running total and the float32 result
MIXTURE_BYTES_PER_ENTRY = 4 + 8 + 8 + 4
