"""Plan the batched evaluation of an expansion: which computations run together.

An expansion's :attr:`~jetgraph.passes.expansion.Expansion.nodes` are its terms in topological
order. Every distinct computation among them is one *unit call*: a unit's jet at one centre (all
its coefficients at once), a skip branch, an encoder addend or a stream state. The schedule groups
the nodes into :class:`Step` s — all jets of one unit at one order become a single call on centres
stacked along the batch dimension — and orders the steps so that every centre is computed before
it is used.

Each step writes one *buffer* (a tensor [rows, batch, seq, width]); every term lives in one row of
one buffer, so gathering the centres of the next step is a handful of slices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from jetgraph.ir import ResidualProgram
from jetgraph.passes.evaluate import coefficient_index
from jetgraph.passes.expansion import Expansion
from jetgraph.passes.terms import Term, TermKind, Unit, application_key


@dataclass(eq=False)
class Step:
    """One batched computation writing one buffer.

    ``kind`` is the kind of every term it computes (:data:`~jetgraph.passes.terms.TermKind`):
    ``"source"`` and ``"stream"`` rows are encoder addends and stream states; a ``"jet"`` step is
    the order-``order`` jet of ``unit`` at every centre in ``centers`` (one call); an
    ``"identity"`` step holds skip branches (w·c at order 0, w·h above). ``center_of[r]`` is
    the centre row r's term uses; ``directions`` the other centres of each split-jet call.
    """

    key: tuple
    kind: TermKind
    unit: Unit | None = None
    order: int = 0
    centers: list[Term] = field(default_factory=list)
    directions: list[tuple[Term, ...]] = field(default_factory=list)
    terms: list[Term] = field(default_factory=list)
    center_of: list[int] = field(default_factory=list)

    @property
    def label(self) -> str:
        if self.kind == "jet":
            split = f", split over {len(self.directions[0])} directions" if self.directions else ""
            return (f"{self.unit.name}: order-{self.order} jet at {len(self.centers)} centre(s){split}, "
                    f"{len(self.terms)} term(s)")
        if self.kind == "identity":
            return f"{self.unit.name}: {len(self.terms)} skip branch(es)"
        return f"{'sources' if self.kind == 'source' else 'states'}: {len(self.terms)} row(s)"


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
    def unit_calls(self) -> dict[str, int]:
        """Jet calls per unit name (centres a unit's jet is taken at): what the batched code computes."""
        counts: dict[str, int] = {}
        for step in self.steps:
            if step.kind == "jet":
                counts[step.unit.name] = counts.get(step.unit.name, 0) + len(step.centers)
        return counts

    def rows_of(self, terms: list[Term]) -> list[tuple[int, int]]:
        return [self.location[t.uid] for t in terms]


def plan(expansion: Expansion) -> Schedule:
    """Group the expansion's nodes into batched steps in dependency order."""
    prog = expansion.prog
    nodes = expansion.nodes
    level: dict[int, int] = {}
    for term in nodes:
        level[term.uid] = 1 + max((level[d.uid] for d in term.inputs), default=-1)

    def group(term: Term, refine: bool) -> tuple:
        if term.kind in ("source", "stream"):
            return (term.kind,)
        key: tuple = (term.kind, id(term.unit), term.order, len(term.directions))
        return (*key, level[term.uid]) if refine else key

    for refine in (False, True):  # one step per unit and order, unless that makes a cycle
        graph = nx.DiGraph()
        for term in nodes:
            graph.add_node(group(term, refine))
            for dep in term.inputs:
                graph.add_edge(group(dep, refine), group(term, refine))
        if nx.is_directed_acyclic_graph(graph) and not any(graph.has_edge(n, n) for n in graph):
            break
    position = {id(u): u.index for u in prog.units} | {id(prog.decoder): len(prog.units)}

    def order_key(key: tuple) -> tuple:
        rank = {"source": 0, "stream": 1, "jet": 2, "identity": 3}[key[0]]
        unit = position.get(key[1], -1) if len(key) > 1 else -1
        level_of = key[-1] if refine and key[0] in ("jet", "identity") else -1
        return (level_of, unit, rank, str(key[2:]))

    ordered = list(nx.lexicographical_topological_sort(graph, key=order_key))
    steps = {key: Step(key, key[0]) for key in ordered}
    calls: dict[tuple, int] = {}
    for term in nodes:  # nodes are in dependency order, centres first
        step = steps[group(term, refine)]
        step.terms.append(term)
        step.unit, step.order = term.unit, term.order
        if term.kind in ("source", "stream"):
            step.center_of.append(0)
            continue
        call = application_key(term) if term.kind == "jet" else ("identity", term.uid)
        if call not in calls:
            calls[call] = len(step.centers)
            step.centers.append(term.center)
            if term.directions:
                step.directions.append(term.directions)
        step.center_of.append(calls[call])
    ordered_steps = [steps[key] for key in ordered if steps[key].terms]
    location: dict[int, tuple[int, int]] = {}
    for i, step in enumerate(ordered_steps):
        if step.kind == "jet":  # rows in coefficient-major order: a full jet is one view
            width = len(step.centers)
            rows = sorted(range(len(step.terms)),
                          key=lambda r: coefficient_index(step.terms[r]) * width + step.center_of[r])
            step.terms = [step.terms[r] for r in rows]
            step.center_of = [step.center_of[r] for r in rows]
        for row, term in enumerate(step.terms):
            location[term.uid] = (i, row)
    return Schedule(prog, ordered_steps, location, list(expansion.terms), expansion.space,
                    expansion.target_state)
