"""The lenses themselves: the iterative lens at every order from one Taylor pass, and the joint
lens over the units' contributions."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from jetgraph.applications.lens.results import LensResult
from jetgraph.codegen import BatchedRun, plan
from jetgraph.ir import ENCODER_NAME, ResidualProgram, as_input_ids
from jetgraph.passes.expansion import Expansion
from jetgraph.passes.rewrite import expand
from jetgraph.passes.terms import stream_term
from jetgraph.taylor import check_order, jet

JOINT_LABEL = "Σ weighted centres"


@torch.no_grad()
def iterative_lenses(prog: ResidualProgram, input_ids: torch.Tensor, orders: Sequence[int] = (0, 1, 2),
                     k: int = 5, granularity: str | None = None,
                     layers: Sequence[int] | None = None, *,
                     attention_mask: torch.Tensor | None = None) -> dict[int, LensResult]:
    """The iterative lens at every order in ``orders``, from one Taylor-mode pass at the highest.

    The order-j lens at h_ℓ is the sum of the decoder jet's coefficients 0..j at h_ℓ, so one
    pass at K = max(orders) gives every order ≤ K. ``layers``: the stream states to decode
    (indices 0..N of the view's h_0..h_N, like the paper's code; default all). ``granularity``
    picks the states (``"block"``: after each block; ``"sublayer"``: after each attention and MLP
    unit); default: the program's view. ``attention_mask``: a padded batch (1 = token, 0 =
    padding, either side); each prompt gets its own results and pads count in no metric.
    Returns one :class:`LensResult` per order, by order.
    """
    orders = sorted({check_order(o, "lens order") for o in orders})
    if not orders:
        raise ValueError("orders is empty: give at least one lens order, e.g. (0, 1, 2)")
    view = prog.at(granularity) if granularity else prog  # type: ignore[arg-type]
    ids, mask = view.inputs(input_ids, attention_mask)
    states = list(range(len(view.units) + 1)) if layers is None else _states(layers, len(view.units))
    top = orders[-1]
    centers = [stream_term(view, i) for i in states]
    expansion = expand(view, "decoder", centers, order=top, weights="unit")
    outputs, true_logits, _ = BatchedRun(plan(expansion), ids, mask).run()
    per_degree = outputs.view(len(centers), top + 1, *outputs.shape[1:])  # terms: centre-major
    norms = _norms(per_degree)
    labels = [c.name for c in centers]
    written = [ENCODER_NAME if i == 0 else view.units[i - 1].name for i in states]
    padding = mask if attention_mask is not None else None
    if len(orders) == 1:
        sums = {top: per_degree.sum(1)}
    else:  # partial sums in place: every order is a view of the one buffer (no copy per order)
        for j in range(1, top + 1):
            per_degree[:, j] += per_degree[:, j - 1]
        sums = {order: per_degree[:, order] for order in orders}
    return {order: LensResult("iterative", order, labels, sums[order], true_logits, k, written_by=written,
                              attention_mask=padding, coefficient_norms=norms[:, : order + 1])
            for order in orders}


@torch.no_grad()
def iterative_lens(prog: ResidualProgram, input_ids: torch.Tensor, order: int = 0, k: int = 5,
                   granularity: str | None = None, layers: Sequence[int] | None = None, *,
                   attention_mask: torch.Tensor | None = None) -> LensResult:
    """The order-``order`` jet of the decoder at every stream state h_0..h_L, evaluated at h_L
    (:func:`iterative_lenses` for one order; the same arguments)."""
    return iterative_lenses(prog, input_ids, (order,), k, granularity, layers,
                            attention_mask=attention_mask)[order]


@torch.no_grad()
def ahead_lens(prog: ResidualProgram, input_ids: torch.Tensor, order: int = 1, ahead: int = 1, k: int = 5,
               granularity: str | None = None, layers: Sequence[int] | None = None, *,
               attention_mask: torch.Tensor | None = None,
               later_states_from: torch.Tensor | None = None) -> LensResult:
    """The iterative lens with its variate ``ahead`` states on instead of h_N: at state s, the
    order-``order`` jet of the decoder centred at h_s and evaluated at h_{min(s+ahead, N)},
    J^k Dec(h_s)(h_{s+m}). It reads h_s and the next ``ahead`` units' outputs, never the final
    state (except for the last ``ahead`` states, whose variate is h_N). Order 0 is the logit lens;
    ``ahead=N`` is the paper's iterative lens.

    ``later_states_from`` (ids [1, seq'] of another prompt, one unpadded prompt only) is the
    leakage control of the intermediate-concept benchmark: every variate h_{s+m} is replaced by
    that prompt's state h_{s+m} at its last position, so what the lens shows beyond h_s comes
    from the other prompt."""
    order = check_order(order, "lens order")
    if not isinstance(ahead, int) or ahead < 1:
        raise ValueError(f"ahead must be a number of states ≥ 1, got {ahead!r}")
    view = prog.at(granularity) if granularity else prog  # type: ignore[arg-type]
    ids, mask = view.inputs(input_ids, attention_mask)
    states_list = list(range(len(view.units) + 1)) if layers is None else _states(layers, len(view.units))
    states, side = view.stream_with_side_inputs(ids, mask)
    variates = states
    if later_states_from is not None:
        if attention_mask is not None or ids.shape[0] != 1:
            raise ValueError("later_states_from replaces one prompt's later states: give one unpadded prompt")
        other, _ = view.stream_with_side_inputs(*view.inputs(later_states_from, None))
        variates = [theirs[:, -1:].expand_as(ours) for theirs, ours in zip(other, states, strict=True)]
    last = len(view.units)
    coefficients = []
    for s in states_list:
        variate = variates[min(s + ahead, last)]
        coefficients.append(jet(view.decoder, states[s], variate, order, side=side).coefficients)
    per_degree = torch.stack(coefficients)  # [states, order+1, batch, seq, vocab]
    written = [ENCODER_NAME if i == 0 else view.units[i - 1].name for i in states_list]
    return LensResult("ahead", order, [f"h{i}" for i in states_list], per_degree.sum(1),
                      view.decoder(states[-1], side), k, written_by=written,
                      attention_mask=attention_mask, coefficient_norms=_norms(per_degree))


def _norms(values: torch.Tensor) -> torch.Tensor:
    """Float64 norms over the last dimension, summed in float32 where that cannot overflow (a
    float64 pass over the vocabulary costs 8× as much) and in float64 for the rest."""
    cheap = torch.float64 if values.dtype == torch.float64 else torch.float32
    norms = torch.linalg.vector_norm(values, dim=-1, dtype=cheap).double()
    large = ~torch.isfinite(norms) | (norms > 1e18)
    if large.any():
        norms[large] = torch.linalg.vector_norm(values[large], dim=-1, dtype=torch.float64)
    return norms


def _states(layers: Sequence[int], units: int) -> list[int]:
    states = sorted({int(i) for i in layers})
    if not states or states[0] < 0 or states[-1] > units:
        raise ValueError(f"layers must name stream states 0..{units} (h_0 is the embedding), got "
                         f"{list(layers)}")
    return states


def contribution_centers(prog: ResidualProgram) -> Expansion:
    """h_0 and every unit's contribution γ_ℓ(h_{ℓ−1}) as terms: they sum to h_L."""
    terms = [stream_term(prog, 0)]
    for index, unit in enumerate(prog.units):
        step = expand(prog, index, [stream_term(prog, unit.reads)], order=0, weights="unit")
        terms.append(step.terms[-1])
    return Expansion(prog, len(prog.units) - 1, terms, 0)


@torch.no_grad()
def joint_lens(prog: ResidualProgram, input_ids: torch.Tensor, order: int = 0, k: int = 5,
               steps: int = 100, lr: float = 1e-2) -> LensResult:
    """The decoder expanded jointly around h_0 and the units' contributions, with per-token softmax
    weights fitted on ``input_ids``; ``logits[i]`` is centre i's weighted jet, their sum the lens."""
    ids = as_input_ids(input_ids)
    centers = contribution_centers(prog)
    with torch.enable_grad():
        expansion = expand(prog, "decoder", centers, order=order, weights="fit", fit_on=ids,
                           fit_steps=steps, fit_lr=lr)
    values = expansion.evaluate(ids)
    terms = torch.stack(list(values.terms.values()))
    per_center = terms.view(len(centers), order + 1, *terms.shape[1:]).sum(1)
    weights = torch.stack([t.weight for t in expansion.terms[:: order + 1]])
    return LensResult("joint", order, [JOINT_LABEL], per_center.sum(0, keepdim=True),
                      values.target, k, written_by=["all units"], weights=weights,
                      fit_losses=expansion.fit_losses, center_labels=[c.name for c in centers.terms],
                      center_logits=per_center)
