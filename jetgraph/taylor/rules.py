"""Taylor-mode rules: ``RULES[op](*args, **kwargs)`` for every op of the core op set.

Read like ``jax.experimental.jet``: families first, then one line (or one short function) per
op. A rule is called only when at least one argument is a :class:`Series`; other arguments are
constants. Dims are given for the primal; on the stacked coefficients a non-negative dim moves
one place right (negative dims are unchanged).

Families:
* linear: the op applied to all coefficients at once (views, reductions, casts, concatenation);
* zero: comparisons and other piecewise-constant ops have no higher coefficients;
* affine/bilinear: add, sub, mul, div, matmul, linear, addmm (Cauchy product when both operands
  are series);
* recurrences: exp, log, reciprocal, pow, sqrt, rsqrt (``series.py``);
* sympy-derived: tanh, sigmoid, erf, gelu (erf and tanh forms), silu, sin, cos (``elementwise.py``);
* composites: softmax, log-softmax, relu (derivatives of the active branch), masked fill, where.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from jetgraph.taylor import elementwise
from jetgraph.taylor import series as S
from jetgraph.taylor.series import Series, is_series

aten = torch.ops.aten

Rule = Callable[..., Any]
RULES: dict[Any, Rule] = {}


def _shift(dim: int) -> int:
    return dim + 1 if dim >= 0 else dim


def _arg(args: Sequence[Any], kwargs: dict[str, Any], position: int, name: str, default: Any) -> Any:
    return args[position] if len(args) > position else kwargs.get(name, default)


# ------------------------------------------------------------------------------------ families
def deflinear(op: Any, on_coeffs: Callable[..., torch.Tensor]) -> None:
    """An op linear in its first (series) argument: ``on_coeffs(coeffs, *rest)``."""

    def rule(x: Series, *args: Any, **kwargs: Any) -> Series:
        return x.with_coeffs(on_coeffs(x.coeffs, *args, **kwargs))

    RULES[op] = rule


def defzero(op: Any) -> None:
    """A piecewise-constant op: evaluate it on the primals; the result is a constant."""

    def rule(*args: Any, **kwargs: Any) -> Any:
        primal = torch.fx.node.map_aggregate(args, lambda a: a.primal if is_series(a) else a)
        return op(*primal, **kwargs)

    RULES[op] = rule


def defsympy(op: Any, name: str | Callable[..., str]) -> None:
    """An elementwise activation from sympy derivatives of its closed form."""

    def rule(x: Series, *args: Any, **kwargs: Any) -> Series:
        fname = name(*args, **kwargs) if callable(name) else name
        return S.compose(x, elementwise.derivative(fname, x.primal, x.basis.order))

    RULES[op] = rule


def defunary(op: Any, series_fn: Callable[[Series], Series]) -> None:
    RULES[op] = lambda x, *args, **kwargs: series_fn(x)


# ------------------------------------------------------------------------------------ linear
def _reshape(c: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return c.reshape(c.shape[:1] + tuple(size))


for _op in (aten.view.default, aten._unsafe_view.default, aten.reshape.default):
    deflinear(_op, _reshape)


def _expand_rule(x: Series, size: Sequence[int], implicit: bool = False) -> Series:
    coeffs = S.padded(x, len(size))
    return x.with_coeffs(coeffs.expand(coeffs.shape[:1] + tuple(size)))


RULES[aten.expand.default] = _expand_rule
deflinear(aten.permute.default, lambda c, dims: c.permute([0] + [d % (c.dim() - 1) + 1 for d in dims]))
deflinear(aten.transpose.int, lambda c, a, b: c.transpose(_shift(a), _shift(b)))
deflinear(aten.t.default, lambda c: c.transpose(-2, -1))
deflinear(aten.unsqueeze.default, lambda c, d: c.unsqueeze(_shift(d)))
deflinear(aten.squeeze.dim, lambda c, d: c.squeeze(_shift(d)))
deflinear(aten.squeeze.dims, lambda c, dims: c.squeeze(tuple(_shift(d) for d in dims)))
deflinear(aten.slice.Tensor, lambda c, dim=0, start=None, end=None, step=1:
          aten.slice.Tensor(c, _shift(dim), start, end, step))
deflinear(aten.select.int, lambda c, dim, index: c.select(_shift(dim), index))
deflinear(aten.flatten.using_ints, lambda c, start=0, end=-1: c.flatten(_shift(start), _shift(end)))
deflinear(aten.repeat_interleave.self_int, lambda c, repeats, dim=None, output_size=None:
          c.repeat_interleave(repeats, _shift(dim)))
deflinear(aten.mean.dim, lambda c, dims, keepdim=False, dtype=None:
          c.mean([_shift(d) for d in dims], keepdim=keepdim, dtype=dtype))
deflinear(aten.sum.dim_IntList, lambda c, dims, keepdim=False, dtype=None:
          c.sum([_shift(d) for d in dims], keepdim=keepdim, dtype=dtype))
deflinear(aten.sum.default, lambda c, dtype=None: c.flatten(1).sum(1, dtype=dtype))
deflinear(aten.mean.default, lambda c, dtype=None: c.flatten(1).mean(1, dtype=dtype))
deflinear(aten.neg.default, torch.neg)
deflinear(aten.contiguous.default, lambda c, memory_format=None: c.contiguous())
for _op in (aten.clone.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default):
    deflinear(_op, lambda c, *args, **kwargs: c)
deflinear(aten._to_copy.default, lambda c, dtype=None, layout=None, device=None, pin_memory=None,
          non_blocking=False, memory_format=None: c.to(dtype=dtype or c.dtype, device=device or c.device))
deflinear(aten.to.dtype, lambda c, dtype, *args, **kwargs: c.to(dtype))
deflinear(aten.to.dtype_layout, lambda c, dtype=None, layout=None, device=None, **kwargs:
          c.to(dtype=dtype or c.dtype, device=device or c.device))
deflinear(aten.to.device, lambda c, device, dtype, *args, **kwargs: c.to(device=device, dtype=dtype))
deflinear(aten.type_as.default, lambda c, other: c.to(other.dtype))
deflinear(aten.index.Tensor, lambda c, indices: aten.index.Tensor(c, [None, *indices]))
deflinear(aten.roll.default, lambda c, shifts, dims=(): c.roll(shifts, [_shift(d) for d in dims]))


def _split_rule(op: Callable[..., Any]) -> Rule:
    def rule(x: Series, size: Any, dim: int = 0) -> tuple[Series, ...]:
        return tuple(x.with_coeffs(c) for c in op(x.coeffs, size, _shift(dim)))

    return rule


RULES[aten.split.Tensor] = _split_rule(torch.split)
RULES[aten.split_with_sizes.default] = _split_rule(torch.split)
RULES[aten.chunk.default] = _split_rule(torch.chunk)
RULES[aten.unbind.int] = lambda x, dim=0: tuple(x.with_coeffs(c) for c in x.coeffs.unbind(_shift(dim)))


def _promote(values: Sequence[Any]) -> list[Series]:
    like = next(v for v in values if is_series(v))
    return [v if is_series(v) else S.constant_series(v, like.basis, like) for v in values]


RULES[aten.cat.default] = lambda tensors, dim=0: _promote(tensors)[0].with_coeffs(
    torch.cat([s.coeffs for s in _promote(tensors)], _shift(dim)))
RULES[aten.stack.default] = lambda tensors, dim=0: _promote(tensors)[0].with_coeffs(
    torch.stack([s.coeffs for s in _promote(tensors)], _shift(dim)))


def _pad_rule(x: Series, pad: Sequence[int], value: float = 0.0) -> Series:
    head = F.pad(x.coeffs[:1], list(pad), value=value)
    rest = F.pad(x.coeffs[1:], list(pad), value=0.0)
    return x.with_coeffs(torch.cat([head, rest], 0))


RULES[aten.constant_pad_nd.default] = _pad_rule


# -------------------------------------------------------------------------------- zero rules
for _op in (aten.eq.Tensor, aten.eq.Scalar, aten.ne.Tensor, aten.ne.Scalar, aten.lt.Tensor,
            aten.lt.Scalar, aten.le.Tensor, aten.le.Scalar, aten.gt.Tensor, aten.gt.Scalar,
            aten.ge.Tensor, aten.ge.Scalar, aten.sign.default, aten.floor.default, aten.ceil.default,
            aten.round.default, aten.argmax.default, aten.argmin.default, aten.logical_not.default,
            aten.isinf.default, aten.isnan.default, aten.zeros_like.default, aten.ones_like.default,
            aten.full_like.default, aten.new_zeros.default, aten.new_ones.default,
            aten.new_full.default, aten.new_empty.default, aten.empty_like.default):
    defzero(_op)
RULES[aten.sym_size.int] = lambda x, dim: x.shape[dim]
RULES[aten.sym_numel.default] = lambda x: x.shape.numel()
RULES[operator.getitem] = operator.getitem


# ---------------------------------------------------------------------------- affine/bilinear
def _add(a: Any, b: Any, alpha: float = 1.0) -> Any:
    if is_series(a) and is_series(b):
        return S.add(a, b, alpha)
    if is_series(a):
        return S.add_to_primal(a, b * alpha if alpha != 1 else b)
    return S.add_to_primal(S.scale(b, alpha) if alpha != 1 else b, a)


def _sub(a: Any, b: Any, alpha: float = 1.0) -> Any:
    return _add(a, b, -alpha)


def _mul(a: Any, b: Any) -> Any:
    if is_series(a) and is_series(b):
        return S.mul(a, b)
    return S.scale(a, b) if is_series(a) else S.scale(b, a)


def _div(a: Any, b: Any, rounding_mode: str | None = None) -> Any:
    if rounding_mode is not None:
        raise NotImplementedError("division with rounding has no Taylor rule (it is piecewise constant)")
    if not is_series(b):
        if S._in_place_ok(a, b):
            return a.with_coeffs(a.coeffs.div_(b))
        ndim = max(a.dim(), S.ndim_of(b))
        return a.with_coeffs(S.padded(a, ndim) / b)
    inverse = S.reciprocal(b)
    return S.mul(a, inverse) if is_series(a) else S.scale(inverse, a)


RULES[aten.add.Tensor] = _add
RULES[aten.add.Scalar] = _add
RULES[aten.sub.Tensor] = _sub
RULES[aten.sub.Scalar] = _sub
RULES[aten.rsub.Scalar] = lambda a, b, alpha=1: _add(S.scale(a, -alpha), b)
RULES[aten.rsub.Tensor] = lambda a, b, alpha=1: _sub(b, a, alpha)
RULES[aten.mul.Tensor] = _mul
RULES[aten.mul.Scalar] = _mul
RULES[aten.div.Tensor] = _div
RULES[aten.div.Scalar] = _div
RULES[aten.div.Tensor_mode] = _div
RULES[operator.add] = _add
RULES[operator.mul] = _mul


def _matmul(a: Any, b: Any) -> Series:
    """a @ b for ≥2-D operands, either or both series."""
    ndim = max(S.ndim_of(a), S.ndim_of(b))
    if is_series(a) and is_series(b):
        return S.bilinear(torch.matmul, a, b)
    if is_series(a):
        return a.with_coeffs(torch.matmul(S.padded(a, ndim), b))
    return b.with_coeffs(torch.matmul(a, S.padded(b, ndim)))


def _linear(x: Any, weight: Any, bias: Any = None) -> Series:
    if is_series(x) and not is_series(weight):
        out = x.with_coeffs(F.linear(x.coeffs, weight))
    else:
        transposed = weight.with_coeffs(weight.coeffs.transpose(-2, -1)) if is_series(weight) else weight.T
        out = _matmul(x, transposed)
    return out if bias is None else _add(out, bias)


def _addmm(bias: Any, a: Any, b: Any, beta: float = 1.0, alpha: float = 1.0) -> Series:
    product = _matmul(a, b)
    if alpha != 1:
        product = S.scale(product, alpha)
    return _add(product, bias, beta) if is_series(bias) else _add(product, bias * beta if beta != 1 else bias)


for _op in (aten.matmul.default, aten.mm.default, aten.bmm.default):
    RULES[_op] = _matmul
RULES[aten.linear.default] = _linear
RULES[aten.addmm.default] = _addmm
RULES[operator.matmul] = _matmul


# -------------------------------------------------------------------------------- recurrences
defunary(aten.exp.default, S.exp)
defunary(aten.log.default, S.log)
defunary(aten.reciprocal.default, S.reciprocal)
defunary(aten.rsqrt.default, lambda x: S.power(x, -0.5))
defunary(aten.sqrt.default, lambda x: S.power(x, 0.5))
RULES[aten.pow.Tensor_Scalar] = lambda x, exponent: S.power(x, float(exponent))
RULES[aten.pow.Scalar] = lambda base, x: S.exp(S.scale(x, float(torch.log(torch.tensor(float(base))))))


# ------------------------------------------------------------------------------ sympy-derived
for _op, _name in ((aten.tanh.default, "tanh"), (aten.sigmoid.default, "sigmoid"),
                   (aten.erf.default, "erf"), (aten.silu.default, "silu"),
                   (aten.sin.default, "sin"), (aten.cos.default, "cos")):
    defsympy(_op, _name)
defsympy(aten.gelu.default, lambda approximate="none": "gelu_tanh" if approximate == "tanh" else "gelu")


# --------------------------------------------------------------------------------- composites
def _relu(x: Series) -> Series:
    active = (x.primal > 0).to(x.dtype)
    return x.with_coeffs(x.coeffs * active)


def _shifted_exp(x: Series, dim: int) -> tuple[Series, Series, Series]:
    """(x − max x_0, e = exp of it, Σ e over dim): the shared part of softmax and log-softmax."""
    shifted = S.add_to_primal(x, -x.primal.amax(dim, keepdim=True).detach())
    e = S.exp(shifted)
    return shifted, e, e.with_coeffs(e.coeffs.sum(_shift(dim), keepdim=True))


def _softmax(x: Series, dim: int, *rest: Any, **kwargs: Any) -> Series:
    """softmax = e / Σ e with e = exp(x − max x_0): exp recurrence, a sum and a reciprocal."""
    _, e, total = _shifted_exp(x, dim)
    return S.mul(e, S.reciprocal(total))


def _log_softmax(x: Series, dim: int, *rest: Any, **kwargs: Any) -> Series:
    """log-softmax = (x − max x_0) − log Σ e."""
    shifted, _, total = _shifted_exp(x, dim)
    return S.add(shifted, S.log(total), -1.0)


def _masked_fill(x: Any, mask: Any, value: Any) -> Series:
    if is_series(mask) or is_series(value):
        raise NotImplementedError("masked_fill with a series mask or value has no Taylor rule")
    ndim = max(x.dim(), S.ndim_of(mask))
    coeffs = S.padded(x, ndim)
    head = coeffs[:1].masked_fill(mask, value)
    rest = coeffs[1:].masked_fill(mask, 0.0)
    rest = rest.expand((rest.shape[0], *head.shape[1:]))
    return x.with_coeffs(torch.cat([head, rest], 0))


def _where(condition: Any, a: Any, b: Any) -> Series:
    if is_series(condition):
        condition = condition.primal.bool()
    a, b = _promote([a, b])
    ndim = max(a.dim(), b.dim(), S.ndim_of(condition))
    return a.with_coeffs(torch.where(condition, S.padded(a, ndim), S.padded(b, ndim)))


defunary(aten.relu.default, _relu)
RULES[aten._softmax.default] = _softmax
RULES[aten.softmax.int] = _softmax
RULES[aten._log_softmax.default] = _log_softmax
RULES[aten.log_softmax.int] = _log_softmax
RULES[aten.masked_fill.Scalar] = _masked_fill
RULES[aten.masked_fill.Tensor] = _masked_fill
RULES[aten.where.self] = _where


def has_rule(op: Any) -> bool:
    return op in RULES
