"""Algorithm 1: expand one residual unit (or the decoder) into jet terms around chosen centres.

A :class:`Term` is symbolic: it says how one summand is computed from the input ids (which
encoder addend or stream state it starts from, which units it passed through, at which centre,
order and weight), so expansions compose — the terms of one expansion are centres of the next —
and can be evaluated on any input. :meth:`Expansion.evaluate` returns every term's tensor and
the exact remainder, target − Σ terms, so Σ terms + remainder reproduces the target by
construction; the target itself is the model's own stream state or logits.

Semantics (docs/architecture.md): expanding unit ℓ with centres c_i (sub-streams whose sum is the
stream h the unit reads) and weights w_i gives the terms w_i · J^k γ_ℓ(c_i)(h) — one term per
order j ≤ k, the j-th Taylor coefficient along h − c_i — plus the skip branch: the centres
themselves (``identity="pass"``) or w_i · J^k id(c_i)(h) (``identity="jet"``, the paper's code).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import networkx as nx
import torch
import torch.nn.functional as F

from jetgraph.errors import CostError
from jetgraph.files import atomic_write
from jetgraph.ir import ResidualProgram, StreamFunction
from jetgraph.taylor import Basis, check_order, jet

Space = Literal["stream", "logits"]
_ids = itertools.count()


@dataclass(frozen=True, eq=False)
class Term:
    """One summand, symbolically.

    ``kind``: ``"source"`` (an encoder addend), ``"stream"`` (a stream state h_ℓ of the
    program's view), ``"jet"`` (the order-``order`` coefficient of ``unit``'s order-``depth`` jet
    at ``center``), or ``"identity"`` (the skip branch of ``unit`` for ``center``). ``path`` is
    the provenance: where the term started and the units it passed through, in order.
    """

    kind: Literal["source", "stream", "jet", "identity"]
    path: tuple[str, ...]
    unit: str | None = None
    center: Term | None = None
    order: int = 0
    depth: int = 0
    weight: float | torch.Tensor = 1.0
    space: Space = "stream"
    state: int | None = None
    directions: tuple[Term, ...] = ()  # split jets: the other centres the monomial is over
    monomial: tuple[int, ...] = ()
    uid: int = field(default_factory=lambda: next(_ids))

    @property
    def name(self) -> str:
        """The provenance as text: ``embed.token→attn0^1→unembed`` (``^j``: the order-j
        coefficient; ``[x·y]``: the monomial of a split jet; ``(id)``: a skip branch)."""
        return "→".join(self.path) + ("(id)" if self.kind == "identity" else "")

    def __repr__(self) -> str:
        return f"Term({self.name!r}, kind={self.kind}, space={self.space})"

    def then(self, unit: str, order: int = 0, depth: int = 0, weight: float | torch.Tensor = 1.0,
             space: Space = "stream") -> Term:
        """The order-``order`` coefficient of ``unit``'s order-``depth`` jet centred at this term."""
        return Term("jet", (*self.path, step_label(unit, order)), unit=unit, center=self, order=order,
                    depth=depth, weight=weight, space=space)


def step_label(unit: str, order: int = 0, monomial: tuple[int, ...] = (),
               directions: Sequence[Term] = ()) -> str:
    """One step of a term's path: the unit, with the order or split monomial it contributes."""
    if monomial:
        parts = [f"{d.name}^{a}" if a > 1 else d.name for d, a in zip(directions, monomial, strict=True) if a]
        return f"{unit}[{'·'.join(parts)}]" if parts else unit
    return f"{unit}^{order}" if order else unit


def source_terms(prog: ResidualProgram) -> list[Term]:
    """The encoder's addends as terms (``embed.token``, ``embed.position``, …): they sum to h_0."""
    return [Term("source", (f"embed.{name}",), state=i) for i, name in enumerate(prog.encoder.addend_names)]


def stream_term(prog: ResidualProgram, state: int) -> Term:
    """The stream state h_state of ``prog``'s view as one term."""
    if not 0 <= state <= len(prog.units):
        raise IndexError(f"stream state {state} out of range: the {prog.granularity} view has states "
                         f"0..{len(prog.units)}")
    return Term("stream", (f"h{state}",), state=state)


