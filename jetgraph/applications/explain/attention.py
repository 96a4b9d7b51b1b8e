"""Why a head attends where it does: its attention score decomposed exactly into pairs of paths.

A frozen decomposition (:class:`FrozenNetwork`) holds every attention pattern at its value on the
input, so the paths of a target's logit say *what* a head moves, not *why* it looks there: the
query–key composition of an induction circuit (a previous-token head writing into the key that
an induction head matches) lives in the pattern. This module answers the second question.

With the norms held (:func:`jetgraph.taylor.frozen.freeze` with ``hold_products=False``), the
pre-softmax score ``S`` of one head at (query row ``q``, key row ``k``) is an exact quadratic in
the two stream rows it reads, ``z = (h_q, h_k)``: ``S(z) = ½ zᵀ H z + gᵀ z + c``, with ``H`` its
Hessian (constant) and ``g`` its gradient at zero. In jet terms it is the order-2 jet of the
held score centred at 0, exact because the held score is quadratic. Writing each row as the sum
of the paths that reach the head's input (the source of each path, then the units it passed;
paths longer than ``max_units`` summed into one ``rest`` term, which makes the sum exact) gives

    S = Σ_{i,j} a_iᵀ H_qk b_j  +  Σ_i g_qᵀ a_i  +  Σ_j g_kᵀ b_j  +  c

over query-side parts ``a_i`` (row ``q``) and key-side parts ``b_j`` (row ``k``): a table of
(query path, key path) pairs whose contributions add up to the model's own score.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
from torch import fx

from jetgraph.applications.explain.attribution import SUM_TOLERANCE
from jetgraph.applications.explain.compute import working_dtype
from jetgraph.applications.explain.network import FrozenNetwork
from jetgraph.ir import parse_unit_name
from jetgraph.taylor.frozen import HELD, freeze

aten = torch.ops.aten
_SOFTMAX = {aten._softmax.default, aten.softmax.int, aten._safe_softmax.default}
_REST = "rest"


@dataclass(frozen=True)
class ScorePart:
    """One path's part of a stream row the head reads: where it starts (``source`` at
    ``position``; a unit's constant has no position) and the units it passed."""

    source: str
    position: int | None
    units: tuple[str, ...]

    @property
    def path(self) -> str:
        """``embed.token@8→attn0.h3``; the paths not listed are ``rest``."""
        if self.source == _REST:
            return _REST
        start = self.source if self.position is None else f"{self.source}@{self.position}"
        return "→".join((start, *self.units))


@dataclass(frozen=True)
class ScorePair:
    """A (query part, key part) pair and its contribution to the score; either side is ``None``
    for the terms linear in one row (the other side's bias) and both for the constant."""

    query: ScorePart | None
    key: ScorePart | None
    contribution: float

    @property
    def multi_hop(self) -> bool:
        """Whether a side of the pair is a path that passed a unit before the head (query or key
        composition); the summed ``rest`` is not a path, so a pair with it never counts."""
        sides = [side for side in (self.query, self.key) if side is not None]
        return any(side.units for side in sides) and all(side.source != _REST for side in sides)


