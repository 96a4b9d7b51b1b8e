"""A path's next-token distribution averaged over tokens put before each context.

``MixtureEvaluator`` evaluates a path on ``a ⊕ context`` for every first token ``a`` of a small
weighted set and returns log Σ_a w_a softmax(path(a ⊕ context)): a proper log-distribution, so
the sweep's top-k, normalisers and keyword masses apply to it unchanged. The default bigram
read-out (:mod:`.readout`) is the model itself (``h_last→U``) mixed this way.
"""

from __future__ import annotations

import torch

from jetgraph.applications.ngrams.evaluator import PathEvaluator


class MixtureEvaluator:
    """``evaluator(ids)``: [rows, vocab] log of the weighted mean of the inner path's
    next-token probabilities over the contexts ``first[i] ⊕ ids`` (weights sum to 1)."""

    def __init__(self, inner: PathEvaluator, first: torch.Tensor, weights: torch.Tensor) -> None:
        if first.dim() != 1 or first.shape != weights.shape or first.numel() == 0:
            raise ValueError("a mixture needs one weight per first token, and at least one token")
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
        head = self.first[index].to(ids.device).expand(ids.shape[0], 1)
        return torch.cat([head, ids], 1)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        total = None
        for index, weight in enumerate(self.weights.tolist()):
            probs = self.inner(self._with(ids, index)).double().softmax(-1) * weight
            total = probs if total is None else total + probs
        return total.log().float()
