"""A path's next-token distribution read after token sequences put before each context.

``MixtureEvaluator`` evaluates a path on ``s ⊕ context`` for every prefix ``s`` of a small
weighted set (all of one length) and returns log Σ_s w_s softmax(path(s ⊕ context)): a proper
log-distribution, so the sweep's top-k, normalisers and keyword masses apply to it unchanged.
One prefix of weight 1 is the plain read after a BOS. The default bigram read-out
(:mod:`.readout`) is the model itself (``h_last→U``) read this way.
"""

from __future__ import annotations

import torch

from jetgraph.applications.ngrams.evaluator import PathEvaluator


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