@dataclass
class ScoreAttribution:
    """Head ``head``'s pre-softmax score at (``query``, ``key``), ``value``, decomposed into
    pairs, largest |contribution| first; ``pattern`` is its attention weight there."""

    head: str
    query: int
    key: int
    value: float
    pattern: float
    pairs: list[ScorePair]
    max_units: int
    notes: list[str] = field(default_factory=list)
    tokens: list[str] | None = None  # each position's token text, when a tokenizer was given

    @property
    def explained(self) -> float:
        return math.fsum(p.contribution for p in self.pairs)

    def check(self, tolerance: float) -> None:
        """The pairs add up to the model's score, within ``tolerance`` of the decomposition's
        absolute mass (:data:`SUM_TOLERANCE` of the dtype the head computes in); raises with both
        numbers otherwise."""
        scale = max(1.0, abs(self.value), math.fsum(abs(p.contribution) for p in self.pairs))
        if abs(self.explained - self.value) > tolerance * scale:
            raise ValueError(f"the score's pairs add up to {self.explained:.6g}, the model's score "
                             f"is {self.value:.6g} (tolerance {tolerance:g} × {scale:.3g})")

    def top_multi_hop(self) -> ScorePair | None:
        """The largest pair with a side that passed a unit (the composition the head reads)."""
        return next((p for p in self.pairs if p.multi_hop), None)

    def table(self, top: int = 12) -> str:
        lines = [f"{self.head} score at query {self.query}, key {self.key}: {self.value:.4g} "
                 f"(attention {self.pattern:.3f}); pairs of paths reaching the head "
                 f"(≤{self.max_units} units)",
                 f"{'contribution':>12}  {'share':>7}  query side  ×  key side"]
        for pair in self.pairs[:top]:
            share = pair.contribution / self.value if self.value else float("nan")
            query, key = self._shown(pair.query), self._shown(pair.key)
            lines.append(f"{pair.contribution:12.4f}  {share:7.1%}  {query}  ×  {key}")
        return "\n".join(lines)


    def _shown(self, part: ScorePart | None) -> str:
        if part is None:
            return "(bias)"
        if self.tokens is None or part.position is None:
            return part.path
        return f"{part.path} {self.tokens[part.position]!r}"

    def _repr_html_(self) -> str:
        from jetgraph.applications.report.inline import table_html

        rows = [[self._shown(p.query), self._shown(p.key), p.contribution,
                 f"{p.contribution / self.value:.1%}" if self.value else "—"] for p in self.pairs[:10]]
        return table_html(f"ScoreAttribution: why {self.head} attends {self.query} → {self.key} "
                          f"(score {self.value:.4g}, attention {self.pattern:.3f})",
                          ["query side", "key side", "contribution", "share"], rows)

    def to_json(self) -> dict[str, object]:
        """The result as plain data (what ``jetgraph.report`` and notebooks read)."""
        def side(part: ScorePart | None) -> dict[str, object] | None:
            return None if part is None else {"source": part.source, "position": part.position,
                                              "units": list(part.units), "path": part.path}
        return {"head": self.head, "query": self.query, "key": self.key, "value": self.value,
                "pattern": self.pattern, "max_units": self.max_units, "tokens": self.tokens,
                "notes": self.notes, "pairs": [{"query": side(p.query), "key": side(p.key),
                                                "contribution": p.contribution} for p in self.pairs]}


