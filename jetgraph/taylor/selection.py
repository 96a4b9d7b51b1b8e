"""Taylor rules for ops that choose, route or write entries.

* **Selections** (``max``/``min`` over a dim or elementwise, ``topk``, ``sort``, ``clamp``,
  ``abs``): piecewise constant in *which* entry is chosen. The choice is made once on the primal
  (coefficient 0) and is a constant of the jet; the chosen entries carry their whole series.
  This is exact wherever the choice does not change in a neighbourhood of the centre (no ties),
  which is what a jet means for a router: MoE ``topk`` indices are the routing decision at the
  centre.
* **Writes** (``copy``, ``slice_scatter``, ``select_scatter``, ``index_put``, ``index_add``,
  ``scatter``): jointly linear in the written tensor and the values, so they act on every
  coefficient at once (a constant operand is promoted to a series with zero higher terms).
* **Gathers** (``gather``, ``index_select``): linear, indices constant.

Dims are the primal's; on stacked coefficients a non-negative dim moves one place right.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from jetgraph.taylor import series as S
from jetgraph.taylor.rules import RULES, _promote, _shift, _where, deflinear, defzero
from jetgraph.taylor.series import Series, is_series

aten = torch.ops.aten


def _expanded_index(x: Series, index: torch.Tensor) -> torch.Tensor:
    """``index`` repeated over the monomial dim, for gather/scatter on stacked coefficients."""
    return index.unsqueeze(0).expand((x.coeffs.shape[0], *index.shape))


def take(x: Series, dim: int, index: torch.Tensor) -> Series:
    """The entries of ``x`` at ``index`` along ``dim`` (``torch.gather``), whole series each."""
    return x.with_coeffs(x.coeffs.gather(_shift(dim), _expanded_index(x, index)))


# ------------------------------------------------------------------------------- selections
def _extremum_dim(largest: bool):
    def rule(x: Series, dim: int, keepdim: bool = False) -> tuple[Series, torch.Tensor]:
        reduced = x.primal.max(dim, keepdim=True) if largest else x.primal.min(dim, keepdim=True)
        values = take(x, dim, reduced.indices)
        if not keepdim:
            values = values.with_coeffs(values.coeffs.squeeze(_shift(dim)))
            return values, reduced.indices.squeeze(dim)
        return values, reduced.indices

    return rule


def _extremum(largest: bool):
    """amax/amin over dims (all dims by default) and max/min of a whole tensor."""

    def rule(x: Series, dims: Sequence[int] | int = (), keepdim: bool = False) -> Series:
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = sorted(d % x.dim() for d in dims) if dims else list(range(x.dim()))
        kept = [d for d in range(x.dim()) if d not in dims]
        order = [0] + [_shift(d) for d in kept] + [_shift(d) for d in dims]
        moved = x.coeffs.permute(order)
        flat = moved.reshape(*moved.shape[: 1 + len(kept)], -1)
        primal = flat[0]
        index = (primal.argmax(-1) if largest else primal.argmin(-1)).unsqueeze(-1)
        values = flat.gather(-1, index.unsqueeze(0).expand((flat.shape[0], *index.shape))).squeeze(-1)
        if keepdim:
            shape = [1 if d in dims else x.shape[d] for d in range(x.dim())]
            values = values.reshape(values.shape[0], *shape)
        return x.with_coeffs(values)

    return rule


def _topk(x: Series, k: int, dim: int = -1, largest: bool = True,
          sorted: bool = True) -> tuple[Series, torch.Tensor]:
    indices = x.primal.topk(k, dim, largest, sorted).indices
    return take(x, dim, indices), indices


def _sort(x: Series, dim: int = -1, descending: bool = False,
          stable: bool | None = None) -> tuple[Series, torch.Tensor]:
    indices = x.primal.sort(dim=dim, descending=descending, stable=bool(stable)).indices
    return take(x, dim, indices), indices


def _sort_stable(x: Series, *, stable: bool | None = None, dim: int = -1,
                 descending: bool = False) -> tuple[Series, torch.Tensor]:
    return _sort(x, dim, descending, stable)


def _pick(largest: bool):
    """Elementwise maximum/minimum: the series of the operand chosen at the primal (ties: the first)."""

    def rule(a: Any, b: Any) -> Series:
        a_value = a.primal if is_series(a) else torch.as_tensor(a)
        b_value = b.primal if is_series(b) else torch.as_tensor(b)
        first = a_value >= b_value if largest else a_value <= b_value
        return _where(first, a, b)

    return rule


def _clamp(x: Series, min: Any = None, max: Any = None) -> Series:
    """Inside the bounds the series passes; outside, the bound (a constant)."""
    if is_series(min) or is_series(max):
        result = x
        if min is not None:
            result = _pick(True)(result, min)
        if max is not None:
            result = _pick(False)(result, max)
        return result
    primal = x.primal
    inside = torch.ones_like(primal, dtype=torch.bool)
    if min is not None:
        inside = inside & (primal >= min)
    if max is not None:
        inside = inside & (primal <= max)
    head = primal.clamp(min, max)
    rest = x.coeffs[1:] * inside.to(x.dtype)
    return x.with_coeffs(torch.cat([head.unsqueeze(0), rest], 0))


def _abs(x: Series) -> Series:
    return S.scale(x, torch.sign(x.primal))


for _op, _largest in ((aten.max.dim, True), (aten.min.dim, False)):
    RULES[_op] = _extremum_dim(_largest)
for _op, _largest in ((aten.amax.default, True), (aten.amin.default, False)):
    RULES[_op] = _extremum(_largest)
RULES[aten.max.default] = _extremum(True)
RULES[aten.min.default] = _extremum(False)
for _op, _largest in ((aten.maximum.default, True), (aten.max.other, True), (aten.fmax.default, True),
                      (aten.minimum.default, False), (aten.min.other, False), (aten.fmin.default, False)):
    RULES[_op] = _pick(_largest)
RULES[aten.topk.default] = _topk
RULES[aten.sort.default] = _sort
RULES[aten.sort.stable] = _sort_stable
RULES[aten.clamp.default] = _clamp
RULES[aten.clamp.Tensor] = _clamp
RULES[aten.clamp_min.default] = lambda x, min: _clamp(x, min, None)
RULES[aten.clamp_max.default] = lambda x, max: _clamp(x, None, max)
RULES[aten.abs.default] = _abs
for _op in (aten.argsort.default, aten.argsort.stable, aten.fill.Scalar, aten.fill.Tensor,
            aten.zero.default):
    defzero(_op)


# ---------------------------------------------------------------------------------- gathers
RULES[aten.gather.default] = lambda x, dim, index, sparse_grad=False: take(x, dim, index)
deflinear(aten.index_select.default, lambda c, dim, index: c.index_select(_shift(dim), index))


# ----------------------------------------------------------------------------------- writes
def _copy(target: Any, source: Any, non_blocking: bool = False) -> Any:
    """``copy(self, src)``: src broadcast to self's shape and dtype; self's values are gone."""
    shape, dtype = (target.shape, target.dtype)
    if not is_series(source):
        return torch.broadcast_to(torch.as_tensor(source), shape).to(dtype)
    coeffs = S.padded(source, len(shape))
    return source.with_coeffs(coeffs.expand((coeffs.shape[0], *shape)).to(dtype))


def _slice_scatter(target: Any, source: Any, dim: int = 0, start: Any = None, end: Any = None,
                   step: int = 1) -> Series:
    a, b = _promote([target, source])
    return a.with_coeffs(aten.slice_scatter.default(a.coeffs, b.coeffs, _shift(dim), start, end, step))


def _select_scatter(target: Any, source: Any, dim: int, index: int) -> Series:
    a, b = _promote([target, source])
    return a.with_coeffs(aten.select_scatter.default(a.coeffs, b.coeffs, _shift(dim), index))


def _diagonal_scatter(target: Any, source: Any, offset: int = 0, dim1: int = 0, dim2: int = 1) -> Series:
    a, b = _promote([target, source])
    coeffs = aten.diagonal_scatter.default(a.coeffs, b.coeffs, offset, _shift(dim1), _shift(dim2))
    return a.with_coeffs(coeffs)


def _index_put(target: Any, indices: Sequence[Any], values: Any, accumulate: bool = False) -> Series:
    """``target[indices] = values`` (or ``+=``); the indexed dims must be adjacent, as in every
    capture met so far (a leading monomial dim keeps them in place)."""
    indices = list(indices)
    used = [i for i, index in enumerate(indices) if index is not None]
    if used and used != list(range(used[0], used[-1] + 1)):
        raise NotImplementedError("index_put with non-adjacent index tensors has no Taylor rule")
    a, b = _promote([target, values])
    indexed = aten.index.Tensor(a.primal, indices)
    return a.with_coeffs(aten.index_put.default(a.coeffs, [None, *indices], S.padded(b, indexed.dim()),
                                                accumulate))


def _index_add(target: Any, dim: int, index: torch.Tensor, source: Any, alpha: float = 1) -> Series:
    a, b = _promote([target, source])
    return a.with_coeffs(a.coeffs.index_add(_shift(dim), index, S.padded(b, a.dim()), alpha=alpha))


def _scatter_src(target: Any, dim: int, index: torch.Tensor, source: Any) -> Series:
    a, b = _promote([target, source])
    return a.with_coeffs(a.coeffs.scatter(_shift(dim), _expanded_index(a, index), b.coeffs))


def _scatter_add(target: Any, dim: int, index: torch.Tensor, source: Any) -> Series:
    a, b = _promote([target, source])
    return a.with_coeffs(a.coeffs.scatter_add(_shift(dim), _expanded_index(a, index), b.coeffs))


def _scatter_value(target: Series, dim: int, index: torch.Tensor, value: Any) -> Series:
    head = target.primal.scatter(dim, index, value)
    rest = target.coeffs[1:].scatter(_shift(dim), _expanded_index(target, index)[1:], 0.0)
    return target.with_coeffs(torch.cat([head.unsqueeze(0), rest], 0))


RULES[aten.copy.default] = _copy
RULES[aten.slice_scatter.default] = _slice_scatter
RULES[aten.select_scatter.default] = _select_scatter
RULES[aten.diagonal_scatter.default] = _diagonal_scatter
RULES[aten.index_put.default] = _index_put
RULES[aten.index_add.default] = _index_add
RULES[aten.scatter.src] = _scatter_src
RULES[aten.scatter.value] = _scatter_value
RULES[aten.scatter_add.default] = _scatter_add
