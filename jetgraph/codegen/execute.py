"""Run a :class:`~jetgraph.codegen.schedule.Schedule` on tensors: one call per step.

This is the batched evaluator. Each step's rows are computed by
:func:`jetgraph.passes.evaluate.evaluate_terms` — the same definition of a term the reference
evaluator uses — on the step's centres gathered from earlier buffers. Called eagerly it is a fast
``Expansion.evaluate``; traced by ``make_fx`` (:mod:`jetgraph.codegen.trace`) it becomes
straight-line aten code in which every unit's jet appears once, on its centres stacked along the
batch dimension.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from jetgraph.codegen.positions import Groups, PositionSplitError
from jetgraph.codegen.schedule import Schedule, Step
from jetgraph.passes.evaluate import RunInputs, evaluate_terms, term_rows
from jetgraph.passes.terms import Term

if TYPE_CHECKING:
    from jetgraph.codegen.modes import Modes


class BatchedRun:
    """Buffers of one evaluation: ``buffers[i]`` is step i's [rows, batch, seq, width] tensor."""

    def __init__(self, schedule: Schedule, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> None:
        self.schedule = schedule
        self.prog = schedule.prog
        self.inputs = RunInputs(self.prog, input_ids, attention_mask)
        self.buffers: list[torch.Tensor] = []

    # ---------------------------------------------------------------- driver
    def run(self, on_step: Callable[[Step], None] | None = None, remainder: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(outputs [terms, batch, seq, width], target, remainder = target − Σ outputs).

        ``remainder=False`` skips the model's own forward when no step needs it (target and
        remainder are then None): what n-gram tables over the vocabulary want.
        """
        for step in self.schedule.steps:
            if on_step is not None:
                on_step(step)
            self.buffers.append(self.compute(step))
        outputs = self.gather(self.schedule.outputs)
        if not remainder:
            return outputs, None, None
        if self.schedule.space == "logits":
            target = self.inputs.logits()
        else:
            target = self.inputs.states[self.schedule.target_state]
        return outputs, target, target - outputs.sum(0)

    def run_modes(self, modes: Modes, given: Callable[[int], torch.Tensor] | None = None,
                  counts: list[float] | None = None) -> torch.Tensor:
        """[outputs, batch, width]: the outputs at the last position, each step run in its mode
        (:mod:`.modes`); ``given(index)`` supplies the ``"given"`` steps' buffers. With
        ``counts``, each step's matmul FLOPs are appended to it, the given steps computed
        plainly and counted as zero, and split units interpreted rather than replayed."""
        from torch.utils.flop_counter import FlopCounterMode

        last = RunInputs(self.prog, self.inputs.input_ids[:, -1:])
        groups: dict[int, Groups] = {}
        for index, step in enumerate(self.schedule.steps):
            mode = modes.modes[index]
            counter = FlopCounterMode(display=False) if counts is not None and mode != "given" else None
            with counter if counter is not None else contextlib.nullcontext():
                if mode == "given":
                    buffer = given(index) if counts is None and given is not None else self.compute(step)
                elif mode == "last":
                    centers = self.gather(step.centers)[:, :, -1:] if step.centers else None
                    buffer = evaluate_terms(step.terms, last, centers, step.center_of)
                elif mode == "split":
                    buffer = self._split(modes, index, step, groups, replay=counts is None)
                else:
                    buffer = self.compute(step)
            self.buffers.append(buffer)
            if counts is not None:
                counts.append(counter.get_total_flops() if counter is not None else 0.0)
        return self.gather(self.schedule.outputs)[:, :, -1]

    def _split(self, modes: Modes, index: int, step: Step, groups: dict[int, Groups],
               replay: bool = True) -> torch.Tensor:
        """A position-mixing unit's order-0 jet at the last position, its earlier positions'
        position-wise work once per group of inputs (the whole unit where that fails, with a
        warning). ``replay=False`` interprets the graph instead of replaying its trace."""
        from jetgraph.codegen.modes import fell_back

        centers = self.gather(step.centers)
        count, batch, seq = centers.shape[:3]
        per_position = centers.shape[3:]  # [d], or [n, d] for n parallel streams
        if count not in groups:
            groups[count] = Groups.of(self.inputs.input_ids, copies=count)
        side = self.inputs.side_for(count)
        try:
            splitter = modes.splitters[index]
            values = (splitter if replay else splitter.interpret)(
                centers.reshape(count * batch, seq, *per_position),
                [side[name] for name in step.unit.side_inputs], groups[count])
        except PositionSplitError as error:
            fell_back(modes.name, f"{step.unit.name} ran on every position, not split by position",
                      str(error))
            return self.compute(step)[:, :, -1:]
        rows = values.reshape(count, batch, 1, *values.shape[2:])
        return term_rows(step.terms, rows, count, step.center_of)

    def gather(self, terms: Sequence[Term]) -> torch.Tensor:
        """The values of ``terms`` stacked: contiguous rows of one buffer are one slice."""
        pieces: list[torch.Tensor] = []
        runs: list[list[int]] = []  # [step, first row, end row]
        for step, row in self.schedule.rows_of(list(terms)):
            if runs and runs[-1][0] == step and runs[-1][2] == row:
                runs[-1][2] += 1
            else:
                runs.append([step, row, row + 1])
        for step, start, end in runs:
            buffer = self.buffers[step]
            pieces.append(buffer if (start, end) == (0, buffer.shape[0]) else buffer[start:end])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def compute(self, step: Step) -> torch.Tensor:
        """Step ``step``'s buffer from the buffers before it (callers that fill some buffers
        themselves append the rest in order)."""
        if step.kind in ("source", "stream") or (step.kind == "identity" and step.order >= 1):
            return evaluate_terms(step.terms, self.inputs)  # no centre is read
        centers = self.gather(step.centers)
        directions = None
        if step.directions:
            directions = [self.gather([d[j] for d in step.directions])
                          for j in range(len(step.directions[0]))]
        return evaluate_terms(step.terms, self.inputs, centers, step.center_of, directions)
