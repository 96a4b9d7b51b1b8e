"""Measured effects in the real model, to check what a decomposition predicts (the study's
ground truth, ``benchmarks/explain_study.py``).

* :func:`remove_path` — path patching: the vector a path's prefix writes (computed by the frozen
  maps) is subtracted from the input of the path's next unit only, and the rest of the model runs
  as it is (nonlinearities recomputed). What it removes, in the frozen network, is every path
  that begins with the prefix and its next unit: :meth:`FrozenNetwork.group_value` of the
  prefix with that unit is the prediction to compare with.
* :func:`remove_unit` — zero-ablation of one unit's update.
* :func:`unit_attributions` — direct logit attribution (``G_N · out_u``, the final norm held) and
  attribution patching (gradient × activation, ``∂T/∂h_{u+1} · out_u`` with the real gradient).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from jetgraph.applications.explain.network import FrozenNetwork


def value_with(network: FrozenNetwork, edit_at: int, edit) -> float:
    """The model's target value with unit ``edit_at``'s update replaced by ``edit(unit, x)``
    (``x``: the stream it reads): see :func:`logits_with`."""
    return float(network.target(logits_with(network, edit_at, edit)).double())


def logits_with(network: FrozenNetwork, edit_at: int, edit) -> torch.Tensor:
    """The model's logits at the explained position with unit ``edit_at``'s update replaced by
    ``edit(unit, x)``; units before it, and units that read states before it, keep their outputs."""
    view, side = network.prog, network.side
    states = [s.unsqueeze(0) for s in network.states[:edit_at + 1]]
    with torch.no_grad(), view.resident(view.units):
        for unit in view.units[edit_at:]:
            if unit.index == edit_at:
                out = edit(unit, states[unit.reads])
            elif unit.reads <= edit_at:
                out = network.unit_outputs[unit.index].unsqueeze(0)  # reads nothing changed
            else:
                out = unit(states[unit.reads], side)
            states.append(states[-1] + out)
        return view.decoder(states[-1], side)[0, network.position]


def remove_path(network: FrozenNetwork, source: str, position: int | None, units: Sequence[str]) -> float:
    """The target value with the path's last edge cut: the prefix ``units[:-1]``'s vector taken
    from the input of ``units[-1]`` (with no units: from the decoder's input)."""
    if not units:
        vector, _ = network.prefix_vector(source, position, ())
        with torch.no_grad():
            logits = network.prog.decoder((network.states[-1] - vector).unsqueeze(0),
                                          network.side)[0, network.position]
        return float(network.target(logits).double())
    vector, _ = network.prefix_vector(source, position, units[:-1])
    last = next(u for u in network.units if u.name == units[-1])
    return value_with(network, last.index, lambda unit, x: unit(x - vector.unsqueeze(0), network.side))


def remove_unit(network: FrozenNetwork, name: str) -> float:
    """The target value with unit ``name``'s update replaced by zeros."""
    unit = next(u for u in network.units if u.name == name)
    return value_with(network, unit.index, lambda unit, x: torch.zeros_like(x))


def unit_attributions(network: FrozenNetwork) -> dict[str, tuple[float, float]]:
    """Unit name -> (direct logit attribution, attribution patching)."""
    view, side = network.prog, network.side
    h0 = network.states[0].unsqueeze(0)
    shifts = [torch.zeros_like(h0, requires_grad=True) for _ in range(len(network.units) + 1)]
    with torch.enable_grad(), view.resident(view.units):
        states = [h0 + shifts[0]]
        for unit in view.units:
            states.append(states[-1] + unit(states[unit.reads], side) + shifts[len(states)])
        value = network.target(view.decoder(states[-1], side)[0, network.position])
        grads = torch.autograd.grad(value, shifts)
    scores = {}
    for unit, out in zip(network.units, network.unit_outputs, strict=True):
        direct = float((network.gradients[-1].double() * out.double()).sum())
        patching = float((grads[unit.index + 1][0].double() * out.double()).sum())
        scores[unit.name] = (direct, patching)
    return scores


__all__ = ["logits_with", "remove_path", "remove_unit", "unit_attributions", "value_with"]
