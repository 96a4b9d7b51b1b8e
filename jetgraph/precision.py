"""Floating-point precision: what each dtype can promise, in one place.

Capture checks that the lifted program reproduces the model's logits to a tolerance that
follows the logits' dtype: float32 (and float64) keep the 1e-4 relative bound of a float32
capture; bfloat16 and float16 allow :data:`HALF_ULPS` units in the last place of the logits'
scale, because the model's fused kernels (SDPA, fused norms) and the decomposed program round
their intermediate results at different places. docs/precision.md states the error budgets.
"""

from __future__ import annotations

import torch

FLOAT32_RELATIVE = 1e-4
"""Capture's self-check for float32 (and wider) logits, relative to their largest magnitude."""
HALF_ULPS = 8
"""Capture's self-check for 16-bit logits, in machine epsilons of their dtype (bf16: 2^-7 each)."""
HALF = (torch.bfloat16, torch.float16)


def is_half(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is a 16-bit float (bfloat16, float16)."""
    return dtype in HALF


def capture_tolerance(dtype: torch.dtype) -> float:
    """The capture self-check's relative tolerance for logits of ``dtype``."""
    if is_half(dtype):
        return max(FLOAT32_RELATIVE, HALF_ULPS * torch.finfo(dtype).eps)
    return FLOAT32_RELATIVE


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16``."""
    return str(dtype).removeprefix("torch.")
