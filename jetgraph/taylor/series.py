"""Truncated Taylor series of tensors, stacked: ``coeffs[i]`` is the coefficient of monomial i.

All coefficients of a series live in one tensor of shape [M, *shape] (M = basis size), so a
linear op (a matmul with a weight, a view, a mean) runs once on all coefficients: the
Taylor-mode cost of a linear layer is one call on an (M×) larger batch, never M calls.
Bilinear ops gather all (β, γ) coefficient pairs and run once on the stacked pairs, then
scatter-add into the output: O(M²) work in one call. Values that are not series are constants
(weights, masks, RoPE tables): their higher coefficients are zero and never materialised.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from jetgraph.taylor.basis import Basis


@dataclass
class Series:
    """A truncated Taylor series: ``coeffs`` [basis.size, *shape] in ``basis``."""

    coeffs: torch.Tensor
    basis: Basis
    # Set by the interpreter for the one op after which this value is dead and whose buffer
    # nothing else shares: that op may then update ``coeffs`` in place.
    owned: bool = field(default=False, repr=False, compare=False)

    @property
    def primal(self) -> torch.Tensor:
        return self.coeffs[0]

    @property
    def shape(self) -> torch.Size:
        return self.coeffs.shape[1:]

    @property
    def dtype(self) -> torch.dtype:
        return self.coeffs.dtype

    @property
    def device(self) -> torch.device:
        return self.coeffs.device

    def dim(self) -> int:
        return self.coeffs.dim() - 1

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def total(self) -> torch.Tensor:
        """The series evaluated at t = 1: the sum of all coefficients."""
        return self.coeffs.sum(0)

    def with_coeffs(self, coeffs: torch.Tensor) -> Series:
        return Series(coeffs, self.basis)

    def __repr__(self) -> str:
        return f"Series(shape={tuple(self.shape)}, {self.basis}, dtype={self.dtype})"


def is_series(value: object) -> bool:
    return isinstance(value, Series)


def padded(series: Series, ndim: int) -> torch.Tensor:
    """Coefficients with singleton dims after the monomial dim, so the primal has ``ndim`` dims.

    Constants broadcast right-aligned against the result and never against the monomial dim.
    """
    coeffs = series.coeffs
    missing = ndim - series.dim()
    if missing > 0:
        coeffs = coeffs.reshape(coeffs.shape[:1] + (1,) * missing + coeffs.shape[1:])
    return coeffs


def ndim_of(value: object) -> int:
    if isinstance(value, Series):
        return value.dim()
    if isinstance(value, torch.Tensor):
        return value.dim()
    return 0


def constant_series(value: torch.Tensor | float, basis: Basis, like: Series) -> Series:
    """A constant as a series: the value in coefficient 0, zeros above."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    coeffs = torch.zeros((basis.size, *value.shape), dtype=value.dtype, device=value.device)
    coeffs[0] = value
    return Series(coeffs, basis)


def _in_place_ok(series: Series, other: torch.Tensor | float | Series) -> bool:
    """Whether ``series op= other`` equals the out-of-place result (same shape and dtype)."""
    if not series.owned:
        return False
    other_value = other.coeffs[0] if isinstance(other, Series) else other
    if isinstance(other_value, torch.Tensor):
        if torch.broadcast_shapes(series.shape, other_value.shape) != series.shape:
            return False
        return torch.result_type(series.coeffs, other_value) == series.dtype
    return True


def add_to_primal(series: Series, constant: torch.Tensor | float) -> Series:
    """series + constant: only coefficient 0 changes (the shape may broadcast larger)."""
    if _in_place_ok(series, constant):
        series.coeffs[0] += constant
        return series.with_coeffs(series.coeffs)
    ndim = max(series.dim(), ndim_of(constant))
    coeffs = padded(series, ndim)
    head = coeffs[0] + constant
    rest = coeffs[1:].expand((coeffs.shape[0] - 1, *head.shape))
    return series.with_coeffs(torch.cat([head.unsqueeze(0), rest], 0))