def attention_score_attribution(network: FrozenNetwork, head: str, query: int, key: int,
                                max_units: int = 1) -> ScoreAttribution:
    """Head ``head``'s (``attn1.h3``) score at (``query``, ``key``) in ``network``'s input,
    decomposed into pairs of paths of at most ``max_units`` units (the rest summed, exact)."""
    units = {u.name: u for u in network.units}
    parent, _, index = head.rpartition(".h")
    if not parent or not index.isdigit() or parse_unit_name(head) is None:
        raise ValueError(f"{head!r} is not a head; give a name such as attn1.h0")
    if head not in units:
        heads = [name for name in units if ".h" in name]
        if not heads:
            raise ValueError(f"no head {head!r}: this view has no head units; use prog.at('head')")
        raise ValueError(f"no head {head!r} in this program (its heads are {heads[0]} … {heads[-1]})")
    seq = network.final.shape[0]
    if not (0 <= key <= query < seq):
        raise ValueError(f"query {query} and key {key} must satisfy 0 ≤ key ≤ query < {seq}")
    if max_units < 0:
        raise ValueError(f"max_units must be ≥ 0, got {max_units}")
    unit = units[head]
    rows = sorted({query, key})
    stream = network.states[unit.reads]
    z_star = stream[rows].flatten().detach()
    zero = torch.zeros_like(z_star)
    with network.prog.resident([unit]):  # a lazily read model's weights, for this head only
        scores, value, pattern = _score_function(network, unit, int(index), query, key)
        # the held score's Taylor coefficients at 0, each computed there (not derived from the value),
        # so that the pairs adding up to the model's score checks that the held score is quadratic
        with torch.no_grad():
            constant = float(scores(zero).double())
        gradient_zero = torch.func.jacrev(scores)(zero).detach().double()
        hessian = torch.func.jacfwd(torch.func.jacrev(scores))(zero).detach().double()

    parts = _parts(network, unit.reads, max_units)
    vectors = torch.stack([v[rows].flatten() for _, v in parts]).double()
    rest = stream[rows].flatten().double() - vectors.sum(0)
    parts.append((ScorePart(_REST, None, ()), None))
    vectors = torch.cat([vectors, rest.unsqueeze(0)])
    d = stream.shape[-1]
    side = {query: slice(rows.index(query) * d, (rows.index(query) + 1) * d),
            key: slice(rows.index(key) * d, (rows.index(key) + 1) * d)}
    pairs = []
    if query != key:
        q_block, k_block = vectors[:, side[query]], vectors[:, side[key]]
        bilinear = q_block @ hessian[side[query], side[key]] @ k_block.T  # H is symmetric: ½·2
        within_q = 0.5 * (q_block @ hessian[side[query], side[query]] @ q_block.T).sum()
        within_k = 0.5 * (k_block @ hessian[side[key], side[key]] @ k_block.T).sum()
        linear_q = q_block @ gradient_zero[side[query]]
        linear_k = k_block @ gradient_zero[side[key]]
    else:
        bilinear = 0.5 * vectors @ hessian @ vectors.T
        within_q = within_k = torch.zeros((), dtype=torch.float64)
        linear_q = vectors @ gradient_zero
        linear_k = torch.zeros_like(linear_q)
    names = [p for p, _ in parts]
    for i, j in itertools.product(range(len(names)), repeat=2):
        contribution = float(bilinear[i, j])
        if contribution:
            pairs.append(ScorePair(names[i], names[j], contribution))
    for i, name in enumerate(names):
        if float(linear_q[i]):
            pairs.append(ScorePair(name, None, float(linear_q[i])))
        if float(linear_k[i]):
            pairs.append(ScorePair(None, name, float(linear_k[i])))
    tail = constant + float(within_q) + float(within_k)
    pairs.append(ScorePair(None, None, tail))
    pairs.sort(key=lambda p: -abs(p.contribution))
    result = ScoreAttribution(head, query, key, value, pattern, pairs, max_units)
    if abs(float(within_q)) + abs(float(within_k)) > 1e-9 * max(1.0, abs(value)):
        result.notes.append("the score has terms within one row (not a plain query·key product); "
                            "they are summed into the constant pair")
    working = working_dtype(network.prog, stream.dtype)
    result.check(SUM_TOLERANCE.get(working, 1e-4))
    return result


def head_score(network: FrozenNetwork, head: str, query: int, key: int,
               stream: torch.Tensor | None = None) -> float:
    """The real (nothing held) pre-softmax score of ``head`` at (``query``, ``key``) on the
    stream it reads, or on ``stream`` ([seq, d]) in its place: what path patching measures."""
    unit = next((u for u in network.units if u.name == head), None)
    if unit is None:
        raise ValueError(f"no head {head!r} in this view")
    node = _score_node(unit.graph_module, unit.name)
    x = (network.states[unit.reads] if stream is None else stream).unsqueeze(0)
    side = [network.side[name] for name in unit.side_inputs]
    with torch.no_grad(), network.prog.resident([unit]):
        scores = _Capture(unit.graph_module, node).capture(x, *side)
    return float(scores[0, int(head.rpartition(".h")[2]), query, key].double())


def _score_node(graph_module: fx.GraphModule, name: str) -> fx.Node:
    """The input of the one softmax in ``graph_module`` (the pre-softmax scores)."""
    softmax = [n for n in graph_module.graph.nodes if n.op == "call_function" and n.target in _SOFTMAX]
    if len(softmax) != 1:
        raise ValueError(f"{name} has {len(softmax)} softmax ops; a score attribution needs "
                         "exactly one attention pattern")
    return softmax[0].args[0]


