"""Execution modes: where each step of a schedule runs when only the last position is read.

A schedule computes every position of every input. A reader that wants the last position only
(an n-gram table, a path's rows) can give each step one of four modes, executed by
:meth:`~jetgraph.codegen.execute.BatchedRun.run_modes`:

- ``"given"``: the caller supplies the buffer (an n-gram table's per-token prefix, computed once
  per distinct token);
- ``"last"``: a step whose value is read at the last position only and that acts position by
  position (the decoder; an MLP after the last attention unit) runs on the last position alone;
- ``"split"``: an order-0 jet of a position-mixing unit whose value is read at the last position
  only runs through :class:`~jetgraph.codegen.positions.LastPosition` (its earlier positions once
  per group of inputs with the same earlier tokens);
- ``"full"``: the plain step, every position.

Modes are chosen from the schedule alone (which step reads which, and the steps' kinds and
orders). A shortcut that cannot be taken falls back to the plain step with the same numbers,
and says so once per path and reason (:class:`ShortcutFallback`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from jetgraph.codegen.positions import LastPosition, PositionSplitError
from jetgraph.codegen.schedule import Schedule
from jetgraph.ir import Decoder

MODES = ("given", "last", "split", "full")
_TOLD: set[tuple[str, str, str]] = set()


class ShortcutFallback(RuntimeWarning):
    """A shortcut was dropped (same numbers, computed more slowly): warned once per path,
    shortcut and reason."""


def fell_back(path: str, what: str, reason: str) -> None:
    """Warn once per (path, what, reason) that ``what`` happened instead of a shortcut, and why."""
    if (path, what, reason) not in _TOLD:
        _TOLD.add((path, what, reason))
        warnings.warn(f"{path}: {what} ({reason}); the results are the same, computed more slowly",
                      ShortcutFallback, stacklevel=3)


@dataclass
class Modes:
    """Each step's mode, and the position splitter of each ``"split"`` step (by index)."""

    modes: list[str]
    splitters: dict[int, LastPosition] = field(default_factory=dict)
    name: str = ""  # what falls back, in warnings (a path's name)

    @property
    def plain(self) -> bool:
        """Whether every step runs plainly (no shortcut)."""
        return all(mode == "full" for mode in self.modes)

    def count(self, mode: str) -> int:
        return sum(m == mode for m in self.modes)

    def __getitem__(self, index: int) -> str:
        return self.modes[index]

    def __len__(self) -> int:
        return len(self.modes)


def plain_modes(schedule: Schedule, name: str = "") -> Modes:
    """Every step on every position."""
    return Modes(["full"] * len(schedule.steps), name=name)


def last_position_modes(schedule: Schedule, length: int, *, given: int = 0, split: bool = True,
                        name: str = "") -> Modes:
    """The modes of a run that reads the last position of inputs of ``length`` tokens: the first
    ``given`` steps supplied by the caller; walked from the decoder back, a step runs on the last
    position only when everything that reads it does; ``split=False``: no position-mixing unit
    is split."""
    steps = schedule.steps
    if length < 2:
        return plain_modes(schedule, name)
    readers: list[list[int]] = [[] for _ in steps]
    for index, step in enumerate(steps):
        for term in [*step.centers, *(d for ds in step.directions for d in ds)]:
            readers[schedule.location[term.uid][0]].append(index)
    modes = Modes(["full"] * len(steps), name=name)
    for index in range(len(steps) - 1, -1, -1):
        step = steps[index]
        if index < given:
            modes.modes[index] = "given"
            continue
        if not all(modes.modes[r] == "last" for r in readers[index]) or step.kind in ("source", "stream") \
                or step.order != 0 or step.directions:
            continue
        kind = getattr(step.unit, "kind", None)
        if step.kind == "identity" or isinstance(step.unit, Decoder) or \
                (kind == "mlp" and not step.unit.side_inputs):
            modes.modes[index] = "last"
        elif split and step.kind == "jet" and kind == "attn":
            try:
                modes.splitters[index] = LastPosition(step.unit.graph_module)
                modes.modes[index] = "split"
            except PositionSplitError as error:
                fell_back(name, f"{step.unit.name} runs on every position, not split by position", str(error))
    return modes
