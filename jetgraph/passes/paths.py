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

import itertools
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence

from jetgraph.errors import CostError
from jetgraph.ir import ResidualProgram, ResidualUnit
from jetgraph.passes.expansion import Expansion
from jetgraph.passes.pathspec import LAST_OF_KIND, LAST_STATE, PathSpec, parse_path, reads_context
from jetgraph.passes.pathspec import starts_at_model_state as spec_starts_at_model_state
from jetgraph.passes.terms import Term, source_terms, stream_term
from jetgraph.taylor import check_order


class PathExpansion:
    """The paths of ``prog`` that pass the filters (or the paths given), as a lazy sequence."""

    def __init__(self, prog: ResidualProgram, weights: str, include: Callable[[ResidualUnit], bool],
                 max_length: int | None, order: int = 0, paths: Sequence[PathSpec] | None = None) -> None:
        self.prog = prog
        self.weights = weights
        self.include = include
        self.max_length = max_length
        self.order = order
        self.paths = tuple(paths) if paths is not None else None
        self._counts = _center_counts(prog, order)

    def __iter__(self) -> Iterator[PathSpec]:
        if self.paths is not None:
            yield from self.paths
            return
        allowed = [u for u in self.prog.units if self.include(u)]
        sources = [t.label for t in source_terms(self.prog)]
        for source in sources:
            for chosen in _increasing(allowed, self.max_length):
                names = tuple(u.name for u in chosen)
                for degrees in itertools.product(range(self.order + 1), repeat=len(chosen) + 1):
                    yield PathSpec(source, names, degrees)

    def count(self) -> int:
        """The number of paths, without enumerating them: a dynamic programme over the units
        counts the increasing unit chains of each length (a chain may extend one whose last unit
        wrote the stream state it reads), and each chain of length l is (k+1)^(l+1) paths."""
        if self.paths is not None:
            return len(self.paths)
        units = [u for u in self.prog.units if self.include(u)]
        limit = len(units) if self.max_length is None else min(self.max_length, len(units))
        chains: list[list[int]] = []  # chains[i][l]: chains of length l ending at units[i]
        for i, unit in enumerate(units):
            row = [0] * (limit + 1)
            if limit >= 1:
                row[1] = 1
            for j in range(i):
                if unit.reads > units[j].index:
                    for length in range(2, limit + 1):
                        row[length] += chains[j][length - 1]
            chains.append(row)
        per_order = self.order + 1
        per_source = per_order + sum(row[length] * per_order ** (length + 1)
                                     for row in chains for length in range(1, limit + 1))
        return per_source * len(self.prog.encoder.addend_names)

    def terms(self) -> Iterator[Term]:
        """Logit-space terms, one per path (built lazily; shared prefixes are one term)."""
        by_name = {u.name: u for u in self.prog.units}
        built: dict[tuple, Term] = {(t.label,): t for t in source_terms(self.prog)}
        decoder_weight = self._weight(len(self.prog.units))
        for spec in self:
            key: tuple = (spec.source,)
            if key not in built:
                built[key] = _source(self.prog, spec.source)
            for name, degree in zip(spec.units, spec.degrees, strict=False):
                center, key = built[key], (*key, (name, degree))
                if key not in built:
                    unit = by_name[name]
                    built[key] = center.then(unit, degree, self.order, self._weight(unit.reads))
            yield built[key].then(self.prog.decoder, spec.degrees[-1], self.order, decoder_weight)

    def expansion(self, limit: int | None = None, max_terms: int | None = 100_000) -> Expansion:
        """The first ``limit`` paths (all if None) as an :class:`Expansion` with a remainder.

        Without a ``limit``, more than ``max_terms`` paths (None: no bound) are refused before
        any is built, with the count: 2^L paths do not fit in memory for deep models."""
        if limit is None and max_terms is not None:
            count = self.count()
            if count > max_terms:
                raise CostError(f"{count:,} paths pass the filters, more than max_terms={max_terms:,}: "
                                "filter by kind or name (include/exclude), lower max_length, take the "
                                "first paths with limit=, or raise max_terms")
        terms = []
        for term in self.terms():
            if limit is not None and len(terms) >= limit:
                break
            terms.append(term)
        if not terms:
            raise ValueError("the filters select no path: every unit was excluded and there is "
                             "no source, or max_length < 0")
        return Expansion(self.prog, len(self.prog.units), terms, self.order)

    def _weight(self, state: int) -> float:
        return 1.0 if self.weights == "unit" else 1.0 / self._counts[state]


