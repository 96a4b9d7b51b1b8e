"""Float64 oracles for Taylor coefficients: nested forward-mode AD and finite differences."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.func import jvp


def nested_jvp_coefficients(f: Callable[[torch.Tensor], torch.Tensor], c: torch.Tensor, v: torch.Tensor,
                            order: int) -> list[torch.Tensor]:
    """[D^j f(c)[v^j] / j! for j = 0..order] by nesting torch.func.jvp."""
    functions = [f]
    for _ in range(order):
        previous = functions[-1]
        functions.append(lambda x, previous=previous: jvp(previous, (x,), (v,))[1])
    return [functions[j](c) / math.factorial(j) for j in range(order + 1)]


def finite_difference_coefficients(f: Callable[[torch.Tensor], torch.Tensor], c: torch.Tensor,
                                   v: torch.Tensor, order: int, radius: float = 0.2,
                                   points: int = 25, degree: int = 12) -> list[torch.Tensor]:
    """Taylor coefficients of t -> f(c + t v) by a least-squares polynomial fit on Chebyshev nodes."""
    nodes = radius * torch.cos(math.pi * (2 * torch.arange(points, dtype=torch.float64) + 1) / (2 * points))
    values = torch.stack([f(c + t * v).reshape(-1) for t in nodes])
    vandermonde = torch.stack([nodes**j for j in range(degree + 1)], 1)
    coefficients = torch.linalg.lstsq(vandermonde, values).solution
    shape = f(c).shape
    return [coefficients[j].reshape(shape) for j in range(order + 1)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300)).item()
