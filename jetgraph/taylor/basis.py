"""Monomial bases of truncated Taylor polynomials and their product tables.

A series in m directions truncated at total degree k has one coefficient per monomial
t^α = t_1^α_1 ⋯ t_m^α_m with |α| ≤ k; the univariate case is m = 1. Coefficients are the
*normalised* Taylor coefficients f_α = ∂^α f[v^α] / α!, so the jet evaluated at t = 1 is the plain
sum of coefficients and products are Cauchy products: (uv)_α = Σ_{β+γ=α} u_β v_γ.

Recurrences for exp, log, reciprocal and pow use the Euler operator E = Σ t_i ∂/∂t_i, which
multiplies a monomial by its degree |α|: E(exp x) = exp(x)·E(x) gives
|α| y_α = Σ_{β+γ=α, β≠0} |β| x_β y_γ. The same formula serves one direction or many.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

from jetgraph.padding import recording

MAX_ORDER = 18
"""The highest Taylor order jetgraph computes: the symbolic derivatives of tanh, silu and gelu
have integer coefficients beyond int64 from order 20 on (measured: order 20 overflows, 18 runs)."""


def check_order(order: object, what: str = "order") -> int:
    """``order`` as an int in 0..MAX_ORDER, or a ValueError that says what is supported."""
    if not isinstance(order, int) or isinstance(order, bool) or order < 0:
        raise ValueError(f"{what} must be a non-negative int, got {order!r}")
    if order > MAX_ORDER:
        raise ValueError(f"{what} {order} is above the highest supported order {MAX_ORDER}: the "
                         "activations' symbolic derivatives overflow int64 past it")
    return order

@dataclass(frozen=True)
class Pairs:
    """Index triples (β, γ, β+γ) of a product table, as long tensors."""

    left: torch.Tensor
    right: torch.Tensor
    out: torch.Tensor


class Basis:
    """Monomials of total degree ≤ ``order`` in ``directions`` variables, sorted by degree."""

    def __init__(self, directions: int, order: int) -> None:
        if directions < 1 or order < 0:
            raise ValueError(f"need directions >= 1 and order >= 0, got {directions}, {order}")
        self.directions = directions
        self.order = order
        monomials = []  # every alpha with |alpha| <= order, made degree by degree (not from the
        for degree in range(order + 1):  # (order+1)^directions grid: 33 directions are 2^33 there)
            for chosen in itertools.combinations_with_replacement(range(directions), degree):
                alpha = [0] * directions
                for direction in chosen:
                    alpha[direction] += 1
                monomials.append(tuple(alpha))
        monomials.sort(key=lambda alpha: (sum(alpha), tuple(-a for a in alpha)))
        self.monomials: tuple[tuple[int, ...], ...] = tuple(monomials)
        self.index = {alpha: i for i, alpha in enumerate(self.monomials)}
        self.degrees: tuple[int, ...] = tuple(sum(alpha) for alpha in self.monomials)

    @property
    def size(self) -> int:
        return len(self.monomials)

    def __repr__(self) -> str:
        return f"Basis(directions={self.directions}, order={self.order}, size={self.size})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Basis) and (self.directions, self.order) == (other.directions, other.order)

    def __hash__(self) -> int:
        return hash((self.directions, self.order))

    def unit(self, direction: int) -> int:
        """Index of the degree-1 monomial t_direction."""
        alpha = tuple(1 if i == direction else 0 for i in range(self.directions))
        return self.index[alpha]

    def indices_of_degree(self, degree: int) -> list[int]:
        return [i for i, d in enumerate(self.degrees) if d == degree]

    @functools.cache  # noqa: B019 - bases are few and live for the process
    def pairs(self, out_degree: int | None = None, skip_left_zero: bool = False,
              skip_right_zero: bool = False) -> tuple[list[int], list[int], list[int]]:
        """(β, γ, β+γ) index lists of the product table, optionally for one output degree."""
        left, right, out = [], [], []
        for i, beta in enumerate(self.monomials):
            if skip_left_zero and i == 0:
                continue
            for j, gamma in enumerate(self.monomials):
                if skip_right_zero and j == 0:
                    continue
                degree = self.degrees[i] + self.degrees[j]
                if degree > self.order or (out_degree is not None and degree != out_degree):
                    continue
                alpha = tuple(b + g for b, g in zip(beta, gamma, strict=True))
                left.append(i)
                right.append(j)
                out.append(self.index[alpha])
        return left, right, out

    def products_by_left(self, device: torch.device) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """For each left monomial β: (indices γ with |β|+|γ| ≤ k, indices of β+γ)."""
        if recording():  # index tables made under a tracer are never cached
            return _products_by_left.__wrapped__(self, str(device))
        return _products_by_left(self, str(device))

    def pair_tensors(self, device: torch.device, out_degree: int | None = None,
                     skip_left_zero: bool = False, skip_right_zero: bool = False) -> Pairs:
        if recording():  # index tables made under a tracer are never cached
            return _pair_tensors.__wrapped__(self, str(device), out_degree, skip_left_zero, skip_right_zero)
        return _pair_tensors(self, str(device), out_degree, skip_left_zero, skip_right_zero)


@functools.cache
def _pair_tensors(basis: Basis, device: str, out_degree: int | None, skip_left_zero: bool,
                  skip_right_zero: bool) -> Pairs:
    left, right, out = basis.pairs(out_degree, skip_left_zero, skip_right_zero)
    as_tensor = functools.partial(torch.tensor, dtype=torch.long, device=device)
    return Pairs(as_tensor(left), as_tensor(right), as_tensor(out))


@functools.cache
def _products_by_left(basis: Basis, device: str) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    result = []
    for i, beta in enumerate(basis.monomials):
        right, out = [], []
        for j, gamma in enumerate(basis.monomials):
            if basis.degrees[i] + basis.degrees[j] <= basis.order:
                right.append(j)
                out.append(basis.index[tuple(b + g for b, g in zip(beta, gamma, strict=True))])
        as_tensor = functools.partial(torch.tensor, dtype=torch.long, device=device)
        result.append((as_tensor(right), as_tensor(out)))
    return tuple(result)
