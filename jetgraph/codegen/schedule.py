"""Plan the batched evaluation of an expansion: which unit applications run together.

An expansion is a DAG of symbolic :class:`~jetgraph.passes.expand.Term` s. Every distinct
computation in it is one *application*: a unit's jet at one centre (all its orders at once), an
identity branch, an encoder addend or a stream state. The schedule groups applications into
:class:`Step` s — all jets of one unit at one depth become a single call on centres stacked along
the batch dimension — and orders the steps so that every centre is computed before it is used.

Each step writes one *buffer* (a tensor [rows, batch, seq, width]); every term lives in one row of
one buffer, so gathering the centres of the next step is a handful of slices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from jetgraph.ir import ResidualProgram
from jetgraph.passes.expand import Expansion, Term
from jetgraph.taylor import Basis

DECODER = "unembed"


@dataclass
class Step:
    """One batched computation writing one buffer.

    ``kind``: ``"sources"`` (the encoder's addends, one row each), ``"states"`` (stream states
    h_i of the program's view), ``"jet"`` (the order-``depth`` jet of ``unit`` at every centre in
    ``centres``, one call) or ``"identity"`` (skip branches: w·c at order 0, w·h above).
    ``rows`` lists, per buffer row, the term and where its value comes from: a coefficient index
    (jet), the addend or state index (sources, states) or 0 (identity).
    """

    key: tuple
    kind: str
    unit: str | None = None
    depth: int = 0
    centres: list[Term] = field(default_factory=list)
    directions: list[tuple[Term, ...]] = field(default_factory=list)
    terms: list[Term] = field(default_factory=list)
    picks: list[tuple[int, int]] = field(default_factory=list)  # (coefficient, application)

    @property
    def label(self) -> str:
        if self.kind == "jet":
            split = f", split over {len(self.directions[0])} directions" if self.directions else ""
            return (f"{self.unit}: order-{self.depth} jet at {len(self.centres)} centre(s){split}, "
                    f"{len(self.terms)} term(s)")
        if self.kind == "identity":
            return f"{self.unit}: {len(self.terms)} skip branch(es)"
        return f"{self.kind}: {len(self.terms)} row(s)"


@dataclass
class Schedule:
    """Steps in execution order, where each term lives, and the expansion's output terms."""

    prog: ResidualProgram
    steps: list[Step]
    location: dict[int, tuple[int, int]]  # term uid -> (step index, row)
    outputs: list[Term]
    space: str
    target_state: int  # the stream state the expansion reconstructs (len(units) for logits)

    @property
    def applications(self) -> dict[str, int]:
        """Unit applications per unit: what the batched code computes (the DAG's jet nodes)."""
        counts: dict[str, int] = {}
        for step in self.steps:
            if step.kind == "jet":
                counts[step.unit] = counts.get(step.unit, 0) + len(step.centres)
        return counts

    def rows_of(self, terms: list[Term]) -> list[tuple[int, int]]:
        return [self.location[t.uid] for t in terms]


def plan(expansion: Expansion) -> Schedule:
    """Group the expansion's DAG into batched steps in dependency order."""
    prog = expansion.prog
    units = {u.name: u for u in prog.units}
    terms = _reachable(expansion.terms)
    level = _levels(terms)

    def group(term: Term, refine: bool) -> tuple:
        if term.kind in ("source", "stream"):
            return (term.kind,)
        if term.kind == "identity":
            key: tuple = ("identity", term.unit)
        else:
            key = ("jet", term.unit, term.depth, len(term.directions))
        return (*key, level[term.uid]) if refine else key

    def dependencies(term: Term) -> list[Term]:
        return ([term.center] if term.center is not None else []) + list(term.directions)

    for refine in (False, True):
        graph = nx.DiGraph()
        for term in terms:
            graph.add_node(group(term, refine))
            for dep in dependencies(term):
                graph.add_edge(group(dep, refine), group(term, refine))
        if nx.is_directed_acyclic_graph(graph) and not any(graph.has_edge(n, n) for n in graph):
            break
    position = {u.name: u.index for u in prog.units} | {DECODER: len(prog.units)}

    def order_key(key: tuple) -> tuple:
        rank = {"source": 0, "stream": 1, "identity": 3, "jet": 2}[key[0]]
        unit = position.get(key[1], -1) if len(key) > 1 else -1
        level_of = key[-1] if refine and key[0] in ("jet", "identity") else -1
        return (level_of, unit, rank, str(key))

    ordered = list(nx.lexicographical_topological_sort(graph, key=order_key))
    kinds = {"source": "sources", "stream": "states", "jet": "jet", "identity": "identity"}
    steps = {key: Step(key, kinds[key[0]]) for key in ordered}
    for step in steps.values():
        if step.kind in ("jet", "identity"):
            step.unit = step.key[1]
            if step.unit != DECODER and step.unit not in units:
                raise ValueError(f"term names unit {step.unit!r}, which is not a unit of the "
                                 f"{prog.granularity} view: {list(units)}")
    applications: dict[tuple, int] = {}
    for term in terms:  # terms are in dependency order, centres first
        step = steps[group(term, refine)]
        if term.kind in ("source", "stream"):
            step.terms.append(term)
            step.picks.append((term.state, 0))
        elif term.kind == "identity":
            step.terms.append(term)
            step.picks.append((0, 0))
        else:
            step.depth = term.depth
            app_key = (step.key, term.center.uid, tuple(d.uid for d in term.directions))
            if app_key not in applications:
                applications[app_key] = len(step.centres)
                step.centres.append(term.center)
                if term.directions:
                    step.directions.append(term.directions)
            index = Basis(max(len(term.directions), 1), term.depth).index
            coefficient = index[term.monomial] if term.monomial else index[(term.order,)]
            step.picks.append((coefficient, applications[app_key]))
            step.terms.append(term)
    ordered_steps = [steps[key] for key in ordered if steps[key].terms]
    location: dict[int, tuple[int, int]] = {}
    for i, step in enumerate(ordered_steps):
        if step.kind == "jet":  # rows in coefficient-major order: a full jet is one view
            width = len(step.centres)
            order = sorted(range(len(step.terms)), key=lambda r: step.picks[r][0] * width + step.picks[r][1])
            step.terms = [step.terms[r] for r in order]
            step.picks = [step.picks[r] for r in order]
        for row, term in enumerate(step.terms):
            location[term.uid] = (i, row)
    target = len(prog.units) if expansion.space == "logits" else expansion.unit + 1
    return Schedule(prog, ordered_steps, location, list(expansion.terms), expansion.space, target)


def _reachable(outputs: tuple[Term, ...]) -> list[Term]:
    """Every term the outputs are built from, each once, dependencies before dependants."""
    seen: set[int] = set()
    ordered: list[Term] = []
    for root in outputs:
        stack: list[tuple[Term, bool]] = [(root, False)]
        while stack:
            term, expanded = stack.pop()
            if expanded:
                ordered.append(term)
                continue
            if term.uid in seen:
                continue
            seen.add(term.uid)
            stack.append((term, True))
            for dep in reversed([*([term.center] if term.center is not None else []), *term.directions]):
                if dep.uid not in seen:
                    stack.append((dep, False))
    return ordered


def _levels(terms: list[Term]) -> dict[int, int]:
    level: dict[int, int] = {}
    for term in terms:
        deps = ([term.center] if term.center is not None else []) + list(term.directions)
        level[term.uid] = 1 + max((level[d.uid] for d in deps), default=-1)
    return level
