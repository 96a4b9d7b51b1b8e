"""Capture's last check: every unit of a lifted program has an order-1 jet.

:mod:`.lift` refuses by structure the constructs jetgraph knows it cannot expand (an
interrupted stream, a unit reading the stream at a second depth); this check catches the rest before the user
holds a program. One order-1 Taylor-mode pass (:func:`jetgraph.taylor.jet`) of each distinct
unit graph and of the decoder, at the example's stream state along a random direction: an op
without a rule, or one its rule cannot handle, becomes a :class:`~jetgraph.CaptureError` naming
the unit, its module and the failure, instead of a crash in a later pass.
"""

from __future__ import annotations

import re

import torch

from jetgraph.errors import CaptureError
from jetgraph.ir import ResidualProgram, ResidualUnit, StreamFunction
from jetgraph.taylor.api import jet


def check_expandable(program: ResidualProgram, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None = None) -> None:
    """Raise :class:`CaptureError` when a sublayer unit or the decoder of ``program`` has no
    order-1 jet at its stream state on ``input_ids``. Graphs alike up to numbers (the layer
    index in parameter names) are checked once."""
    view = program.at("sublayer")
    with torch.no_grad():
        states, side = view.stream_with_side_inputs(input_ids, attention_mask)
        targets: list[tuple[str, StreamFunction, torch.Tensor]] = [
            (leaf.name, leaf, states[leaf.reads]) for leaf in view.units]
        targets.append(("decoder", program.decoder, states[-1]))
        generator = torch.Generator().manual_seed(0)
        seen: set[str] = set()
        for name, fn, h in targets:
            key = re.sub(r"\d+", "#", fn.graph_module.code)
            if key in seen:
                continue
            seen.add(key)
            direction = torch.randn(h.shape, generator=generator).to(h) * h.float().std().to(h.dtype)
            _check_unit(program, name, fn, h, direction, side)


def _check_unit(program: ResidualProgram, name: str, fn: StreamFunction, h: torch.Tensor,
                direction: torch.Tensor, side: dict[str, torch.Tensor]) -> None:
    try:
        with program.resident([fn] if isinstance(fn, ResidualUnit) else []):
            coefficients = jet(fn, h, direction, order=1, increment=True, side=side).coefficients
    except Exception as exc:  # any failure: the program would crash in its first expansion
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CaptureError(
            f"unit {name} has no order-1 jet at the example ({type(exc).__name__}: {detail}); a "
            "program whose units cannot be expanded is refused at capture",
            model_class=program.model_class, module=getattr(fn, "module_path", "") or None) from exc
    if isinstance(fn, ResidualUnit) and tuple(coefficients.shape[1:]) != tuple(h.shape):
        raise CaptureError(
            f"unit {name}'s order-1 jet has shape {list(coefficients.shape[1:])}, not the stream's "
            f"{list(h.shape)}; a program whose units cannot be expanded is refused at capture",
            model_class=program.model_class, module=fn.module_path or None)
