"""Last-position logits of one path on token contexts, without the work a table repeats.

A path's schedule (:func:`path_schedule`) computes every position of every context. An n-gram
table reads the last position only, and a pair table's contexts share their tokens, so
:class:`PathEvaluator` skips two kinds of repeated work:

- **The decoder at the last position only.** An order-0 decoder that maps each position on its
  own (the final norm and the unembedding) is applied to the last position's centre alone:
  half of a pair table's floor.
- **Per-token prefixes, once per table.** Leading steps whose value at a position depends on
  that position's token alone — the encoder's addends and order-0 jets of units that do not mix
  positions (kind ``mlp``), up to the first unit that does — are computed once per distinct
  token of the table (at positions 0 and 1, so position-dependent addends stay right) and
  gathered per row. In ``E→mlp0→attn1→U`` the first token's ``mlp0`` state is computed once,
  not once per pair.

Both are checked on a probe of the table's own contexts against the plain schedule at
construction; where the model breaks an assumption the evaluator falls back to the plain
schedule (``shared_steps == 0``, ``last_position_only`` False). What stays per pair: the
position-mixing units themselves compute every position (their projections of the first
token included), since their graphs are the model's.
"""

from __future__ import annotations

import torch

from jetgraph.codegen import BatchedRun, Schedule, plan
from jetgraph.ir import Decoder, ResidualProgram
from jetgraph.passes.evaluate import RunInputs, evaluate_terms
from jetgraph.passes.expansion import Expansion
from jetgraph.passes.terms import Term

PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 3e-2, torch.float16: 3e-3}
"""Largest probe difference, relative to the logits' scale, that counts as the same values
(batch composition changes the rounding of a matmul, never more)."""

TOKEN_BLOCK = 4096  # distinct tokens per call when the shared prefix is computed


def path_schedule(view: ResidualProgram, term: Term) -> Schedule:
    """The batched plan of one logit-space path term."""
    return plan(Expansion(view, len(view.units), [term], term.order))


