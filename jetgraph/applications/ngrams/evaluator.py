"""Last-position logits of one path on token contexts, without the work a table repeats.

A path's schedule (:func:`path_schedule`) computes every position of every context. An n-gram
table reads the last position only, and a pair table's contexts share their tokens, so
:class:`PathEvaluator` gives each step of the schedule one of four *modes*:

- ``"shared"``: per-token prefixes, once per table. Leading steps whose value at a position
  depends on that position's token alone (the encoder's addends and order-0 jets of units that
  do not mix positions, up to the first unit that does) are computed once per distinct token of
  the table (at every position, so position-dependent addends stay right) and gathered per row.
- ``"last"``: a step whose value is read at the last position only and that acts position by
  position (the order-0 decoder: the final norm and the unembedding; an MLP after the last
  attention unit) runs on the last position alone.
- ``"split"``: an order-0 jet of a position-mixing unit whose value is read at the last position
  only runs through :class:`~jetgraph.passes.positions.LastPosition`: its position-wise work on
  the earlier positions (the first token's norm and key/value projections) once per group of
  contexts with the same earlier tokens, its queries and outputs at the last position only.
- ``"full"``: the plain schedule's step.

Modes are chosen from the schedule (which step reads which) and the graphs' symbolic shapes,
and checked on a probe of the table's own contexts (with shared first tokens) against the plain
schedule at construction; where they differ the evaluator drops the split, then every
shortcut (the plain schedule).
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from jetgraph.codegen import BatchedRun, Schedule, plan
from jetgraph.ir import Decoder, ResidualProgram
from jetgraph.passes.evaluate import RunInputs, evaluate_terms, term_rows
from jetgraph.passes.expansion import Expansion
from jetgraph.passes.positions import Groups, LastPosition, PositionSplitError
from jetgraph.passes.terms import Term

PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 3e-2, torch.float16: 3e-3}
"""Largest probe difference, relative to the logits' scale, that counts as the same values
(batch composition changes the rounding of a matmul, never more)."""

TOKEN_BLOCK = 4096  # distinct tokens per call when the shared prefix is computed
_TOLD: set[tuple[str, str, str]] = set()


class ShortcutFallback(RuntimeWarning):
    """A path evaluator dropped a shortcut (same numbers, slower): warned once per path and reason."""


def fell_back(path: str, what: str, reason: str) -> None:
    """Warn once per path, shortcut and reason that ``what`` was dropped, and why."""
    if (path, what, reason) not in _TOLD:
        _TOLD.add((path, what, reason))
        warnings.warn(f"{path}: {what} ({reason}); the results are the same, computed more slowly",
                      ShortcutFallback, stacklevel=3)


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
    advance (no ``"shared"`` steps)."""

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
        self._splitters: dict[int, LastPosition] = {}
        self.modes = self._choose_modes()

    # ------------------------------------------------------------------ modes
    @property
    def shared_steps(self) -> int:
        """How many leading steps are computed once per token (mode ``"shared"``)."""
        return sum(mode == "shared" for mode in self.modes)

    @property
    def last_position_only(self) -> bool:
        """Whether the decoder runs on the last position alone."""
        return self.modes[-1] == "last"

    @property
    def split_steps(self) -> list[str]:
        """Names of the position-mixing units run once per group of earlier tokens."""
        return [step.unit.name for step, mode in zip(self.schedule.steps, self.modes, strict=True)
                if mode == "split"]

    def _choose_modes(self, split: bool = True, shortcuts: bool = True) -> list[str]:
        """Each step's mode: walked from the decoder back, a step runs on the last position only
        when everything that reads it does. ``split=False``: no position-mixing unit is split;
        ``shortcuts=False``: the plain schedule."""
        steps = self.schedule.steps
        if not shortcuts or self.length < 2:
            return ["full"] * len(steps)
        shared = _per_token_prefix(steps) if self.tokens is not None else 0
        readers: list[list[int]] = [[] for _ in steps]
        for index, step in enumerate(steps):
            for term in [*step.centers, *(d for ds in step.directions for d in ds)]:
                readers[self.schedule.location[term.uid][0]].append(index)
        modes = ["full"] * len(steps)
        for index in range(len(steps) - 1, -1, -1):
            step = steps[index]
            if index < shared:
                modes[index] = "shared"
                continue
            if not all(modes[r] == "last" for r in readers[index]) or step.kind in ("source", "stream") \
                    or step.order != 0 or step.directions:
                continue
            kind = getattr(step.unit, "kind", None)
            if step.kind == "identity" or isinstance(step.unit, Decoder) or \
                    (kind == "mlp" and not step.unit.side_inputs):
                modes[index] = "last"
            elif split and self.split_positions and step.kind == "jet" and kind == "attn":
                try:
                    self._splitters[index] = LastPosition(step.unit.graph_module)
                    modes[index] = "split"
                except PositionSplitError as error:
                    fell_back(self.name, f"{step.unit.name} runs on every position, not split by position",
                              str(error))
        return modes

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.device)
        if all(mode == "full" for mode in self.modes):
            return evaluate_path(self.schedule, ids)
        return self._evaluate(ids)

    def _evaluate(self, ids: torch.Tensor, counts: list[float] | None = None) -> torch.Tensor:
        """The steps in their modes; with ``counts``, each step's matmul FLOPs are appended to
        it and shared steps are computed plainly (and counted as zero)."""
        from torch.utils.flop_counter import FlopCounterMode

        run = BatchedRun(self.schedule, ids)
        last = RunInputs(self.view, ids[:, -1:])
        groups: dict[int, Groups] = {}
        for index, step in enumerate(self.schedule.steps):
            mode = self.modes[index]
            counter = FlopCounterMode(display=False) if counts is not None and mode != "shared" else None
            with counter if counter is not None else contextlib.nullcontext():
                if mode == "shared":
                    buffer = self._gathered(index, ids) if counts is None else run.compute(step)
                elif mode == "last":
                    centers = run.gather(step.centers)[:, :, -1:, :] if step.centers else None
                    buffer = evaluate_terms(step.terms, last, centers, step.center_of)
                elif mode == "split":
                    buffer = self._split(index, step, run, ids, groups, replay=counts is None)
                else:
                    buffer = run.compute(step)
            run.buffers.append(buffer)
            if counts is not None:
                counts.append(counter.get_total_flops() if counter is not None else 0.0)
        return run.gather(self.schedule.outputs)[0, :, -1, :]

    @property
    def shared_bytes(self) -> int:
        """Memory the per-token prefix holds (estimated before it is computed)."""
        if not self.shared_steps:
            return 0
        width = self.view.decoder.unembedding.shape[1]
        rows = sum(len(s.terms) for s in self.schedule.steps[: self.shared_steps])
        return rows * len(self.tokens) * self.length * width * 4

    # ------------------------------------------------------------------ the shortcuts
    def _split(self, index: int, step, run: BatchedRun, ids: torch.Tensor,
               groups: dict[int, Groups], replay: bool = True) -> torch.Tensor:
        """A position-mixing unit's order-0 jet at the last position, its earlier positions'
        position-wise work once per group of contexts (the whole unit where that fails).
        ``replay=False`` interprets the graph instead of replaying its trace (to count FLOPs)."""
        centers = run.gather(step.centers)
        count, batch, seq, width = centers.shape
        if count not in groups:
            groups[count] = Groups.of(ids, copies=count)
        side = run.inputs.side_for(count)
        try:
            splitter = self._splitters[index]
            values = (splitter if replay else splitter.interpret)(
                centers.reshape(count * batch, seq, width), [side[name] for name in step.unit.side_inputs],
                groups[count])
        except PositionSplitError as error:
            fell_back(self.name, f"{step.unit.name} ran on every position, not split by position", str(error))
            return run.compute(step)[:, :, -1:, :]
        return term_rows(step.terms, values.reshape(count, batch, 1, -1), count, step.center_of)

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
        if all(mode == "full" for mode in self.modes) or not len(probe):
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
            if "split" in self.modes or "shortcuts" in fallback:
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
