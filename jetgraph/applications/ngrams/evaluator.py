"""Last-position logits of one path on token contexts, without the work a table repeats.

A path's schedule (:func:`path_schedule`) computes every position of every context. An n-gram
table reads the last position only, and a pair table's contexts share their tokens, so
:class:`PathEvaluator` runs the schedule in codegen's execution modes
(:mod:`jetgraph.codegen.modes`: the decoder and trailing MLPs on the last position only,
attention split by position) and adds one of its own, the ``"given"`` steps: leading steps
whose value at a position depends on that position's token alone (the encoder's addends and
order-0 jets of units that do not mix positions, up to the first unit that does) are computed
once per distinct token of the table (at every position, so position-dependent addends stay
right) and gathered per row.

The modes are checked on a probe of the table's own contexts (with shared first tokens) against
the plain schedule at construction; where they differ the evaluator drops the split, then every
shortcut (the plain schedule), and warns once with the reason
(:class:`~jetgraph.codegen.modes.ShortcutFallback`).
"""

from __future__ import annotations

import torch

from jetgraph.codegen import BatchedRun, Schedule, plan
from jetgraph.codegen.modes import Modes, ShortcutFallback, fell_back, last_position_modes, plain_modes
from jetgraph.ir import ResidualProgram
from jetgraph.passes.expansion import Expansion
from jetgraph.passes.terms import Term

__all__ = ["PathEvaluator", "ShortcutFallback", "evaluate_path", "path_schedule"]

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
    [rows, length], equal to :func:`evaluate_path` up to matmul rounding. ``tokens``: every
    token the contexts hold (for the per-token prefix); None when they are not known in
    advance (no ``"given"`` steps)."""

    split_positions = True
    """Whether position-mixing units may run split by position (a switch for comparisons)."""

    def __init__(self, view: ResidualProgram, term: Term, length: int, tokens: torch.Tensor | None,
                 vocab: int) -> None:
        self.view, self.length, self.vocab = view, length, vocab
        self.name = term.name
        self.schedule = path_schedule(view, term)
        self.device = view.decoder.unembedding.device
        self.tokens = tokens
        self._shared: list[torch.Tensor] | None = None
        self._lookup: torch.Tensor | None = None
        self.modes = self._choose_modes()

    # ------------------------------------------------------------------ modes
    @property
    def shared_steps(self) -> int:
        """How many leading steps are computed once per token (mode ``"given"``)."""
        return self.modes.count("given")

    @property
    def last_position_only(self) -> bool:
        """Whether the decoder runs on the last position alone."""
        return self.modes[-1] == "last"

    @property
    def split_steps(self) -> list[str]:
        """Names of the position-mixing units run once per group of earlier tokens."""
        return [step.unit.name for step, mode in zip(self.schedule.steps, self.modes.modes, strict=True)
                if mode == "split"]

    def _choose_modes(self, split: bool = True, shortcuts: bool = True) -> Modes:
        """Each step's mode (:func:`~jetgraph.codegen.modes.last_position_modes`), the leading
        per-token steps given from the token table. ``split=False``: no position-mixing unit is
        split; ``shortcuts=False``: the plain schedule."""
        if not shortcuts:
            return plain_modes(self.schedule, self.name)
        given = _per_token_prefix(self.schedule.steps) if self.tokens is not None else 0
        return last_position_modes(self.schedule, self.length, given=given,
                                   split=split and self.split_positions, name=self.name)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.device)
        if self.modes.plain:
            return evaluate_path(self.schedule, ids)
        return self._evaluate(ids)

    def _evaluate(self, ids: torch.Tensor, counts: list[float] | None = None) -> torch.Tensor:
        """The steps in their modes (with ``counts``: each step's matmul FLOPs appended)."""
        run = BatchedRun(self.schedule, ids)
        return run.run_modes(self.modes, lambda index: self._gathered(index, ids), counts)[0]

    @property
    def shared_bytes(self) -> int:
        """Memory the per-token prefix holds (estimated before it is computed)."""
        if not self.shared_steps:
            return 0
        width = self.view.decoder.unembedding.shape[1]
        rows = sum(len(s.terms) for s in self.schedule.steps[: self.shared_steps])
        return rows * len(self.tokens) * self.length * width * 4

    # ------------------------------------------------------------------ the per-token steps
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

    def flops(self, rows: int, groups: int | None = None) -> float:
        """Matmul FLOPs of ``rows`` contexts in ``groups`` groups with the same earlier tokens
        (default: no two alike), the per-token prefix counted once per token. Counted on one
        and two contexts of one group: nothing of table size is allocated."""
        from torch.utils.flop_counter import FlopCounterMode

        groups = rows if groups is None else groups
        totals = []
        for count in (1, 2):
            probe = torch.zeros(count, self.length, dtype=torch.long, device=self.device)
            probe[:, -1] = torch.arange(count)
            steps: list[float] = []
            self._evaluate(probe, steps)
            totals.append(sum(steps))
        per_context = totals[1] - totals[0]
        per_group = totals[0] - per_context
        per_token = 0.0
        if self.shared_steps:
            probe = torch.zeros(1, self.length, dtype=torch.long, device=self.device)
            run = BatchedRun(self.schedule, probe)
            with FlopCounterMode(display=False) as counter:
                for index in range(self.shared_steps):
                    run.buffers.append(run.compute(self.schedule.steps[index]))
            per_token = counter.get_total_flops()
        return per_context * rows + per_group * groups + per_token * len(self.tokens)

    @torch.no_grad()
    def verify(self, probe: torch.Tensor) -> None:
        """The shortcuts against the plain schedule on ``probe`` contexts and on the same
        contexts with their last tokens rotated (so that groups share earlier tokens); on a
        difference or a failure, first without the split, then the plain schedule."""
        if self.modes.plain or not len(probe):
            return
        probe = probe.to(self.device)
        if self.length > 1:
            rotated = probe.clone()
            rotated[:, -1] = probe[:, -1].roll(1)
            probe = torch.cat([probe, rotated])
        expected = evaluate_path(self.schedule, probe)
        dtype = self.view.decoder.unembedding.dtype
        tolerance = PROBE_TOLERANCE.get(dtype, 3e-2) * expected.abs().max().clamp_min(1e-6)
        for fallback, what in (({"split": False}, "attention is not split by position"),
                               ({"shortcuts": False}, "every step runs on every position")):
            try:
                fast = self(probe)
                worst = float((fast - expected).abs().max()) if fast.shape == expected.shape else float("inf")
                reason = f"the shortcuts differ from the plain schedule by {worst:.3g} on a probe"
                same = worst <= float(tolerance)
            except (RuntimeError, ValueError, IndexError) as error:  # e.g. a decoder reading one position
                same, reason = False, f"the shortcuts fail on a probe: {type(error).__name__}: {error}"
            if same:
                return
            if "split" in self.modes.modes or "shortcuts" in fallback:
                fell_back(self.name, what, reason)
            self.modes = self._choose_modes(**fallback)
            if not self.shared_steps:
                self._shared = None


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
