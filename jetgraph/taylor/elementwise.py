"""Elementwise activations whose jet rules are derived with sympy.

Each function is written once as a sympy expression; its first k derivatives are taken
symbolically and compiled to torch (``sympy.lambdify`` with common-subexpression elimination).
The rule then composes the derivatives at x_0 with powers of x − x_0 (see ``series.compose``):
exact Taylor coefficients at O(k) series products, for any order.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import sympy as sp
import torch

_x = sp.Symbol("x", real=True)

EXPRESSIONS: dict[str, sp.Expr] = {
    "tanh": sp.tanh(_x),
    "sigmoid": 1 / (1 + sp.exp(-_x)),
    "erf": sp.erf(_x),
    "gelu": _x / 2 * (1 + sp.erf(_x / sp.sqrt(2))),
    "gelu_tanh": _x / 2 * (1 + sp.tanh(sp.sqrt(2 / sp.pi) * (_x + sp.Rational(44715, 1000000) * _x**3))),
    "silu": _x / (1 + sp.exp(-_x)),
    "sin": sp.sin(_x),
    "cos": sp.cos(_x),
}

_TORCH = {
    "exp": torch.exp, "erf": torch.erf, "tanh": torch.tanh, "sin": torch.sin, "cos": torch.cos,
    "sqrt": math.sqrt, "pi": math.pi, "cosh": torch.cosh, "sinh": torch.sinh,
}


@functools.cache
def derivative_functions(name: str, order: int) -> tuple[Callable[[torch.Tensor], torch.Tensor], ...]:
    """f, f', …, f^(order) of the named activation, compiled to torch functions."""
    expr = EXPRESSIONS[name]
    functions = []
    for _ in range(order + 1):
        functions.append(sp.lambdify(_x, expr, modules=[_TORCH], cse=True))
        expr = sp.diff(expr, _x)
    return tuple(functions)


def derivative(name: str, x0: torch.Tensor, order: int) -> Callable[[int], torch.Tensor]:
    """j -> f^(j)(x0) as a tensor shaped like x0, for j ≤ order."""
    functions = derivative_functions(name, order)

    def at(j: int) -> torch.Tensor:
        value = functions[j](x0)
        return value if isinstance(value, torch.Tensor) else torch.full_like(x0, float(value))

    return at
