"""How well approximate logits stand for the model's: the one implementation of the metrics.

:func:`logit_agreement` compares logits position by position — cosine, KL(true ‖ approx), top-1
agreement, top-k overlap and the relative remainder ‖true − approx‖/‖true‖ — in float64, so that
huge but finite values (a diverging jet reaches 1e30 long before float32 overflows) give their true
cosine and remainder. Where the approximate (or true) logits of a position are not all finite,
every metric there is NaN, never a number. The lens (per centre and position) and
:meth:`~jetgraph.passes.expansion.Expansion.faithfulness` (one number each) both use it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

METRICS = ("cosine", "kl", "top1", "topk", "remainder")


def logit_agreement(approx: torch.Tensor, true: torch.Tensor, k: int = 5) -> dict[str, torch.Tensor]:
    """Each of :data:`METRICS` per position: float64 tensors of the logits' leading shape
    (``approx`` and ``true`` are [..., vocab]); NaN where a position is not finite."""
    finite = torch.isfinite(approx).all(-1) & torch.isfinite(true).all(-1)
    approx = approx.detach().masked_fill(~finite.unsqueeze(-1), 0)  # NaN-masked below
    true = true.detach()
    safe, exact = approx.double(), true.double()
    true_log = exact.log_softmax(-1)
    true_top = true.topk(k, -1).indices  # ranks in the logits' own dtype
    approx_top = approx.topk(k, -1).indices
    values = {
        "cosine": F.cosine_similarity(safe, exact, dim=-1),
        "kl": (true_log.exp() * (true_log - safe.log_softmax(-1))).sum(-1),
        "top1": (approx.argmax(-1) == true.argmax(-1)).double(),
        "topk": (true_top.unsqueeze(-1) == approx_top.unsqueeze(-2)).any(-1).double().mean(-1),
        "remainder": (exact - safe).norm(dim=-1) / exact.norm(dim=-1),
    }
    return {name: value.masked_fill(~finite, math.nan) for name, value in values.items()}


def per_token_agreement(logits: torch.Tensor, true_logits: torch.Tensor, k: int = 5
                        ) -> dict[str, torch.Tensor]:
    """:func:`logit_agreement` of each centre's logits ([centres, batch, seq, vocab]) against
    ``true_logits`` [batch, seq, vocab]: float32 [centres, batch, seq] tensors. One centre at a
    time, so the float64 copies stay one centre large."""
    rows: dict[str, list[torch.Tensor]] = {m: [] for m in METRICS}
    for center in logits:
        for name, value in logit_agreement(center, true_logits, k).items():
            rows[name].append(value.float())
    return {name: torch.stack(value) for name, value in rows.items()}


def masked_mean(values: torch.Tensor, real: torch.Tensor | None, dim: int) -> torch.Tensor:
    """The mean of ``values`` over ``dim`` counting only entries where ``real`` (broadcast from
    the right) is True; NaN at a real entry stays NaN, NaN at an excluded one does not count."""
    if real is None:
        return values.mean(dim)
    real = real.expand(values.shape)
    total = values.masked_fill(~real, 0).sum(dim)
    return total / real.sum(dim).clamp_min(1)


def per_center_agreement(logits: torch.Tensor, true_logits: torch.Tensor, k: int = 5,
                         real: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """:func:`per_token_agreement` averaged over the batch: float32 [centres, seq] tensors (NaN
    where a batch element of a position is not finite). ``real`` ([batch, seq] bool) excludes
    padding: each position averages over the prompts that have a token there."""
    return {name: masked_mean(value, real, 1)
            for name, value in per_token_agreement(logits, true_logits, k).items()}


def summary_agreement(approx: torch.Tensor, true: torch.Tensor, k: int = 5) -> dict[str, float]:
    """:func:`logit_agreement` averaged over every position: ``cosine``, ``kl``, ``top1`` and
    ``top{k}`` as plain numbers."""
    values = logit_agreement(approx, true, k)
    return {"cosine": values["cosine"].mean().item(), "kl": values["kl"].mean().item(),
            "top1": values["top1"].mean().item(), f"top{k}": values["topk"].mean().item()}