def _parts(network: FrozenNetwork, state: int, max_units: int) -> list[tuple[ScorePart, torch.Tensor]]:
    """Every path of at most ``max_units`` units that ends at or before stream state ``state``,
    with the vector it writes there ([seq, d])."""
    sources = [s for s in network.sources() if s.state <= state]
    before = [u for u in network.units if u.index < state]
    found: list[tuple[ScorePart, torch.Tensor]] = []
    frontier = []
    for source in sources:
        vector = network.source_vector(source)
        part = ScorePart(source.name, source.position, ())
        found.append((part, vector))
        frontier.append((part, vector, source.state))
    for _ in range(max_units):
        grown = []
        for part, vector, at in frontier:
            for unit in before:
                if unit.reads < at or not vector.any():
                    continue
                out = network.apply(unit.index, vector)
                longer = ScorePart(part.source, part.position, (*part.units, unit.name))
                found.append((longer, out))
                grown.append((longer, out, unit.index + 1))
        frontier = grown
    return found


def _score_function(network: FrozenNetwork, unit, head: int, query: int, key: int):
    """``(z ↦ S, S*, weight)``: the held score — the head's pre-softmax score at (query, key) with
    the stream's rows ``query`` and ``key`` set from ``z`` and every held value (norm scales)
    fixed at its value on the model's input —, the model's own score there, and its attention
    weight."""
    graph_module = unit.graph_module
    frozen = freeze(graph_module, hold_products=False).values
    score_node = _score_node(frozen, unit.name)
    side = [network.side[name] for name in unit.side_inputs]
    stream = network.states[unit.reads].unsqueeze(0)
    rows = sorted({query, key})

    held = [n for n in frozen.graph.nodes if n.meta.get(HELD)]
    with torch.no_grad():
        recording = _Capture(frozen, score_node, record=held)
        base = recording.capture(stream, *side)
    if base.dim() != 4 or base.shape[-1] != base.shape[-2]:
        raise ValueError(f"{unit.name}'s scores have shape {tuple(base.shape)}; a score attribution "
                         "needs [batch, heads, query, key]")
    pattern = float(torch.softmax(base[0, head, query].double(), -1)[key])
    fixed = recording.recorded

    def scores(z: torch.Tensor) -> torch.Tensor:
        x = stream.clone().to(z.dtype)
        x[0, rows] = z.reshape(len(rows), -1)
        return _Capture(frozen, score_node, fixed=fixed).capture(x, *side)[0, head, query, key]

    return scores, float(base[0, head, query, key].double()), pattern


class _Reached(Exception):
    def __init__(self, value: torch.Tensor) -> None:
        self.value = value


class _Capture(fx.Interpreter):
    """Runs a graph up to one node and returns that node's value; ``record``: nodes whose values
    are kept (in :attr:`recorded`); ``fixed``: nodes whose values are given instead of computed."""

    def __init__(self, graph_module: fx.GraphModule, node: fx.Node, record: list[fx.Node] = (),
                 fixed: dict[fx.Node, torch.Tensor] | None = None) -> None:
        super().__init__(graph_module)
        self.node = node
        self.record = set(record)
        self.fixed = fixed or {}
        self.recorded: dict[fx.Node, torch.Tensor] = {}

    def capture(self, *args: torch.Tensor) -> torch.Tensor:
        try:
            self.run(*args)
        except _Reached as reached:
            return reached.value
        raise ValueError(f"the graph never computed {self.node.name}")

    def run_node(self, node: fx.Node):
        value = self.fixed[node] if node in self.fixed else super().run_node(node)
        if node in self.record:
            self.recorded[node] = value
        if node is self.node:
            raise _Reached(value)
        return value


__all__ = ["ScoreAttribution", "ScorePair", "ScorePart", "attention_score_attribution", "head_score"]
