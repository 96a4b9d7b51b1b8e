"""``jetgraph.jet``: exact truncated Taylor expansions of captured functions.

For f, a centre c and a direction v = variate − c (or several directions v_1..v_m), returns the
normalised Taylor coefficients f_α = ∂^α f(c)[v^α]/α! for |α| ≤ k, computed in one Taylor-mode
pass. Their sum is the jet J^k f(c)(variate) (or J^k f(c)(c + Σ v_i)).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from jetgraph.ir import StreamFunction
from jetgraph.taylor.basis import Basis, check_order
from jetgraph.taylor.interpreter import run_series
from jetgraph.taylor.series import Series


@dataclass
class Jet:
    """Taylor coefficients of f at a centre: ``coefficients[i]`` belongs to ``monomials[i]``."""

    coefficients: torch.Tensor
    basis: Basis

    @property
    def order(self) -> int:
        return self.basis.order

    @property
    def monomials(self) -> tuple[tuple[int, ...], ...]:
        return self.basis.monomials

    @property
    def primal(self) -> torch.Tensor:
        """f(centre): the order-0 coefficient."""
        return self.coefficients[0]

    @property
    def value(self) -> torch.Tensor:
        """The jet evaluated at the variate: the sum of all coefficients."""
        return self.coefficients.sum(0)

    def by_order(self) -> torch.Tensor:
        """[k+1, *shape]: the sum of the coefficients of each total degree."""
        out = self.coefficients.new_zeros((self.order + 1, *self.coefficients.shape[1:]))
        degrees = torch.tensor(self.basis.degrees, device=out.device)
        return out.index_add_(0, degrees, self.coefficients)

    def coefficient(self, monomial: int | Sequence[int]) -> torch.Tensor:
        """The coefficient of one monomial: an order (univariate) or a multi-index."""
        key = (monomial,) if isinstance(monomial, int) else tuple(monomial)
        return self.coefficients[self.basis.index[key]]


def jet(
    f: Callable[..., torch.Tensor] | StreamFunction | fx.GraphModule,
    center: torch.Tensor,
    variate: torch.Tensor | None = None,
    order: int = 1,
    directions: Sequence[torch.Tensor] | None = None,
    *,
    increment: bool = False,
    side: Mapping[str, torch.Tensor] | None = None,
) -> Jet:
    """The order-``order`` jet of ``f`` at ``center``.

    ``f`` is a residual unit or decoder (a :class:`StreamFunction`), an FX GraphModule taking one
    tensor, or any callable that ``torch.export`` can trace on ``center``. ``variate`` is the
    evaluation point (the direction is ``variate − center``) or, with ``increment=True``, the
    direction itself. ``directions`` (a list of increments) gives a multivariate jet with one
    coefficient per monomial of total degree ≤ ``order``.
    """
    check_order(order)
    if not isinstance(center, torch.Tensor) or not center.is_floating_point():
        raise TypeError(f"center must be a floating-point tensor, got {type(center).__name__}")
    if directions is None:
        if variate is None:
            raise ValueError("give a variate (evaluation point or increment) or a list of directions")
        if not isinstance(variate, torch.Tensor) or variate.shape != center.shape:
            shape = tuple(variate.shape) if isinstance(variate, torch.Tensor) else type(variate).__name__
            raise ValueError(f"variate has shape {shape}, expected the centre's {tuple(center.shape)}")
        increments = [variate if increment else variate - center]
    else:
        if variate is not None:
            raise ValueError("give either a variate or directions, not both")
        if len(directions) == 0:
            raise ValueError("directions must hold at least one tensor")
        increments = list(directions)
    for i, v in enumerate(increments):
        if not isinstance(v, torch.Tensor) or v.shape != center.shape:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"direction {i} has shape {shape}, expected the centre's {tuple(center.shape)}")
    basis = Basis(len(increments), order)
    module, extra = _graph_and_side_inputs(f, center, side)
    if order == 0:  # J^0 f(c) = f(c): run the graph itself, bit-identical to the forward
        return Jet(module(center, *extra).unsqueeze(0), basis)
    coeffs = center.new_zeros((basis.size, *center.shape))
    coeffs[0] = center
    for i, v in enumerate(increments):
        coeffs[basis.unit(i)] = v.to(center.dtype)
    out = run_series(module, Series(coeffs, basis), *extra)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, Series):  # f does not depend on its input: a constant jet
        constant = torch.zeros((basis.size, *out.shape), dtype=out.dtype, device=out.device)
        constant[0] = out
        return Jet(constant, basis)
    return Jet(out.coeffs, basis)


def _graph_and_side_inputs(f, center, side):
    if isinstance(f, StreamFunction):
        if f.side_inputs:
            values = side if side is not None else f.side.for_shape(center.shape[0], center.shape[1],
                                                                     center.device)
            return f.graph_module, [values[name] for name in f.side_inputs]
        return f.graph_module, []
    if isinstance(f, fx.GraphModule):
        return f, []
    return trace_callable(f, center), []


def trace_callable(f: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor) -> fx.GraphModule:
    """Capture a tensor -> tensor callable into a core-op GraphModule (cached per callable)."""
    key = (id(f), tuple(example.shape), example.dtype)
    cached = _traced.get(key)
    if cached is not None and cached[0] is f:
        return cached[1]
    from jetgraph.taylor.lowering import core_module

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = f if isinstance(f, nn.Module) else None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.f or f)(x)

    exported = torch.export.export(Wrapper(), (example,), strict=False)
    module = core_module(exported)
    _traced[key] = (f, module)
    return module


_traced: dict[tuple, tuple[object, fx.GraphModule]] = {}