def scale(series: Series, factor: torch.Tensor | float) -> Series:
    """series · constant (a linear op on every coefficient)."""
    if _in_place_ok(series, factor):
        return series.with_coeffs(series.coeffs.mul_(factor))
    ndim = max(series.dim(), ndim_of(factor))
    return series.with_coeffs(padded(series, ndim) * factor)


def add(a: Series, b: Series, alpha: float = 1.0) -> Series:
    if a.dim() == b.dim() and _in_place_ok(a, b):
        return a.with_coeffs(a.coeffs.add_(b.coeffs, alpha=alpha))
    if alpha == 1.0 and a.dim() == b.dim() and _in_place_ok(b, a):
        return b.with_coeffs(b.coeffs.add_(a.coeffs))
    ndim = max(a.dim(), b.dim())
    return a.with_coeffs(padded(a, ndim) + alpha * padded(b, ndim))


def bilinear(op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: Series, b: Series,
             skip_left_zero: bool = False) -> Series:
    """op(a, b) for op bilinear and batched over a leading dim: the Cauchy product.

    One call per left monomial β against all γ with |β|+|γ| ≤ k at once, so temporaries stay
    the size of one series. In one direction the γ and β+γ are contiguous ranges: slices and
    in-place adds, no gathers. ``skip_left_zero`` drops β = 0 (for a factor with zero primal).
    """
    ndim = max(a.dim(), b.dim())
    ca, cb = padded(a, ndim), padded(b, ndim)
    univariate = a.basis.directions == 1
    out = None
    for beta, (right, targets) in enumerate(a.basis.products_by_left(ca.device)):
        if skip_left_zero and beta == 0:
            continue
        count = right.numel()
        if univariate and op is torch.mul and out is not None:  # accumulate in place, no temporary
            out[beta : beta + count].addcmul_(ca[beta : beta + 1], cb[:count])
            continue
        if univariate:  # γ = 0..k-β, β+γ = β..k
            product = op(ca[beta : beta + 1], cb[:count])
        else:
            product = op(ca[beta : beta + 1], cb.index_select(0, right))
        if out is None and univariate and count == a.basis.size:
            out = product  # β = 0 covers every output coefficient: adopt it, no copy
            continue
        if out is None:
            out = product.new_zeros((a.basis.size, *product.shape[1:]))
        if univariate:
            out[beta : beta + count] += product
        else:
            out.index_add_(0, targets, product)
        del product
    if out is None:  # order 0 with skip_left_zero: the product is zero
        shape = op(ca[:1], cb[:1]).shape[1:]
        out = ca.new_zeros((a.basis.size, *shape))
    return a.with_coeffs(out)


def mul(a: Series, b: Series) -> Series:
    return bilinear(torch.mul, a, b)


