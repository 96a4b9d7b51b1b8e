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
RULES[aten.expand_as.default] = lambda x, other: (  # only the other's shape is read
    _expand_rule(x, tuple(other.shape)) if is_series(x) else x.expand(tuple(other.shape)))
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
deflinear(aten.flip.default, lambda c, dims: c.flip([_shift(d) for d in dims]))
deflinear(aten.cumsum.default, lambda c, dim, dtype=None: c.cumsum(_shift(dim), dtype=dtype))
deflinear(aten.tril.default, lambda c, diagonal=0: c.tril(diagonal))
deflinear(aten.triu.default, lambda c, diagonal=0: c.triu(diagonal))
deflinear(aten.diagonal.default, lambda c, offset=0, dim1=0, dim2=1:
          c.diagonal(offset, _shift(dim1), _shift(dim2)))
deflinear(aten.narrow.default, lambda c, dim, start, length: c.narrow(_shift(dim), start, length))
deflinear(aten.view_as.default, lambda c, other: c.reshape(c.shape[:1] + tuple(other.shape)))
deflinear(aten.unflatten.int, lambda c, dim, sizes: c.unflatten(_shift(dim), sizes))
deflinear(aten.view_as_complex.default, lambda c: torch.view_as_complex(c.contiguous()))
deflinear(aten.view_as_real.default, torch.view_as_real)
deflinear(aten.real.default, torch.real)
deflinear(aten.imag.default, torch.imag)


def _repeat(x: Series, repeats: Sequence[int]) -> Series:
    """``repeat`` may prepend dims: pad the primal's dims first, never the monomial dim."""
    return x.with_coeffs(S.padded(x, len(repeats)).repeat([1, *repeats]))


RULES[aten.repeat.default] = _repeat


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
RULES[aten.concat.default] = RULES[aten.cat.default]
RULES[aten.concatenate.default] = RULES[aten.cat.default]
RULES[aten.stack.default] = lambda tensors, dim=0: _promote(tensors)[0].with_coeffs(
    torch.stack([s.coeffs for s in _promote(tensors)], _shift(dim)))


def _pad_rule(x: Series, pad: Sequence[int], value: float = 0.0) -> Series:
    head = F.pad(x.coeffs[:1], list(pad), value=value)
    rest = F.pad(x.coeffs[1:], list(pad), value=0.0)
    return x.with_coeffs(torch.cat([head, rest], 0))


RULES[aten.constant_pad_nd.default] = _pad_rule


def _pad(x: Series, pad: Sequence[int], mode: str = "constant", value: float | None = None) -> Series:
    """``F.pad``: constant padding puts the value in the primal only; reflect, replicate and
    circular padding are linear (the monomial dim folded into the batch dim, which they keep)."""
    if mode == "constant":
        return _pad_rule(x, pad, 0.0 if value is None else value)
    coeffs = x.coeffs
    out = F.pad(coeffs.reshape(-1, *coeffs.shape[2:]), list(pad), mode=mode)
    return x.with_coeffs(out.reshape(coeffs.shape[0], coeffs.shape[1], *out.shape[1:]))


RULES[aten.pad.default] = _pad


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


def _einsum(equation: str, operands: Sequence[Any], path: Any = None) -> Series:
    """einsum with one or two series operands: a fresh label carries the monomial dim (in the
    output, and in each series operand; two series operands form a Cauchy product)."""
    series = [i for i, o in enumerate(operands) if is_series(o)]
    if len(series) > 2:
        raise NotImplementedError("einsum with more than two series operands has no Taylor rule")
    inputs, arrow, output = equation.replace(" ", "").partition("->")
    terms = inputs.split(",")
    if not arrow:  # implicit output: labels used once, sorted
        output = "".join(sorted(c for c in set(inputs) if c.isalpha() and inputs.count(c) == 1))
    label = next(c for c in "zyxwvutsrqponmlkjihgfedcbaZYXWVUTSRQPONMLKJIHGFEDCBA" if c not in equation)
    marked = ",".join(label + t if i in series else t for i, t in enumerate(terms)) + "->" + label + output
    if len(series) == 1:
        (i,) = series
        args = [o.coeffs if j == i else o for j, o in enumerate(operands)]
        return operands[i].with_coeffs(torch.einsum(marked, *args))
    first, second = series

    shapes = {first: tuple(operands[first].shape), second: tuple(operands[second].shape)}

    def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        size = max(a.shape[0], b.shape[0])  # bilinear pads both to one ndim: undo that first
        args = list(operands)
        args[first] = a.reshape(a.shape[0], *shapes[first]).expand(size, *shapes[first])
        args[second] = b.reshape(b.shape[0], *shapes[second]).expand(size, *shapes[second])
        return torch.einsum(marked, *args)

    return S.bilinear(product, operands[first], operands[second])


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