def evaluate_path(schedule: Schedule, ids: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] logits of the single path term at the last position (plain schedule)."""
    outputs, _, _ = BatchedRun(schedule, ids).run(remainder=False)
    return outputs[0, :, -1, :]


class PathEvaluator:
    """``evaluator(ids)``: [rows, vocab] last-position logits of one path term on ``ids``
    [rows, length], equal to :func:`evaluate_path` up to matmul rounding."""

    def __init__(self, view: ResidualProgram, term: Term, length: int, tokens: torch.Tensor,
                 vocab: int) -> None:
        self.view, self.length, self.vocab = view, length, vocab
        self.schedule = path_schedule(view, term)
        self.device = view.decoder.unembedding.device
        steps = self.schedule.steps
        decoder = steps[-1]
        self.last_position_only = (isinstance(decoder.unit, Decoder) and decoder.order == 0
                                   and length > 1 and not decoder.directions)
        self.shared_steps = _per_token_prefix(steps) if length > 1 else 0
        self.tokens = tokens
        self._shared: list[torch.Tensor] | None = None
        self._lookup: torch.Tensor | None = None

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.device)
        if not (self.last_position_only or self.shared_steps):
            return evaluate_path(self.schedule, ids)
        run = BatchedRun(self.schedule, ids)
        steps = self.schedule.steps
        for index, step in enumerate(steps):
            if index < self.shared_steps:
                run.buffers.append(self._gathered(index, ids))
            elif index == len(steps) - 1 and self.last_position_only:
                run.buffers.append(self._decode_last(run, step, ids))
            else:
                run.buffers.append(run.compute(step))
        return run.gather(self.schedule.outputs)[0, :, -1, :]

    @property
    def shared_bytes(self) -> int:
        """Memory the per-token prefix holds (estimated before it is computed)."""
        if not self.shared_steps:
            return 0
        width = self.view.decoder.unembedding.shape[1]
        rows = sum(len(s.terms) for s in self.schedule.steps[: self.shared_steps])
        return rows * len(self.tokens) * self.length * width * 4

    # ------------------------------------------------------------------ the two shortcuts
    def _decode_last(self, run: BatchedRun, step, ids: torch.Tensor) -> torch.Tensor:
        centers = run.gather(step.centers)[:, :, -1:, :]
        last = RunInputs(self.view, ids[:, -1:])
        return evaluate_terms(step.terms, last, centers, step.center_of)

    def _gathered(self, index: int, ids: torch.Tensor) -> torch.Tensor:
        if self._shared is None:
            self._shared = self._prefix_table()
        position = self._lookup[ids]
        table = self._shared[index]  # [rows, tokens, length, width]
        columns = [table[:, position[:, p], p] for p in range(self.length)]
        return torch.stack(columns, 2)

    def _prefix_table(self) -> list[torch.Tensor]:
        """The shared steps' buffers on ``[t, t, …]`` for every distinct token t."""
        tokens = self.tokens.to(self.device)
        self._lookup = torch.full((self.vocab,), -1, dtype=torch.long, device=self.device)
        self._lookup[tokens] = torch.arange(len(tokens), device=self.device)
        parts: list[list[torch.Tensor]] = [[] for _ in range(self.shared_steps)]
        for start in range(0, len(tokens), TOKEN_BLOCK):
            block = tokens[start:start + TOKEN_BLOCK, None].expand(-1, self.length)
            run = BatchedRun(self.schedule, block)
            for index in range(self.shared_steps):
                run.buffers.append(run.compute(self.schedule.steps[index]))
                parts[index].append(run.buffers[-1].expand(-1, len(block), -1, -1))
        return [torch.cat(p, 1) for p in parts]

    def flops(self, rows: int) -> float:
        """Matmul FLOPs of ``rows`` contexts (the per-token prefix counted once per token),
        counted on one context: nothing of table size is allocated."""
        from torch.utils.flop_counter import FlopCounterMode

        probe = torch.zeros(1, self.length, dtype=torch.long, device=self.device)
        run = BatchedRun(self.schedule, probe)
        counts = []
        for index, step in enumerate(self.schedule.steps):
            with FlopCounterMode(display=False) as counter:
                if index == len(self.schedule.steps) - 1 and self.last_position_only:
                    run.buffers.append(self._decode_last(run, step, probe))
                else:
                    run.buffers.append(run.compute(step))
            counts.append(counter.get_total_flops())
        shared = sum(counts[: self.shared_steps])
        return (sum(counts) - shared) * rows + shared * len(self.tokens)

    def verify(self, probe: torch.Tensor) -> None:
        """Both shortcuts against the plain schedule on ``probe`` contexts; off if they differ."""
        if not (self.last_position_only or self.shared_steps) or not len(probe):
            return
        probe = probe.to(self.device)
        expected = evaluate_path(self.schedule, probe)
        dtype = self.view.decoder.unembedding.dtype
        tolerance = PROBE_TOLERANCE.get(dtype, 3e-2) * expected.abs().max().clamp_min(1e-6)
        try:
            fast = self(probe)
            same = fast.shape == expected.shape and bool(((fast - expected).abs() <= tolerance).all())
        except (RuntimeError, ValueError, IndexError):  # a decoder that cannot read one position
            same = False
        if not same:
            self.last_position_only, self.shared_steps, self._shared = False, 0, None


def _per_token_prefix(steps) -> int:
    """How many leading steps are per-token: encoder addends, and order-0 jets / skips of units
    that do not mix positions, whose centres are themselves per-token. Zero when no unit is
    among them: gathering embedding rows from a table is no cheaper than looking them up."""
    count, units = 0, 0
    for step in steps[:-1]:  # never the decoder: it is the last step
        if step.kind == "source":
            count += 1
            continue
        if step.kind in ("jet", "identity") and step.order == 0 and not step.directions \
                and getattr(step.unit, "kind", None) == "mlp":
            count += 1
            units += step.kind == "jet"
            continue
        break
    return count if units else 0