def expand_paths(
    prog: ResidualProgram,
    order: int = 0,
    granularity: str | None = None,
    include: Collection[str] | None = None,
    exclude: Collection[str] | None = None,
    max_length: int | None = None,
    weights: str = "unit",
    paths: Sequence[str | PathSpec] | None = None,
) -> PathExpansion:
    """Algorithm 2: all paths of ``prog`` (at ``granularity``), lazily; at order k each unit on a
    path (and the decoder) contributes one of its Taylor coefficients 0..k along the stream.

    ``include`` / ``exclude`` filter units by kind (``"attn"``, ``"mlp"``) or name
    (``"mlp3"``); ``exclude={"attn"}`` keeps the attention-free paths, whose terms see one token
    only (the bigram paths). ``max_length`` caps the number of units on a path. ``paths`` takes
    explicit paths in the path language instead (``["E→mlp0→U", "E→attn0^1→U"]``, see
    :mod:`jetgraph.passes.pathspec`), without filters. ``weights``: ``"unit"`` (default: each path
    term is the path's own value, e.g. a bigram path's logits as ``ngram_table`` reads them; for
    linear networks the paths sum to the model) or ``"uniform"`` (each unit's term divided by the
    number of stream terms it was expanded at, Algorithm 2's choice in the paper: 2^-60 on a
    30-block model, so the terms are tiny).
    """
    check_order(order)
    if weights not in ("uniform", "unit"):
        raise ValueError(f"weights must be 'uniform' or 'unit', got {weights!r}")
    if max_length is not None and max_length < 0:
        raise ValueError(f"max_length must be >= 0, got {max_length}")
    view = prog.at(granularity) if granularity else prog  # type: ignore[arg-type]
    if paths is not None:
        if include is not None or exclude is not None or max_length is not None:
            raise ValueError("give explicit paths or filters (include, exclude, max_length), not both")
        if not paths:
            raise ValueError("paths is empty: give at least one path such as 'E→U'")
        if granularity is None:  # the view whose units the paths name, as for path_term
            parsed = [parse_path(p) if isinstance(p, str) else p for p in paths]
            views = {path_view(prog, p).granularity for p in parsed if p.units}
            if len(views) > 1:
                raise ValueError("the paths name units of both views (blocks and sublayers): give "
                                 "paths of one view, or granularity=")
            view = prog.at(views.pop()) if views else prog  # type: ignore[arg-type]
        specs = [bind_path(view, p) for p in paths]
        deepest = max(s.order for s in specs)
        if deepest > order:
            raise ValueError(f"path {max(specs, key=lambda s: s.order).name!r} takes a degree-{deepest} "
                             f"coefficient; give order >= {deepest}")
        return PathExpansion(view, weights, lambda unit: True, None, order, specs)
    include = {include} if isinstance(include, str) else include  # one name, not its letters
    exclude = {exclude} if isinstance(exclude, str) else exclude
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

    if (include is not None or exclude is not None) and not any(keep(u) for u in view.units):
        raise ValueError(f"the filters select no unit (include={sorted(include or [])}, "
                         f"exclude={sorted(exclude or [])}); only the embed→unembed path would remain")
    return PathExpansion(view, weights, keep, max_length, order)


# ------------------------------------------------------------------- binding paths to a model
def path_view(prog: ResidualProgram, spec: str | PathSpec) -> ResidualProgram:
    """The view of ``prog`` whose units the path names: the sublayer view (``attn0``, ``mlp3``)
    unless every name is a block's (``block2``); a path with no unit reads the sublayer view."""
    spec = parse_path(spec) if isinstance(spec, str) else spec
    blocks = {u.name for u in prog.at("block").units}
    if spec.units and all(name in blocks for name in spec.units):
        return prog.at("block")
    return prog.at("sublayer")


def bind_path(prog: ResidualProgram, spec: str | PathSpec) -> PathSpec:
    """``spec`` with its aliases resolved against ``prog``'s units (``MLP_last`` → ``mlp29``,
    ``h_last`` → ``h60``) and every name checked: the units must exist in ``prog``'s view and
    appear in model order."""
    text = spec if isinstance(spec, str) else spec.name
    parsed = parse_path(spec) if isinstance(spec, str) else spec
    units = {u.name: u for u in prog.units}
    last = {kind: [u.name for u in prog.units if u.kind == kind] for kind in LAST_OF_KIND.values()}
    sources = {t.label for t in source_terms(prog)}
    if parsed.source.lower() == LAST_STATE:
        parsed = PathSpec(f"h{len(prog.units)}", parsed.units, parsed.degrees)
    if parsed.source not in sources and not _is_valid_state(prog, parsed.source):
        raise ValueError(f"path {text!r} starts at {parsed.source!r}; sources are E (= embed.token), "
                         f"{sorted(sources)}, h0..h{len(prog.units)} and h_last")
    names: list[str] = []
    previous = _start_state(prog, parsed.source) - 1
    for name in parsed.units:
        kind = LAST_OF_KIND.get(name.lower())
        resolved = (last[kind][-1] if last[kind] else None) if kind else name
        if resolved not in units:
            raise ValueError(f"path {text!r} names unknown unit {name!r}; units of the {prog.granularity} "
                             f"view: {list(units)} (or MLP_last, ATTN_last)")
        unit = units[resolved]
        if unit.reads <= previous:
            raise ValueError(f"path {text!r}: units must appear in model order, each reading the stream "
                             f"after the one before ({unit.name} reads h{unit.reads})")
        previous = unit.index
        names.append(resolved)
    return PathSpec(parsed.source, tuple(names), parsed.degrees)


