"""Best-first search of the path tree of a frozen network, complete and exact at every step.

The paths form a tree of prefixes: a source, then units in depth order. A prefix stands for the
group of every path that begins with it, and its total is exact (:class:`FrozenNetwork`).
Expanding a prefix replaces it by its children — the path that ends there, and one group per
unit that can come next — whose totals sum to its own. The search expands the group of largest
|total| first, so at any moment the listed paths plus the groups not yet expanded are a complete
and exact decomposition of the target.

Children are kept per parent in order of |total| and only the best not yet taken sits in the
heap (a k-way merge), so the heap holds one entry per expanded group, not one per child. The
``batch`` largest groups are taken at once and their vectors computed in one call per unit (the
held values broadcast over the batch), so the order is best-first up to a batch.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from dataclasses import dataclass, field

import torch

from jetgraph.applications.explain.network import FrozenNetwork, Source


@dataclass(eq=False)
class Prefix:
    """An expanded group: its source, the units so far (view indices), its vector ([seq, d]), and
    its children in order of |total| (``-1``: the path ends here)."""

    source: Source
    units: tuple[int, ...]
    vector: torch.Tensor | None = field(repr=False)
    children: list[int] = field(default_factory=list, repr=False)
    totals: list[float] = field(default_factory=list, repr=False)
    taken: int = 0


@dataclass(frozen=True)
class Found:
    """A listed path (``ends``) or a group left unexpanded, with its exact total."""

    source: Source
    units: tuple[int, ...]
    total: float
    ends: bool


@dataclass
class SearchResult:
    """The listed paths; the ``kept`` largest groups left unexpanded; the rest of them summed
    (``rest_total``, ``rest_mass`` = Σ|total|, ``rest_count``)."""

    paths: list[Found]
    groups: list[Found]
    rest_total: float
    rest_mass: float
    rest_count: int
    expansions: int
    seconds: float
    stopped: str


END = -1


class PathSearch:
    """Best-first expansion of ``network``'s path tree, ``batch`` groups at a time.

    ``budget``: the most groups expanded (each costs one frozen unit application);
    ``max_seconds``; ``goal``: stop once the listed paths (with the decoder's constant) carry
    this share of the target value (None: no goal)."""

    def __init__(self, network: FrozenNetwork, budget: int, max_seconds: float, goal: float | None,
                 kept: int = 100, batch: int = 16) -> None:
        self.network = network
        self.budget, self.max_seconds, self.goal, self.kept = budget, max_seconds, goal, kept
        self.batch = batch
        self.heap: list[tuple[float, int, Prefix | Source, int]] = []
        self.counter = itertools.count()
        self.listed: list[Found] = []
        self.listed_mass = 0.0
        self.listed_total = 0.0
        self.open_mass = 0.0  # Σ |total| of every group and path not yet taken

    def run(self) -> SearchResult:
        start = time.perf_counter()
        for source in self.network.sources():
            self._push(source, 0, abs(source.total))
            self.open_mass += abs(source.total)
        expansions, stopped = 0, "complete: every path listed"
        value = self.network.value
        self.listed_total = self.network.decoder_constant()  # listed as a path of its own
        while self.heap:
            if self.goal is not None and value and self.listed_total / value >= self.goal:
                stopped = f"goal: the listed paths carry {self.goal:.0%} of the value"
                break
            if expansions >= self.budget:
                stopped = f"budget: {self.budget} expansions"
                break
            if time.perf_counter() - start > self.max_seconds:
                stopped = f"time: {self.max_seconds:g} s"
                break
            batch = self._take(min(self.batch, self.budget - expansions))
            expansions += len(batch)
            self._expand_all(batch)
        groups, rest = self._groups()
        return SearchResult(self.listed, groups, *rest, expansions, time.perf_counter() - start, stopped)

    def _take(self, most: int) -> list[tuple[Source, tuple[int, ...], int, torch.Tensor | None, float]]:
        """The largest groups off the heap, up to ``most`` (paths that end come off on the way and
        are listed): (source, units, state, the parent's vector or None for a source, total)."""
        taken = []
        while self.heap and len(taken) < most:
            _, _, item, rank = heapq.heappop(self.heap)
            if isinstance(item, Source):
                taken.append((item, (), item.state, None, item.total))
                continue
            child, total, parent_vector = item.children[rank], item.totals[rank], item.vector
            self._take_next(item)
            self.open_mass -= abs(total)
            if child == END:
                self.listed.append(Found(item.source, item.units, total, ends=True))
                self.listed_mass += abs(total)
                self.listed_total += total
                continue
            taken.append((item.source, (*item.units, child), child + 1, parent_vector, total))
        return taken

    def _expand_all(self, taken: list) -> None:
        """The vectors of the taken groups (one batched call per unit), then their children."""
        vectors: list[torch.Tensor | None] = [None] * len(taken)
        by_unit: dict[int, list[int]] = {}
        for i, (source, units, _, parent, _) in enumerate(taken):
            if parent is None:
                vectors[i] = self.network.source_vector(source)
            else:
                by_unit.setdefault(units[-1], []).append(i)
        for unit, members in by_unit.items():
            applied = self.network.apply_many(unit, torch.stack([taken[i][3] for i in members]))
            for i, vector in zip(members, applied, strict=True):
                vectors[i] = vector
        if not taken:
            return
        stacked = torch.stack(vectors)  # type: ignore[arg-type]
        direct, through = self.network.direct_many(stacked), self.network.through_many(stacked)
        for i, (source, units, state, _, total) in enumerate(taken):
            readers = self.network.readers(state)
            self._expand(source, units, state, vectors[i], total, float(direct[i]), through[readers, i])

    def _push(self, item: Prefix | Source, rank: int, size: float) -> None:
        heapq.heappush(self.heap, (-size, next(self.counter), item, rank))

    def _expand(self, source: Source, units: tuple[int, ...], state: int, vector: torch.Tensor,
                total: float, direct: float, through: torch.Tensor) -> None:
        """Replace a group by its children: the path ending here (``direct``) and one group per
        next unit (``through``, over the units that read ``state`` or later)."""
        if not units:
            self.open_mass -= abs(total)
        readers = self.network.readers(state)
        totals = torch.cat([torch.tensor([direct], dtype=torch.float64), through])
        ids = torch.cat([torch.tensor([END]), readers])
        order = torch.argsort(totals.abs(), descending=True)
        prefix = Prefix(source, units, vector, ids[order].tolist(), totals[order].tolist())
        self.open_mass += float(totals.abs().sum())
        self._take_next(prefix, first=True)

    def _take_next(self, prefix: Prefix, first: bool = False) -> None:
        rank = 0 if first else prefix.taken + 1
        if not first:
            prefix.taken = rank
        if rank < len(prefix.children):
            self._push(prefix, rank, abs(prefix.totals[rank]))
        else:
            prefix.vector = None  # every child taken: the vector is no longer needed

    def _groups(self) -> tuple[list[Found], tuple[float, float, int]]:
        """Everything not taken (each heap entry and the siblings after it): the ``kept``
        largest as groups, the rest as (total, Σ|total|, count)."""
        entries = []  # (|total|, total, item, child rank)
        for _, _, item, rank in self.heap:
            if isinstance(item, Source):
                entries.append((abs(item.total), item.total, item, -1))
                continue
            entries += [(abs(t), t, item, r) for r, t in enumerate(item.totals[rank:], rank)]
        entries.sort(key=lambda e: -e[0])
        groups = []
        for _, total, item, rank in entries[:self.kept]:
            if isinstance(item, Source):
                groups.append(Found(item, (), total, ends=False))
                continue
            child = item.children[rank]
            units = item.units if child == END else (*item.units, child)
            groups.append(Found(item.source, units, total, ends=child == END))
        rest = entries[self.kept:]
        return groups, (math.fsum(e[1] for e in rest), math.fsum(e[0] for e in rest), len(rest))


__all__ = ["Found", "PathSearch", "SearchResult"]
