"""Elementwise activations whose jet rules are derived with sympy.

Each activation is written in sympy over x and a few *generators* — functions of x whose
derivative is a polynomial in x and the generators (s = sigmoid(x): s' = s(1 − s); t = tanh:
t' = 1 − t²; E = erf(x/√2), G = exp(−x²/2): E' = √(2/π)·G, G' = −x·G; sin/cos). Derivatives are
taken symbolically with that chain rule, so every f^(j) is a polynomial in x and the generators,
compiled to torch in Horner form. At run time the generators are
evaluated once per jet and each derivative costs a handful of multiply-adds: few temporaries,
no repeated exp/erf. The closed forms in :data:`EXPRESSIONS` are the reference the tests check
the rules against (sympy's own Taylor coefficients).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import sympy as sp
import torch

_x = sp.Symbol("x", real=True)
_s, _t, _E, _G, _S, _C, _T = sp.symbols("s t E G S C T", real=True)
_SQRT_2_PI = sp.sqrt(2 / sp.pi)
_K = sp.Rational(44715, 1000000)

# Closed forms: the definitions, and the reference for the tests.
EXPRESSIONS: dict[str, sp.Expr] = {
    "tanh": sp.tanh(_x),
    "sigmoid": 1 / (1 + sp.exp(-_x)),
    "erf": sp.erf(_x),
    "gelu": _x / 2 * (1 + sp.erf(_x / sp.sqrt(2))),
    "gelu_tanh": _x / 2 * (1 + sp.tanh(_SQRT_2_PI * (_x + _K * _x**3))),
    "silu": _x / (1 + sp.exp(-_x)),
    "sin": sp.sin(_x),
    "cos": sp.cos(_x),
}

# The same functions over generators: (expression, {generator: (torch function, derivative)}).
_Generators = dict[sp.Symbol, tuple[Callable[[torch.Tensor], torch.Tensor], sp.Expr]]
_sigmoid: _Generators = {_s: (torch.sigmoid, _s * (1 - _s))}
_erf_half: _Generators = {
    _E: (lambda x: torch.erf(x * (1 / math.sqrt(2))), _SQRT_2_PI * _G),
    _G: (lambda x: torch.exp(-0.5 * x * x), -_x * _G),
}
_tanh_cubic: _Generators = {
    _T: (lambda x: torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)),
         (1 - _T**2) * _SQRT_2_PI * (1 + 3 * _K * _x**2)),
}
GENERATED: dict[str, tuple[sp.Expr, _Generators]] = {
    "tanh": (_t, {_t: (torch.tanh, 1 - _t**2)}),
    "sigmoid": (_s, _sigmoid),
    "silu": (_x * _s, _sigmoid),
    "erf": (_E, {_E: (torch.erf, 2 / sp.sqrt(sp.pi) * _G), _G: (lambda x: torch.exp(-x * x), -2 * _x * _G)}),
    "gelu": (_x / 2 * (1 + _E), _erf_half),
    "gelu_tanh": (_x / 2 * (1 + _T), _tanh_cubic),
    "sin": (_S, {_S: (torch.sin, _C), _C: (torch.cos, -_S)}),
    "cos": (_C, {_S: (torch.sin, _C), _C: (torch.cos, -_S)}),
}


def _total_derivative(expr: sp.Expr, generators: _Generators) -> sp.Expr:
    result = sp.diff(expr, _x)
    for symbol, (_, derivative) in generators.items():
        result += sp.diff(expr, symbol) * derivative
    return sp.expand(result)


@functools.cache
def derivative_functions(name: str, order: int) -> tuple[Callable[..., torch.Tensor], ...]:
    """f, f', …, f^(order) as torch functions of (x, *generators)."""
    expr, generators = GENERATED[name]
    symbols = (_x, *generators)
    functions = []
    for _ in range(order + 1):
        # Horner form: a nested chain of multiply-adds keeps two or three temporaries alive
        functions.append(sp.lambdify(symbols, sp.horner(expr) if expr.is_polynomial(*symbols) else expr,
                                     modules=[{"sqrt": math.sqrt, "pi": math.pi}]))
        expr = _total_derivative(expr, generators)
    return tuple(functions)


def derivative(name: str, x0: torch.Tensor, order: int) -> Callable[[int], torch.Tensor]:
    """j -> f^(j)(x0) as a tensor shaped like x0, for j ≤ order."""
    functions = derivative_functions(name, order)
    generator_values = [fn(x0) for fn, _ in GENERATED[name][1].values()]

    def at(j: int) -> torch.Tensor:
        value = functions[j](x0, *generator_values)
        return value if isinstance(value, torch.Tensor) else torch.full_like(x0, float(value))

    return at