def _baddbmm(bias: Any, a: Any, b: Any, beta: float = 1.0, alpha: float = 1.0) -> Any:
    """beta·bias + alpha·(a @ b) (BLOOM's ALiBi scores)."""
    product = _matmul(a, b) if is_series(a) or is_series(b) else torch.matmul(a, b)
    if alpha != 1:
        product = S.scale(product, alpha) if is_series(product) else product * alpha
    if beta == 0:
        return product
    return _add(product, S.scale(bias, beta) if is_series(bias) else bias * beta)


def _convolution(op: Callable[..., torch.Tensor]) -> Rule:
    """A convolution, linear in its input: all coefficients run as one batch (the monomial dim
    folded into the batch dim; an unbatched input uses it as the batch), the bias on the primal."""

    def rule(x: Series, weight: Any, bias: Any = None, *rest: Any) -> Series:
        if is_series(weight) or is_series(bias):
            raise NotImplementedError("a convolution with a series weight or bias has no Taylor rule")
        coeffs = x.coeffs
        batched = x.dim() == weight.dim()
        flat = coeffs.reshape(-1, *coeffs.shape[2:]) if batched else coeffs
        out = op(flat, weight, None, *rest)
        out = out.reshape(coeffs.shape[0], *x.shape[:1], *out.shape[1:]) if batched else out
        result = x.with_coeffs(out)
        if bias is None:
            return result
        view = [1] * (out.dim() - 1)
        view[1 if batched else 0] = -1
        return S.add_to_primal(result, bias.reshape(view))

    return rule


for _op in (aten.matmul.default, aten.mm.default, aten.bmm.default):
    RULES[_op] = _matmul
RULES[aten.linear.default] = _linear
RULES[aten.einsum.default] = _einsum
RULES[aten.addmm.default] = _addmm
RULES[aten.baddbmm.default] = _baddbmm
RULES[aten.conv1d.default] = _convolution(aten.conv1d.default)
RULES[aten.conv2d.default] = _convolution(aten.conv2d.default)
RULES[aten.conv1d.padding] = _convolution(aten.conv1d.padding)
RULES[aten.convolution.default] = _convolution(aten.convolution.default)
RULES[operator.matmul] = _matmul


# -------------------------------------------------------------------------------- recurrences
defunary(aten.exp.default, S.exp)
defunary(aten.log.default, S.log)
defunary(aten.reciprocal.default, S.reciprocal)
defunary(aten.rsqrt.default, lambda x: S.power(x, -0.5))
defunary(aten.sqrt.default, lambda x: S.power(x, 0.5))
RULES[aten.pow.Tensor_Scalar] = lambda x, exponent: S.power(x, float(exponent))
RULES[aten.pow.Scalar] = lambda base, x: S.exp(S.scale(x, float(torch.log(torch.tensor(float(base))))))
defunary(aten.square.default, lambda x: S.mul(x, x))
defunary(aten.expm1.default, lambda x: S.add_to_primal(S.exp(x), -1.0))
defunary(aten.log1p.default, lambda x: S.log(S.add_to_primal(x, 1.0)))


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


def _logsumexp(x: Series, dims: Sequence[int] | int, keepdim: bool = False) -> Series:
    """log Σ exp(x) = m + log Σ exp(x − m), m the primal's maximum (a constant of the jet)."""
    dims = [dims] if isinstance(dims, int) else list(dims)
    peak = x.primal.amax(dims, keepdim=True).detach()
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    e = S.exp(S.add_to_primal(x, -peak))
    total = e.with_coeffs(e.coeffs.sum([_shift(d) for d in dims], keepdim=True))
    out = S.add_to_primal(S.log(total), peak)
    return out if keepdim else out.with_coeffs(out.coeffs.squeeze([_shift(d % x.dim()) for d in dims]))


