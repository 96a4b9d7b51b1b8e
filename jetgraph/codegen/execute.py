"""Run a :class:`~jetgraph.codegen.schedule.Schedule` on tensors: one call per step.

This is the batched evaluator. Each step's rows are computed by
:func:`jetgraph.passes.evaluate.evaluate_terms` — the same definition of a term the reference
evaluator uses — on the step's centres gathered from earlier buffers. Called eagerly it is a fast
``Expansion.evaluate``; traced by ``make_fx`` (:mod:`jetgraph.codegen.trace`) it becomes
straight-line aten code in which every unit's jet appears once, on its centres stacked along the
batch dimension.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from jetgraph.codegen.schedule import Schedule, Step
from jetgraph.passes.evaluate import RunInputs, evaluate_terms
from jetgraph.passes.terms import Term


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