def path_term(prog: ResidualProgram, spec: str | PathSpec | Term, order: int | None = None) -> Term:
    """A logit-space path term (unit weights: the path's own value) from the path language:
    ``"E→U"``, ``"E→mlp3→U"``, ``"E→MLP_last^1→U"``, ``"E→block2→U"``; names are resolved in
    the view that holds them (:func:`path_view`). ``order`` is the jets' truncation order
    (default: the largest degree on the path). A logit-space :class:`Term` is returned as is."""
    if isinstance(spec, Term):
        if spec.space != "logits":
            raise ValueError(f"a path must end in the decoder (logit space), got {spec!r}")
        return spec
    view = path_view(prog, spec)
    bound = bind_path(view, spec)
    depth = check_order(order if order is not None else bound.order, "the path's order")
    units = {u.name: u for u in view.units}
    term = _source(view, bound.source)
    for name, degree in zip(bound.units, bound.degrees, strict=False):
        term = term.then(units[name], degree, depth)
    return term.then(view.decoder, bound.degrees[-1], depth)


def view_of_term(prog: ResidualProgram, term: Term) -> ResidualProgram:
    """The view of ``prog`` (sublayer, else block) whose units a term's path passes through."""
    for granularity in ("sublayer", "block"):
        view = prog.at(granularity)  # type: ignore[arg-type]
        known = {id(u) for u in view.units} | {id(view.decoder)}
        if all(id(unit) in known for unit in term.units()):
            return view
    raise ValueError(f"term {term.name!r} passes units that are not this program's")


def starts_at_model_state(path: str | PathSpec | Term) -> bool:
    """Whether a path starts at a stream state past the embedding (``h_last``, ``hN`` with
    N ≥ 1): the model's own computation, which reads every position, so its contexts may have any
    length (one token unless given). The same question before capture (text, a PathSpec) and after
    (a bound term), under one name."""
    if isinstance(path, Term):
        source = path.chain()[0]
        return source.kind == "stream" and (source.state or 0) >= 1
    return spec_starts_at_model_state(path)


def context_tokens(path: str | PathSpec | Term) -> int | None:
    """Tokens of context a path reads: 2 if it passes a unit that mixes positions (attention),
    else 1. A bound term answers exactly (its units' kinds); text or a PathSpec answers from the
    unit names, None when the path passes a whole block (its kind is known after capture)."""
    if isinstance(path, Term):
        return 2 if any(unit.kind == "attn" for unit in path.units()) else 1
    mixes = reads_context(path)
    return None if mixes is None else 2 if mixes else 1


def context_length(term: Term) -> int:
    """Deprecated (goes in 0.9): :func:`context_tokens`."""
    warnings.warn("context_length(term) is deprecated and goes in 0.9: use context_tokens",
                  DeprecationWarning, stacklevel=2)
    return context_tokens(term)  # type: ignore[return-value]


def _source(prog: ResidualProgram, label: str) -> Term:
    sources = {t.label: t for t in source_terms(prog)}
    return sources[label] if label in sources else stream_term(prog, int(label[1:]))


def _is_valid_state(prog: ResidualProgram, label: str) -> bool:
    return label.startswith("h") and label[1:].isdigit() and int(label[1:]) <= len(prog.units)


def _start_state(prog: ResidualProgram, label: str) -> int:
    """The stream state a path's source stands at (0 for encoder addends)."""
    return int(label[1:]) if _is_valid_state(prog, label) else 0


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


def _center_counts(prog: ResidualProgram, order: int = 0) -> list[int]:
    """Number of terms in the fully expanded stream at each state (the uniform weights' N):
    each unit adds k+1 terms (one per order) for every term of the state it reads."""
    counts = [len(prog.encoder.addend_names)]
    for unit in prog.units:
        counts.append(counts[-1] + (order + 1) * counts[unit.reads])
    return counts




# ------------------------------------------------------------------------------------ counts
def count_paths(prog: ResidualProgram, granularity: str | None = None, order: int = 0) -> int:
    """The number of paths (all sources) from the units' reads: P_{i+1} = P_i + (k+1)·P_{reads_i},
    times k+1 for the decoder's orders."""
    if not isinstance(order, int) or isinstance(order, bool) or order < 0:
        raise ValueError(f"order must be a non-negative int, got {order!r}")
    view = prog.at(granularity) if granularity else prog  # type: ignore[arg-type]
    return (order + 1) * _center_counts(view, order)[-1]


def closed_form(granularity: str = "block", parallel: bool = False, order: int = 0):
    """sympy: paths of an L-layer transformer per source — (k+1)(k+2)^L per block; at sublayer
    granularity (k+1)(k+2)^{2L} (sequential blocks) or (k+1)(2k+3)^L (parallel branches).
    At order 0: 2^L, 4^L and 3^L."""
    import sympy as sp

    layers = sp.Symbol("L", integer=True, nonnegative=True)
    k = order
    if granularity == "block":
        return (k + 1) * (k + 2) ** layers
    return (k + 1) * ((2 * k + 3) if parallel else (k + 2) ** 2) ** layers


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