def _degree_weights(basis: Basis, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    degrees = torch.tensor(basis.degrees, dtype=like.dtype, device=like.device)
    return degrees.index_select(0, index).reshape((-1,) + (1,) * (like.dim() - 1))


def _gather(coeffs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return coeffs.index_select(0, index)


def exp(x: Series) -> Series:
    """exp by the recurrence |α| y_α = Σ_{β+γ=α, β≠0} |β| x_β y_γ."""
    basis, cx = x.basis, x.coeffs
    y = torch.zeros_like(cx)
    y[0] = torch.exp(cx[0])
    for degree in range(1, basis.order + 1):
        p = basis.pair_tensors(cx.device, degree, skip_left_zero=True)
        terms = _degree_weights(basis, p.left, cx) * _gather(cx, p.left) * _gather(y, p.right)
        y.index_add_(0, p.out, terms / degree)
    return x.with_coeffs(y)


def log(x: Series) -> Series:
    """log by x·E(y) = E(x): y_α = (x_α − (1/|α|) Σ_{β,γ≠0} |γ| y_γ x_β) / x_0."""
    basis, cx = x.basis, x.coeffs
    y = torch.zeros_like(cx)
    y[0] = torch.log(cx[0])
    inverse = 1.0 / cx[0]
    for degree in range(1, basis.order + 1):
        idx = basis.indices_of_degree(degree)
        y[idx] = cx[idx]
        p = basis.pair_tensors(cx.device, degree, skip_left_zero=True, skip_right_zero=True)
        if p.out.numel():
            terms = _degree_weights(basis, p.right, cx) * _gather(cx, p.left) * _gather(y, p.right)
            y.index_add_(0, p.out, -terms / degree)
        y[idx] = y[idx] * inverse
    return x.with_coeffs(y)


def reciprocal(x: Series) -> Series:
    """1/x by x·y = 1: y_α = −y_0 Σ_{β+γ=α, β≠0} x_β y_γ."""
    basis, cx = x.basis, x.coeffs
    y = torch.zeros_like(cx)
    y[0] = 1.0 / cx[0]
    for degree in range(1, basis.order + 1):
        p = basis.pair_tensors(cx.device, degree, skip_left_zero=True)
        y.index_add_(0, p.out, _gather(cx, p.left) * _gather(y, p.right))
        idx = basis.indices_of_degree(degree)
        y[idx] = -y[idx] * y[0]
    return x.with_coeffs(y)


def power(x: Series, exponent: float) -> Series:
    """x^p. Integer p ≥ 0 by repeated products (exact at x_0 = 0); otherwise the recurrence
    |α| x_0 y_α = Σ_{β+γ=α, β≠0} (p|β| − |γ|) x_β y_γ (needs x_0 ≠ 0, as the function does)."""
    if float(exponent).is_integer() and exponent >= 0:
        n = int(exponent)
        if n == 0:
            return constant_series(torch.ones_like(x.primal), x.basis, x)
        result: Series | None = None
        base = x
        while n:
            if n & 1:
                result = base if result is None else mul(result, base)
            n >>= 1
            if n:
                base = mul(base, base)
        return result
    basis, cx = x.basis, x.coeffs
    y = torch.zeros_like(cx)
    if exponent == -0.5:  # the primal exactly as the forward computes it
        y[0] = torch.rsqrt(cx[0])
    elif exponent == 0.5:
        y[0] = torch.sqrt(cx[0])
    else:
        y[0] = torch.pow(cx[0], exponent)
    inverse = 1.0 / cx[0]
    for degree in range(1, basis.order + 1):
        p = basis.pair_tensors(cx.device, degree, skip_left_zero=True)
        weights = (exponent * _degree_weights(basis, p.left, cx) - _degree_weights(basis, p.right, cx))
        y.index_add_(0, p.out, weights * _gather(cx, p.left) * _gather(y, p.right) / degree)
        idx = basis.indices_of_degree(degree)
        y[idx] = y[idx] * inverse
    return x.with_coeffs(y)


def compose(x: Series, derivative: Callable[[int], torch.Tensor]) -> Series:
    """f(x) from f's derivatives at x_0: Σ_j f^(j)(x_0)/j! · δ^j with δ = x − x_0 (Horner).

    ``derivative(j)`` returns f^(j)(x_0); each is computed when Horner needs it and dropped
    after, so at most three series-sized buffers are live.
    """
    import math

    order = x.basis.order
    result = constant_series(derivative(order) / math.factorial(order), x.basis, x)
    if x.basis.directions == 1:
        return _compose_in_place(x, result, derivative)
    for j in range(order - 1, -1, -1):
        # δ has a zero primal: skip its β = 0 products
        result = bilinear(torch.mul, x, result, skip_left_zero=True)
        result.coeffs[0] += derivative(j) / math.factorial(j)  # a fresh buffer: safe in place
    return result


def _compose_in_place(x: Series, result: Series, derivative: Callable[[int], torch.Tensor]) -> Series:
    """Univariate Horner, r ← δ·r + c_j, in place: r_n = Σ_{β=1..n} δ_β r_{n−β} only reads lower
    coefficients, so updating n = k..1 downwards needs no second buffer."""
    import math

    delta, r = x.coeffs, result.coeffs
    for j in range(x.basis.order - 1, -1, -1):
        for n in range(x.basis.order, 0, -1):
            r[n].zero_()
            for beta in range(1, n + 1):
                r[n].addcmul_(delta[beta], r[n - beta])
        r[0] = derivative(j) / math.factorial(j)
    return result