@dataclass
class ExpansionValues:
    """Evaluated terms (by name, in order), the target and the exact remainder."""

    terms: dict[str, torch.Tensor]
    target: torch.Tensor
    remainder: torch.Tensor

    def total(self) -> torch.Tensor:
        return torch.stack(list(self.terms.values())).sum(0)


class Expansion:
    """Terms of one expanded unit (or the decoder) and what they must add up to."""

    def __init__(self, prog: ResidualProgram, unit: int, terms: Sequence[Term], space: Space,
                 order: int) -> None:
        self.prog = prog
        self.unit = unit
        self.terms: tuple[Term, ...] = tuple(terms)
        self.space: Space = space
        self.order = order
        self.fit_losses: list[float] = []  # set when the weights were fitted
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names):
            raise ValueError("terms with the same provenance appear twice: "
                             f"{sorted({n for n in names if names.count(n) > 1})[:5]}")

    def __len__(self) -> int:
        return len(self.terms)

    def __repr__(self) -> str:
        where = "decoder" if self.space == "logits" else self.prog.units[self.unit].name
        return f"Expansion({where}, order={self.order}, terms={len(self.terms)})"

    @torch.no_grad()
    def evaluate(self, input_ids: torch.Tensor, space: Space | None = None) -> ExpansionValues:
        """Every term's tensor on ``input_ids``, the target and target − Σ terms.

        ``space="logits"`` on a stream-space expansion decodes each term (the decoder's order-0
        jet at every term, unit weights) and compares with the model's logits.
        """
        if space not in (None, "stream", "logits"):
            raise ValueError(f"space must be 'stream' or 'logits', got {space!r}")
        if space == "logits" and self.space == "stream":
            return expand(self.prog, "decoder", self, order=0, weights="unit").evaluate(input_ids)
        if space == "stream" and self.space == "logits":
            raise ValueError("a logit-space expansion has no stream-space values")
        evaluator = _Evaluator(self.prog, input_ids)
        target = evaluator.logits() if self.space == "logits" else evaluator.states[self.unit + 1]
        # terms may broadcast (a positional embedding has batch 1): give them the target's shape
        values = {term.name: evaluator.value(term).expand(target.shape) for term in self.terms}
        total = torch.stack(list(values.values())).sum(0)
        return ExpansionValues(values, target, target - total)

    @torch.no_grad()
    def faithfulness(self, input_ids: torch.Tensor, k: int = 5) -> dict[str, float]:
        """How well Σ terms stands for the model: in logit space (stream sums are decoded)."""
        result = self.evaluate(input_ids)
        evaluator = _Evaluator(self.prog, input_ids)
        logits = evaluator.logits()
        approx = result.total() if self.space == "logits" else self.prog.decoder(result.total())
        true_top = logits.topk(k, -1).indices
        approx_top = approx.topk(k, -1).indices
        overlap = (true_top.unsqueeze(-1) == approx_top.unsqueeze(-2)).any(-1).float().mean()
        return {
            "relative_remainder": (result.remainder.norm() / result.target.norm()).item(),
            "cosine": F.cosine_similarity(approx, logits, dim=-1).mean().item(),
            "kl": F.kl_div(approx.log_softmax(-1), logits.log_softmax(-1), log_target=True,
                           reduction="none").sum(-1).mean().item(),
            "top1": (approx.argmax(-1) == logits.argmax(-1)).float().mean().item(),
            f"top{k}": overlap.item(),
        }

    def rank(self, input_ids: torch.Tensor, top: int | None = None) -> list[tuple[Term, float]]:
        """Terms by decreasing norm on ``input_ids`` (the first ``top``)."""
        values = self.evaluate(input_ids)
        ranked = sorted(((t, values.terms[t.name].norm().item()) for t in self.terms),
                        key=lambda pair: -pair[1])
        return ranked[:top] if top is not None else ranked

    def export(self, path: str | Path, input_ids: torch.Tensor | None = None) -> Path:
        """Write the terms' provenance (and norms, given an input) as CSV or JSON (by suffix)."""
        path = Path(path)
        if path.suffix not in (".csv", ".json"):
            raise ValueError(f"export writes .csv or .json, not {path.suffix!r}")
        norms = dict((t.uid, n) for t, n in self.rank(input_ids)) if input_ids is not None else {}
        rows = [{"name": t.name, "kind": t.kind, "path": "→".join(t.path), "unit": t.unit or "",
                 "order": t.order, "depth": t.depth, "space": t.space,
                 "center": t.center.name if t.center is not None else "",
                 "weight": _describe(t.weight), "norm": norms.get(t.uid, "")} for t in self.terms]
        if path.suffix == ".json":
            return atomic_write(path, json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        return atomic_write(path, buffer.getvalue())

    def to_networkx(self) -> nx.DiGraph:
        """The terms and everything they were built from: an edge from each centre to its terms."""
        graph = nx.DiGraph()
        stack = list(self.terms)
        while stack:
            term = stack.pop()
            if term.uid in graph and graph.nodes[term.uid].get("term") is term:
                continue
            graph.add_node(term.uid, term=term, label=term.name, kind=term.kind, unit=term.unit,
                           order=term.order, space=term.space)
            if term.center is not None:
                graph.add_edge(term.center.uid, term.uid, unit=term.unit, role="centre")
                stack.append(term.center)
            for direction in term.directions:
                graph.add_edge(direction.uid, term.uid, unit=term.unit, role="direction")
                stack.append(direction)
        return graph


def expand(
    prog: ResidualProgram,
    unit: int | str,
    centers: Sequence[Term] | Expansion,
    order: int = 0,
    weights: str | float | torch.Tensor = "uniform",
    identity: Literal["pass", "jet"] = "pass",
    *,
    split: bool = False,
    fit_on: torch.Tensor | None = None,
    fit_steps: int = 100,
    fit_lr: float = 1e-2,
) -> Expansion:
    """Algorithm 1: expand ``unit`` of ``prog`` (an index of ``prog.units``, or ``"decoder"`` /
    ``len(prog.units)`` for the decoder) around ``centers`` at order ``order``.

    ``weights``: ``"uniform"`` (1/N), ``"unit"`` (1), a float, or a tensor with one leading entry
    per centre whose rest broadcasts against a term [batch, seq, d] from the right: [N] scalars,
    [N, seq, 1] per position, [N, d] per coordinate, [N, batch, seq, d] in full. ``"fit"``
    fits per-token softmax weights on ``fit_on`` (input ids) with Adam, minimising the
    logit-space remainder ‖U·r‖² (‖r‖² for the decoder); the loss curve is ``fit_losses``.

    ``split=True`` splits each centre's jet by direction: one term per monomial of degree ≤ k
    in the *other* centres (multivariate), N·C(N−1+k, k) terms instead of N·(k+1). Their sum is
    the jet at the sum of the centres, which is the stream when the centres add up to it.
    """
    if weights == "fit":
        if fit_on is None:
            raise ValueError('weights="fit" needs fit_on: the input ids to fit the weights on')
        return _fit(prog, unit, centers, order, identity, split, fit_on, fit_steps, fit_lr)
    units = prog.units
    decoder = unit in ("decoder", len(units))
    if not decoder:
        if not isinstance(unit, int) or not 0 <= unit < len(units):
            raise IndexError(f"unit {unit!r} out of range: {prog.granularity} view has units "
                             f"0..{len(units) - 1}, and 'decoder' (= {len(units)})")
    if identity not in ("pass", "jet"):
        raise ValueError(f"identity must be 'pass' or 'jet', got {identity!r}")
    check_order(order)
    centers = list(centers.terms if isinstance(centers, Expansion) else centers)
    if not centers:
        raise ValueError("expand needs at least one centre")
    for term in centers:
        if not isinstance(term, Term) or term.space != "stream":
            raise TypeError(f"centres must be stream-space Terms (source_terms, stream_term or an "
                            f"earlier expansion's terms), got {term!r}")
    per_centre = _weights(weights, len(centers))
    name = "unembed" if decoder else units[unit].name
    space: Space = "logits" if decoder else "stream"
    terms: list[Term] = []
    for index, (center, weight) in enumerate(zip(centers, per_centre, strict=True)):
        if split and order >= 1 and len(centers) == 1:  # no other centre: no direction
            terms.append(Term("jet", (*center.path, name), unit=name, center=center, order=0,
                              depth=0, weight=weight, space=space))  # no direction: order 0
            continue
        if split and order >= 1:
            others = tuple(c for i, c in enumerate(centers) if i != index)
            for monomial in Basis(len(others), order).monomials:
                terms.append(Term("jet", (*center.path, step_label(name, monomial=monomial,
                                                                    directions=others)),
                                  unit=name, center=center, order=sum(monomial), depth=order,
                                  weight=weight, space=space, directions=others, monomial=monomial))
            continue
        terms.extend(center.then(name, j, order, weight, space) for j in range(order + 1))
    if not decoder:
        if identity == "pass":
            terms = list(centers) + terms
        else:
            terms = [Term("identity", center.path, unit=name, center=center, order=order, weight=w)
                     for center, w in zip(centers, per_centre, strict=True)] + terms
    return Expansion(prog, len(units) if decoder else unit, terms, space, order)


def expand_stream(
    prog: ResidualProgram,
    order: int = 0,
    centers: Sequence[Term] | None = None,
    weights: str | float = "uniform",
    identity: Literal["pass", "jet"] = "pass",
    upto: int | None = None,
    max_terms: int | None = 100_000,
) -> Expansion:
    """Algorithm 1 iterated over units ``0..upto`` (default: all): every unit is expanded around
    all terms of the stream before it. At order 0 with ``identity="pass"`` the result holds one
    term per path through the units (2^N per centre for N sequential units).

    ``centers`` default to the encoder's addends (:func:`source_terms`); ``[stream_term(prog, 0)]``
    starts from h_0 as one term. The result has N·(k+2)^units terms for N centres; more than
    ``max_terms`` (None: no bound) is refused before any is built.
    """
    last = len(prog.units) - 1 if upto is None else upto
    if not 0 <= last < len(prog.units):
        raise IndexError(f"upto {upto} out of range: the {prog.granularity} view has units "
                         f"0..{len(prog.units) - 1}")
    check_order(order)
    terms: Sequence[Term] | Expansion = list(centers) if centers is not None else source_terms(prog)
    count = len(terms) * (order + 2) ** (last + 1)
    if max_terms is not None and count > max_terms:
        raise CostError(f"expanding {last + 1} units at order {order} around {len(terms)} centre(s) gives "
                        f"{count:.4g} terms, more than max_terms={max_terms:,}: expand fewer units (upto=), "
                        "select paths with expand_paths, or raise max_terms")
    expansion = None
    for unit in range(last + 1):
        expansion = expand(prog, unit, terms, order, weights, identity)
        terms = expansion
    return expansion


def _fit(prog: ResidualProgram, unit: int | str, centers: Sequence[Term] | Expansion, order: int,
         identity: Literal["pass", "jet"], split: bool, input_ids: torch.Tensor, steps: int,
         lr: float) -> Expansion:
    """Per-token softmax weights over centres that minimise the logit-space remainder (Adam)."""
    unweighted = expand(prog, unit, centers, order, weights="unit", identity=identity, split=split)
    values = unweighted.evaluate(input_ids)
    centre_list = list(centers.terms if isinstance(centers, Expansion) else centers)
    position = {c.uid: i for i, c in enumerate(centre_list)}
    # the weighted part of each centre: its jet terms and its identity term
    per_centre = torch.zeros((len(centre_list), *values.target.shape), dtype=values.target.dtype)
    for term in unweighted.terms:
        if term.kind in ("jet", "identity"):
            per_centre[position[term.center.uid]] += values.terms[term.name]
    fixed = sum((values.terms[t.name] for t in unweighted.terms if t.kind not in ("jet", "identity")),
                torch.zeros_like(values.target))
    readout = None if unweighted.space == "logits" else prog.decoder.unembedding
    if unweighted.space == "stream" and readout is None:
        raise ValueError("fitting weights in stream space needs the decoder's unembedding U")
    logits = torch.zeros((*per_centre.shape[:-1], 1), dtype=per_centre.dtype, requires_grad=True)
    optimiser = torch.optim.Adam([logits], lr=lr)
    losses = []
    for _ in range(steps):
        optimiser.zero_grad()
        w = torch.softmax(logits, 0)
        remainder = values.target - fixed - (w * per_centre).sum(0)
        projected = remainder if readout is None else remainder @ readout.T
        loss = projected.pow(2).sum() / projected.numel()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    fitted = torch.softmax(logits.detach(), 0)
    expansion = expand(prog, unit, centers, order, weights=fitted, identity=identity, split=split)
    expansion.fit_losses = losses
    return expansion


def _weights(weights: str | float | torch.Tensor, count: int) -> list[float | torch.Tensor]:
    if isinstance(weights, str):
        if weights == "uniform":
            return [1.0 / count] * count
        if weights == "unit":
            return [1.0] * count
        raise ValueError(f"weights must be 'uniform', 'unit', a float or a tensor, got {weights!r}")
    if isinstance(weights, (int, float)):
        return [float(weights)] * count
    if not isinstance(weights, torch.Tensor) or weights.dim() == 0 or weights.shape[0] != count:
        shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise ValueError(f"weights must have one leading entry per centre ({count}), got shape {shape}")
    return list(weights.unbind(0))


class _Evaluator:
    """Evaluates terms on one input, memoised per term and per (unit, centre) jet."""

    def __init__(self, prog: ResidualProgram, input_ids: torch.Tensor) -> None:
        self.prog = prog
        self.input_ids = input_ids
        self.states = prog.stream(input_ids)
        self.side = prog.side_inputs(input_ids)
        self._addends: dict[str, torch.Tensor] | None = None
        self._values: dict[int, torch.Tensor] = {}
        self._jets: dict[tuple, object] = {}
        self._units = {u.name: u for u in prog.units}

    def logits(self) -> torch.Tensor:
        return self.prog.decoder(self.states[-1], self.side)

    def value(self, term: Term) -> torch.Tensor:
        if term.uid not in self._values:
            self._values[term.uid] = self._compute(term)
        return self._values[term.uid]

    def _compute(self, term: Term) -> torch.Tensor:
        if term.kind == "source":
            if self._addends is None:
                self._addends = list(self.prog.encoder.addends(self.input_ids).values())
            return self._addends[term.state]
        if term.kind == "stream":
            return self.states[term.state]
        center = self.value(term.center)
        if term.kind == "jet":  # a broadcast centre (batch 1) takes the variate's full shape
            center = center.expand(self._variate(term).shape)
        if term.kind == "identity":  # J^k id(c)(h) = c at k = 0, h above
            base = center if term.order == 0 else self._variate(term)
            return _scaled(base, term.weight)
        if term.monomial:
            basis, coefficients = self._split_jet(term, center)
            return _scaled(coefficients[basis.index[term.monomial]], term.weight)
        coefficients = self._jet(term, center)
        return _scaled(coefficients[term.order], term.weight)

    def _function(self, term: Term) -> StreamFunction:
        return self.prog.decoder if term.unit == "unembed" else self._units[term.unit]

    def _variate(self, term: Term) -> torch.Tensor:
        """The stream state the term's unit reads: where its jets are evaluated."""
        if term.unit == "unembed":
            return self.states[-1]
        return self.states[self._units[term.unit].reads]

    def _split_jet(self, term: Term, center: torch.Tensor) -> tuple[Basis, torch.Tensor]:
        """The multivariate jet along the other centres: one pass gives every monomial."""
        key = (term.unit, term.center.uid, term.depth, tuple(d.uid for d in term.directions))
        if key not in self._jets:
            directions = [self.value(d).expand(center.shape) for d in term.directions]
            result = jet(self._function(term), center, order=term.depth, directions=directions,
                         side=self.side)
            self._jets[key] = (result.basis, result.coefficients)
        return self._jets[key]

    def _jet(self, term: Term, center: torch.Tensor) -> torch.Tensor:
        """All coefficients 0..depth of the unit's jet at the centre: one Taylor-mode pass."""
        key = (term.unit, term.center.uid, term.depth)
        if key not in self._jets:
            result = jet(self._function(term), center, self._variate(term), order=term.depth,
                         side=self.side)
            self._jets[key] = result.coefficients
        return self._jets[key]


def _describe(weight: float | torch.Tensor) -> str | float:
    if isinstance(weight, torch.Tensor):
        return weight.item() if weight.numel() == 1 else f"tensor{tuple(weight.shape)}"
    return weight


def _scaled(value: torch.Tensor, weight: float | torch.Tensor) -> torch.Tensor:
    """value · w; a tensor w broadcasts against [batch, seq, d] from the right."""
    if isinstance(weight, torch.Tensor):
        return value * weight.to(value.dtype)
    return value if weight == 1.0 else value * weight
