"""Statistics of the applications' read-outs: bootstrap confidence intervals."""

from __future__ import annotations

import torch


def bootstrap_mean(values: torch.Tensor, samples: int = 1000, confidence: float = 0.95,
                   seed: int = 0) -> dict[str, float]:
    """Mean of ``values`` and a percentile bootstrap confidence interval (resampling rows)."""
    values = values.double().flatten()
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, values.numel(), (samples, values.numel()), generator=generator)
    means = values[draws].mean(1)
    alpha = (1 - confidence) / 2
    return {"mean": values.mean().item(), "low": means.quantile(alpha).item(),
            "high": means.quantile(1 - alpha).item(), "confidence": confidence, "samples": samples}
