"""The rest of the network from one stream state: R_s(h) = h_N as a function of h_s, run as a
Taylor series through the units' own graphs (the derivative lenses' one building block).

A view's state h_{i+1} = h_i + γ_i(h_{reads(i)}); R_s composes the units after state s. A unit
after s that reads a state before s (the second branch of a parallel block whose first branch
ends at s) reads it as a constant: the function is of h_s alone, the other states held.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from jetgraph.ir import ResidualProgram
from jetgraph.taylor import Basis, Series, run_series


def rest_series(view: ResidualProgram, start: int, series: Series, states: Sequence[torch.Tensor],
                side: Mapping[str, torch.Tensor]) -> Series:
    """h_N as a series, given h_``start`` as ``series`` ([basis, *h.shape]); ``states`` are the
    view's own h_0..h_N on this input (the states before ``start`` that later units read)."""
    held: dict[int, Series | torch.Tensor] = {i: states[i] for i in range(start)}
    held[start] = series
    h: Series = series
    for index in range(start, len(view.units)):
        unit = view.units[index]
        read = held[unit.reads]
        if not isinstance(read, Series):  # a state before start: a constant of this function
            read = _constant(read, series.basis)
        with view.resident([unit]):
            out = run_series(unit.graph_module, read, *(side[name] for name in unit.side_inputs))
        if not isinstance(out, Series):  # the unit does not read its input: a constant update
            out = _constant(out, series.basis)
        h = Series(h.coeffs + out.coeffs, series.basis)  # new buffers: held states stay as they were
        held[index + 1] = h
    return h


def _constant(value: torch.Tensor, basis: Basis) -> Series:
    coeffs = value.new_zeros((basis.size, *value.shape))
    coeffs[0] = value
    return Series(coeffs, basis)


def first_order_series(center: torch.Tensor, directions: Sequence[torch.Tensor]) -> Series:
    """The order-1 series c + Σ_i t_i v_i (one coefficient per direction)."""
    basis = Basis(len(directions), 1)
    coeffs = center.new_zeros((basis.size, *center.shape))
    coeffs[0] = center
    for i, v in enumerate(directions):
        coeffs[basis.unit(i)] = v
    return Series(coeffs, basis)
