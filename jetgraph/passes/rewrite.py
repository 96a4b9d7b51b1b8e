"""Algorithm 1: rewrite one residual unit (or the decoder) into its jet expansion around centres.

Expanding unit ℓ with centres c_i (sub-streams whose sum is the stream h the unit reads) and
weights w_i gives the terms w_i · J^k γ_ℓ(c_i)(h) — one term per degree j ≤ k, the j-th Taylor
coefficient along h − c_i — plus the skip branch: the centres themselves (``identity="pass"``)
or w_i · J^k id(c_i)(h) (``identity="jet"``, the paper's code). The terms of one expansion are
the centres of the next, so :func:`expand_stream` iterates it over every unit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from jetgraph.errors import CostError
from jetgraph.ir import ResidualProgram
from jetgraph.passes.expansion import Expansion
from jetgraph.passes.fit import fit_weights
from jetgraph.passes.terms import Term, Weight, source_terms
from jetgraph.taylor import Basis, check_order

Identity = Literal["pass", "jet"]


def expand(
    prog: ResidualProgram,
    unit: int | str,
    centers: Sequence[Term] | Expansion,
    order: int = 0,
    weights: str | float | torch.Tensor = "uniform",
    identity: Identity = "pass",
    *,
    split: bool = False,
    fit_on: torch.Tensor | None = None,
    fit_steps: int = 100,
    fit_lr: float = 1e-2,
) -> Expansion:
    """Algorithm 1: expand ``unit`` of ``prog`` (an index of ``prog.units``, or ``"decoder"`` /
    ``len(prog.units)`` for the decoder) around ``centers`` at order ``order``.

    ``weights``: ``"uniform"`` (1/N), ``"unit"`` (1), a float, or a tensor with one leading entry
    per centre whose rest broadcasts against a term [batch, seq, d] from the right: [N] scalars,
    [N, seq, 1] per position, [N, d] per coordinate, [N, batch, seq, d] in full. ``"fit"``
    fits per-token softmax weights on ``fit_on`` (input ids) with Adam, minimising the
    logit-space remainder ‖U·r‖² (‖r‖² for the decoder); the loss curve is ``fit_losses``.

    ``split=True`` splits each centre's jet by direction: one term per monomial of degree ≤ k
    in the *other* centres (multivariate), N·C(N−1+k, k) terms instead of N·(k+1). Their sum is
    the jet at the sum of the centres, which is the stream when the centres add up to it.
    """
    if weights == "fit":
        if fit_on is None:
            raise ValueError('weights="fit" needs fit_on: the input ids to fit the weights on')
        unweighted = expand(prog, unit, centers, order, "unit", identity, split=split)
        fitted, losses = fit_weights(unweighted, _center_list(centers), fit_on, fit_steps, fit_lr)
        expansion = expand(prog, unit, centers, order, fitted, identity, split=split)
        expansion.fit_losses = losses
        return expansion
    units = prog.units
    decoder = unit in ("decoder", len(units))
    if not decoder and (not isinstance(unit, int) or not 0 <= unit < len(units)):
        raise IndexError(f"unit {unit!r} out of range: {prog.granularity} view has units "
                         f"0..{len(units) - 1}, and 'decoder' (= {len(units)})")
    if identity not in ("pass", "jet"):
        raise ValueError(f"identity must be 'pass' or 'jet', got {identity!r}")
    check_order(order)
    center_list = _center_list(centers)
    if not center_list:
        raise ValueError("expand needs at least one centre")
    for term in center_list:
        if not isinstance(term, Term) or term.space != "stream":
            raise TypeError(f"centres must be stream-space Terms (source_terms, stream_term or an "
                            f"earlier expansion's terms), got {term!r}")
    per_center = center_weights(weights, len(center_list))
    target = prog.decoder if decoder else units[unit]
    terms: list[Term] = []
    for index, (center, weight) in enumerate(zip(center_list, per_center, strict=True)):
        if split and order >= 1 and len(center_list) > 1:
            others = tuple(c for i, c in enumerate(center_list) if i != index)
            for monomial in Basis(len(others), order).monomials:
                terms.append(Term("jet", target, center=center, degree=sum(monomial), order=order,
                                  weight=weight, directions=others, monomial=monomial))
        elif split and order >= 1:  # no other centre, so no direction: the order-0 term alone
            terms.append(center.then(target, 0, 0, weight))
        else:
            terms.extend(center.then(target, j, order, weight) for j in range(order + 1))
    if not decoder:
        if identity == "pass":
            terms = center_list + terms
        else:
            terms = [Term("identity", target, center=center, order=order, weight=w)
                     for center, w in zip(center_list, per_center, strict=True)] + terms
    return Expansion(prog, len(units) if decoder else unit, terms, order)


def expand_stream(
    prog: ResidualProgram,
    order: int = 0,
    centers: Sequence[Term] | None = None,
    weights: str | float = "uniform",
    identity: Identity = "pass",
    upto: int | None = None,
    max_terms: int | None = 100_000,
) -> Expansion:
    """Algorithm 1 iterated over units ``0..upto`` (default: all): every unit is expanded around
    all terms of the stream before it. At order 0 with ``identity="pass"`` the result holds one
    term per path through the units (2^N per centre for N sequential units).

    ``centers`` default to the encoder's addends (:func:`source_terms`); ``[stream_term(prog, 0)]``
    starts from h_0 as one term. The result has N·(k+2)^units terms for N centres; more than
    ``max_terms`` (None: no bound) is refused before any is built.
    """
    last = len(prog.units) - 1 if upto is None else upto
    if not 0 <= last < len(prog.units):
        raise IndexError(f"upto {upto} out of range: the {prog.granularity} view has units "
                         f"0..{len(prog.units) - 1}")
    check_order(order)
    terms: Sequence[Term] | Expansion = list(centers) if centers is not None else source_terms(prog)
    count = len(terms) * (order + 2) ** (last + 1)
    if max_terms is not None and count > max_terms:
        raise CostError(f"expanding {last + 1} units at order {order} around {len(terms)} centre(s) gives "
                        f"{count:.4g} terms, more than max_terms={max_terms:,}: expand fewer units (upto=), "
                        "select paths with expand_paths, or raise max_terms")
    expansion = None
    for unit in range(last + 1):
        expansion = expand(prog, unit, terms, order, weights, identity)
        terms = expansion
    return expansion


def center_weights(weights: str | float | torch.Tensor, count: int) -> list[Weight]:
    """One weight per centre from ``"uniform"``, ``"unit"``, a float or a tensor [count, …]."""
    if isinstance(weights, str):
        if weights == "uniform":
            return [1.0 / count] * count
        if weights == "unit":
            return [1.0] * count
        raise ValueError(f"weights must be 'uniform', 'unit', a float or a tensor, got {weights!r}")
    if isinstance(weights, (int, float)):
        return [float(weights)] * count
    if not isinstance(weights, torch.Tensor) or weights.dim() == 0 or weights.shape[0] != count:
        shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise ValueError(f"weights must have one leading entry per centre ({count}), got shape {shape}")
    return list(weights.unbind(0))


def _center_list(centers: Sequence[Term] | Expansion) -> list[Term]:
    return list(centers.terms if isinstance(centers, Expansion) else centers)
