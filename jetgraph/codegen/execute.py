"""Run a :class:`~jetgraph.codegen.schedule.Schedule` on tensors: one call per step.

This is the batched evaluator. Called eagerly it is a fast ``Expansion.evaluate``; traced by
``make_fx`` (:mod:`jetgraph.codegen.emit`) it becomes straight-line aten code in which every
unit's jet appears once, on its centres stacked along the batch dimension.
"""

from __future__ import annotations

import torch

from jetgraph.codegen.schedule import DECODER, Schedule, Step
from jetgraph.ir import StreamFunction
from jetgraph.taylor import jet

Weight = float | torch.Tensor


class BatchedRun:
    """Buffers of one evaluation: ``buffers[i]`` is step i's [rows, batch, seq, width] tensor."""

    def __init__(self, schedule: Schedule, input_ids: torch.Tensor) -> None:
        self.schedule = schedule
        self.prog = schedule.prog
        self.input_ids = input_ids
        self.batch, self.seq = input_ids.shape
        self._states: list[torch.Tensor] | None = None
        self._side: dict[str, torch.Tensor] | None = None
        self.units = {u.name: u for u in self.prog.units}
        self.buffers: list[torch.Tensor] = []
        self._stacked_side: dict[int, dict[str, torch.Tensor]] = {}

    @property
    def states(self) -> list[torch.Tensor]:
        """The model's own stream h_0..h_N, computed on first use (order-0 paths never need it)."""
        if self._states is None:
            self._states, self._side = self.prog.stream_with_side_inputs(self.input_ids)
        return self._states

    @property
    def side(self) -> dict[str, torch.Tensor]:
        if self._side is None:
            self._side = self.prog.side_inputs(self.input_ids)
        return self._side

    # ---------------------------------------------------------------- driver
    def run(self, on_step=None, remainder: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(outputs [terms, batch, seq, width], target, remainder = target − Σ outputs).

        ``remainder=False`` skips the model's own forward when no step needs it (target and
        remainder are then None): what n-gram tables over the vocabulary want.
        """
        for step in self.schedule.steps:
            if on_step is not None:
                on_step(step)
            self.buffers.append(self._compute(step))
        outputs = self.gather(self.schedule.outputs)
        if not remainder:
            return outputs, None, None
        if self.schedule.space == "logits":
            target = self.prog.decoder(self.states[-1], self.side)
        else:
            target = self.states[self.schedule.target_state]
        return outputs, target, target - outputs.sum(0)

    def gather(self, terms) -> torch.Tensor:
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

    # ----------------------------------------------------------------- steps
    def _compute(self, step: Step) -> torch.Tensor:
        full = (self.batch, self.seq)
        if step.kind == "sources":
            addends = list(self.prog.encoder.addends(self.input_ids).values())
            rows = [addends[i].expand(*full, addends[i].shape[-1]) for i, _ in step.picks]
            return torch.stack(rows)
        if step.kind == "states":
            return torch.stack([self.states[i] for i, _ in step.picks])
        if step.kind == "identity":
            rows = []
            for term in step.terms:  # J^0 id(c)(h) = c; J^k id(c)(h) = h for k ≥ 1
                base = self.value(term.center) if term.order == 0 else self._variate(step.unit)
                rows.append(base.expand(*full, base.shape[-1]))
            return _weighted(torch.stack(rows), [t.weight for t in step.terms])
        return self._jet(step)

    def value(self, term) -> torch.Tensor:
        step, row = self.schedule.location[term.uid]
        return self.buffers[step][row]

    def _variate(self, unit: str) -> torch.Tensor:
        return self.states[-1] if unit == DECODER else self.states[self.units[unit].reads]

    def _function(self, unit: str) -> StreamFunction:
        return self.prog.decoder if unit == DECODER else self.units[unit]

    def _jet(self, step: Step) -> torch.Tensor:
        count = len(step.centres)
        centres = self.gather(step.centres)
        flat = (count * self.batch, self.seq, centres.shape[-1])
        centres = centres.reshape(flat)
        side = self._side_for(count)
        function = self._function(step.unit)
        if step.directions:
            directions = [self.gather([d[j] for d in step.directions]).reshape(flat)
                          for j in range(len(step.directions[0]))]
            coefficients = jet(function, centres, order=step.depth, directions=directions,
                               side=side).coefficients
        else:  # at order 0 the variate is not read: the centres stand in for it
            variate = centres if step.depth == 0 else \
                self._variate(step.unit).expand(count, self.batch, self.seq, flat[-1]).reshape(flat)
            coefficients = jet(function, centres, variate, order=step.depth, side=side).coefficients
        size = coefficients.shape[0]
        coefficients = coefficients.reshape(size * count, self.batch, self.seq, coefficients.shape[-1])
        flat_rows = [m * count + a for m, a in step.picks]
        if flat_rows == list(range(flat_rows[0], flat_rows[0] + len(flat_rows))):
            rows = coefficients[flat_rows[0]:flat_rows[-1] + 1]
            if rows.shape[0] == coefficients.shape[0]:
                rows = coefficients
        else:
            index = torch.tensor(flat_rows, device=coefficients.device)
            rows = coefficients.index_select(0, index)
        return _weighted(rows, [t.weight for t in step.terms])

    def _side_for(self, count: int) -> dict[str, torch.Tensor]:
        """Side inputs for ``count`` stacked copies of the batch (masks, RoPE tables)."""
        if count == 1 or not self.side:
            return self.side
        if count not in self._stacked_side:
            if self.prog.side.positions_only:  # rebuilt from positions: right by construction
                self._stacked_side[count] = self.prog.side.for_shape(
                    count * self.batch, self.seq, self.input_ids.device, cache=False)
            else:
                self._stacked_side[count] = {
                    name: value.repeat(count, *([1] * (value.dim() - 1)))
                    if value.shape[0] == self.batch and self.batch > 1 else value
                    for name, value in self.side.items()
                }
        return self._stacked_side[count]


def _weighted(rows: torch.Tensor, weights: list[Weight]) -> torch.Tensor:
    """rows · w per row; tensor weights broadcast against [batch, seq, width] from the right."""
    if all(not isinstance(w, torch.Tensor) for w in weights):
        if all(w == 1.0 for w in weights):
            return rows
        if len(set(weights)) == 1:
            return rows * weights[0]
        column = torch.tensor(weights, dtype=rows.dtype, device=rows.device)
        return rows * column.view(-1, *([1] * (rows.dim() - 1)))
    tensors = [torch.as_tensor(w, dtype=rows.dtype).to(rows.device) for w in weights]
    shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    stacked = torch.stack([t.expand(shape) for t in tensors])
    return rows * stacked.view(len(tensors), *([1] * (rows.dim() - 1 - len(shape))), *shape)