def _softplus(x: Series, beta: float = 1.0, threshold: float = 20.0) -> Series:
    """softplus(βx)/β in the stable form relu(y) + log(1 + exp(−|y|)), y = βx (nothing
    overflows); where βx > threshold torch returns x itself, and so does the rule."""
    x = x.with_coeffs(x.coeffs)  # x is read again below: no op may update it in place
    y = S.scale(x, beta) if beta != 1 else x
    sign = torch.sign(y.primal)
    decaying = S.exp(S.scale(y, -sign))  # exp(−|y|) ≤ 1
    smooth = S.add(_relu(y), S.log(S.add_to_primal(decaying, 1.0)))
    smooth = S.scale(smooth, 1.0 / beta) if beta != 1 else smooth
    linear = (x.primal * beta > threshold).unsqueeze(0)
    return x.with_coeffs(torch.where(linear, x.coeffs, S.padded(smooth, x.dim())))


def _log_sigmoid(x: Series) -> Series:
    """log σ(x) = −softplus(−x)."""
    return S.scale(_softplus(S.scale(x, -1.0), threshold=float("inf")), -1.0)


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
RULES[aten.where.ScalarOther] = _where
RULES[aten.where.ScalarSelf] = _where
RULES[aten.logsumexp.default] = _logsumexp
RULES[aten.softplus.default] = _softplus
defunary(aten.log_sigmoid.default, _log_sigmoid)
RULES[aten.log_sigmoid_forward.default] = lambda x: (_log_sigmoid(x), torch.zeros_like(x.primal))


# Rules for ops of other libraries, by qualified name: such an op exists only once its
# library registered it (transformers' MoE kernels), after jetgraph may have been imported.
LIBRARY_RULES: dict[str, Rule] = {}


def _grouped_mm(x: Series, weight: Any, offsets: torch.Tensor) -> Series:
    """transformers' grouped matmul (MoE experts): each row block times its expert's weight;
    linear in the rows, so each coefficient is one call."""
    if is_series(weight):
        raise NotImplementedError("a grouped matmul with a series weight has no Taylor rule")
    op = torch.ops.transformers.grouped_mm_fallback.default
    return x.with_coeffs(torch.stack([op(c, weight, offsets) for c in x.coeffs]))


LIBRARY_RULES["transformers::grouped_mm_fallback"] = _grouped_mm


def _aten_grouped_mm(x: Series, weight: Any, offs: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> Series:
    """torch's grouped matmul (MoE experts in bf16): linear in the rows for a constant weight, so
    each coefficient is one call."""
    if is_series(weight) or bias is not None:
        raise NotImplementedError("a grouped matmul with a series weight or a bias has no Taylor rule")
    return x.with_coeffs(torch.stack([_grouped_matmul(c, weight, offs, out_dtype) for c in x.coeffs]))


def _grouped_matmul(rows: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor | None,
                    out_dtype: torch.dtype | None) -> torch.Tensor:
    """aten._grouped_mm, or for dtypes its kernels do not take (the float64 oracle) the same
    product group by group: rows[offs[g-1]:offs[g]] @ weight[g]."""
    if rows.dtype in (torch.float32, torch.bfloat16, torch.float16) and weight.dtype == rows.dtype:
        return aten._grouped_mm.default(rows, weight, offs, None, out_dtype)
    if rows.dim() != 2 or weight.dim() != 3 or offs is None:
        raise NotImplementedError(f"grouped matmul of {rows.dim()}-d rows and a {weight.dim()}-d weight in "
                                  f"{rows.dtype}: only 2-d rows and 3-d weights with offsets have a rule")
    ends = offs.tolist()
    starts = [0, *ends[:-1]]
    out = rows.new_zeros(rows.shape[0], weight.shape[-1])
    for group, (start, end) in enumerate(zip(starts, ends, strict=True)):
        out[start:end] = rows[start:end] @ weight[group].to(rows.dtype)
    return out if out_dtype is None else out.to(out_dtype)


if hasattr(aten, "_grouped_mm"):
    RULES[aten._grouped_mm.default] = _aten_grouped_mm


def rule_for(op: Any) -> Rule | None:
    """The rule for ``op``: :data:`RULES`, else :data:`LIBRARY_RULES` by the op's name."""
    rule = RULES.get(op)
    if rule is None and isinstance(op, torch._ops.OpOverload):
        rule = LIBRARY_RULES.get(op._schema.name)
    return rule


def has_rule(op: Any) -> bool:
    return rule_for(op) is not None


# selections, routing and writes (topk, max, clamp, scatters …) register themselves
from jetgraph.taylor import selection as _selection  # noqa: E402,F401
