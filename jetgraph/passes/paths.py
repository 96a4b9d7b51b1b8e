"""Algorithm 2: the exhaustive order-0 expansion into input→output paths, enumerated lazily.

At order 0 the jet of a unit at a centre is the unit applied to the centre, J^0 γ(c)(h) = γ(c),
so expanding every unit in turn around all terms of the stream (Algorithm 1 with
``identity="pass"``) turns the model into one term per *path*: a source (an encoder addend)
followed by an increasing sequence of units, each applied to the previous term. Paths are
enumerated one by one with filters on provenance — never 2^L at once unless asked — and each is
decoded by the decoder's order-0 jet. With parallel blocks (GPT-NeoX, GPT-J, Phi) a path takes
at most one branch per block, since the branches read the same stream.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass

from jetgraph.ir import ResidualProgram, ResidualUnit
from jetgraph.passes.expand import Expansion, Term, source_terms


@dataclass(frozen=True)
class PathSpec:
    """One path: a source addend and the units it passes through, in order."""

    source: str
    units: tuple[str, ...]

    @property
    def name(self) -> str:
        return "→".join((f"embed.{self.source}", *self.units, "unembed"))


class PathExpansion:
    """The paths of ``prog`` that pass the filters, as a lazy sequence of terms."""

    def __init__(self, prog: ResidualProgram, weights: str, include: Callable[[ResidualUnit], bool],
                 max_length: int | None) -> None:
        self.prog = prog
        self.weights = weights
        self.include = include
        self.max_length = max_length
        self._counts = _centre_counts(prog)

    def __iter__(self) -> Iterator[PathSpec]:
        units = self.prog.units
        allowed = [u for u in units if self.include(u)]
        for source in self.prog.encoder.addend_names:
            yield from (PathSpec(source, tuple(u.name for u in chosen))
                        for chosen in _increasing(allowed, self.max_length))

    def count(self) -> int:
        """The number of paths, by enumeration of unit sequences (no tensors)."""
        return sum(1 for _ in self)

    def terms(self) -> Iterator[Term]:
        """Logit-space terms, one per path (built lazily)."""
        by_name = {u.name: u for u in self.prog.units}
        built: dict[tuple[str, ...], Term] = {t.path: t for t in source_terms(self.prog)}
        for spec in self:
            path: tuple[str, ...] = (f"embed.{spec.source}",)
            for name in spec.units:  # shared prefixes are the same Term: evaluated once
                center, path = built[path], (*path, name)
                if path not in built:
                    built[path] = Term("jet", path, unit=name, center=center,
                                       weight=self._weight(by_name[name].reads))
            yield Term("jet", (*path, "unembed"), unit="unembed", center=built[path],
                       weight=self._weight(len(self.prog.units)), space="logits")

    def expansion(self, limit: int | None = None) -> Expansion:
        """The first ``limit`` paths (all if None) as an :class:`Expansion` with a remainder."""
        terms = []
        for term in self.terms():
            if limit is not None and len(terms) >= limit:
                break
            terms.append(term)
        if not terms:
            raise ValueError("the filters select no path: every unit was excluded and there is "
                             "no source, or max_length < 0")
        return Expansion(self.prog, len(self.prog.units), terms, "logits", 0)

    def _weight(self, state: int) -> float:
        return 1.0 if self.weights == "unit" else 1.0 / self._counts[state]


def expand_paths(
    prog: ResidualProgram,
    order: int = 0,
    granularity: str | None = None,
    include: Collection[str] | None = None,
    exclude: Collection[str] | None = None,
    max_length: int | None = None,
    weights: str = "uniform",
) -> PathExpansion:
    """Algorithm 2 at order 0: all paths of ``prog`` (at ``granularity``), lazily.

    ``include`` / ``exclude`` filter units by kind (``"attn"``, ``"mlp"``) or name
    (``"mlp3"``); ``exclude={"attn"}`` keeps the attention-free paths, whose terms see one token
    only (the bigram paths). ``max_length`` caps the number of units on a path. ``weights``:
    ``"uniform"`` (each unit's term divided by the number of stream terms it was expanded at,
    the paper's choice) or ``"unit"`` (the textbook sum over paths of linear networks).
    """
    if order != 0:
        raise NotImplementedError("expand_paths supports order 0; higher orders are issue 4's open part")
    if weights not in ("uniform", "unit"):
        raise ValueError(f"weights must be 'uniform' or 'unit', got {weights!r}")
    if max_length is not None and max_length < 0:
        raise ValueError(f"max_length must be >= 0, got {max_length}")
    view = prog.at(granularity) if granularity else prog  # type: ignore[arg-type]
    names = {u.name for u in view.units} | {u.kind for u in view.units}
    for label, chosen in (("include", include), ("exclude", exclude)):
        unknown = set(chosen or ()) - names
        if unknown:
            raise ValueError(f"{label} names unknown units or kinds {sorted(unknown)}; known kinds: "
                             f"{sorted({u.kind for u in view.units})}, units: {[u.name for u in view.units]}")

    def keep(unit: ResidualUnit) -> bool:
        tags = {unit.name, unit.kind}
        if include is not None and not tags & set(include):
            return False
        return not (exclude is not None and tags & set(exclude))

    return PathExpansion(view, weights, keep, max_length)


def _increasing(units: list[ResidualUnit], max_length: int | None) -> Iterator[tuple[ResidualUnit, ...]]:
    """Increasing unit sequences (at most one branch per parallel group), shortest first."""
    limit = len(units) if max_length is None else min(max_length, len(units))

    Chain = tuple[ResidualUnit, ...]

    def extend(prefix: Chain, start: int, length: int) -> Iterator[Chain]:
        if len(prefix) == length:
            yield prefix
            return
        for i in range(start, len(units)):
            unit = units[i]
            if prefix and unit.reads <= prefix[-1].index:
                continue  # reads a stream state from before the previous unit's output
            yield from extend((*prefix, unit), i + 1, length)

    for length in range(limit + 1):
        yield from extend((), 0, length)


def _centre_counts(prog: ResidualProgram) -> list[int]:
    """Number of terms in the fully expanded stream at each state (the uniform weights' N)."""
    counts = [len(prog.encoder.addend_names)]
    for unit in prog.units:
        counts.append(counts[-1] + counts[unit.reads])
    return counts




# ------------------------------------------------------------------------------------ counts
def count_paths(prog: ResidualProgram, granularity: str | None = None) -> int:
    """The number of order-0 paths (all sources), from the units' reads: P_{i+1} = P_i + P_{reads_i}."""
    view = prog.at(granularity) if granularity else prog  # type: ignore[arg-type]
    return _centre_counts(view)[-1]


def closed_form(granularity: str = "block", parallel: bool = False):
    """sympy: order-0 paths of an L-layer transformer per source — 2^L per block; at sublayer
    granularity 4^L (sequential blocks) or 3^L (parallel attention and MLP branches)."""
    import sympy as sp

    layers = sp.Symbol("L", integer=True, nonnegative=True)
    if granularity == "block":
        return 2**layers
    return (3 if parallel else 4) ** layers


def nested_paths(layers: int | Sequence[int], depth: int | None = None) -> int:
    """Paths through a network whose units nest residual programs ``depth`` levels deep.

    A depth-R unit is a residual program of L depth-(R−1) units, so P_R = (1 + P'_{R−1})^L where
    P' = P − 1 counts the paths through a unit's update (all of its program's paths but the
    all-skip identity) and P_0 = 1. ``layers`` is one L for every level, or one per level,
    outermost first: ``nested_paths([L, 2])`` is a transformer of L blocks of two sublayers, 4^L.
    """
    widths = [layers] * (depth or 0) if isinstance(layers, int) else list(layers)[::-1]
    if isinstance(layers, int) and depth is None:
        raise ValueError("give depth with a single layer count")
    if any(w < 0 for w in widths) or (depth is not None and depth < 0):
        raise ValueError("layers and depth must be >= 0")
    through_unit, total = 1, 1  # an atomic unit's update is one path
    for width in widths:  # innermost level first
        total = (1 + through_unit) ** width
        through_unit = total - 1
    return total


def split_term_counts(sources: int, layers: int, order: int) -> list[int]:
    """Stream terms after each unit when every unit is expanded with ``split=True``.

    Each of the N_ℓ terms passes unchanged (identity) and spawns one term per monomial of
    degree ≤ k in the other N_ℓ − 1 terms: N_{ℓ+1} = N_ℓ + N_ℓ·C(N_ℓ − 1 + k, k). For k ≥ 1 this
    grows super-exponentially in depth (N_{ℓ+1} = Θ(N_ℓ^{k+1})); for k = 0 it is 2^ℓ per source.
    """
    import math

    counts = [sources]
    for _ in range(layers):
        n = counts[-1]
        counts.append(n + n * math.comb(n - 1 + order, order))
    return counts
