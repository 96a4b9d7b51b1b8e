"""The nodes of the expansion IR: symbolic terms, and the one walk over them.

A :class:`Term` says how one summand is computed from the input ids: which encoder addend or
stream state it starts from (``source``, ``stream``), or which unit — a
:class:`~jetgraph.ir.ResidualUnit` or the program's :class:`~jetgraph.ir.Decoder`, referenced as
the object itself — it applies to which centre (``jet``, ``identity``). Terms form a DAG through
``center`` and ``directions``; :func:`topological` is the single walk over that DAG which the
reference evaluator, the batched schedule, pictures and networkx export all use (through
:attr:`jetgraph.passes.expansion.Expansion.nodes`). Names are printed by the path language
(:mod:`jetgraph.passes.pathspec`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch

from jetgraph.ir import ENCODER_NAME, Decoder, ResidualProgram, ResidualUnit
from jetgraph.passes.pathspec import format_path, format_split_step, format_step

TermKind = Literal["source", "stream", "jet", "identity"]
"""``source``: an encoder addend; ``stream``: a stream state h_i of the program's view; ``jet``:
one Taylor coefficient of a unit's (or the decoder's) jet at a centre; ``identity``: the skip
branch of a unit for a centre."""
Space = Literal["stream", "logits"]
Unit = ResidualUnit | Decoder
Weight = float | torch.Tensor
_ids = itertools.count()


@dataclass(frozen=True, eq=False)
class Term:
    """One summand, symbolically.

    ``unit``: the unit (or decoder) a ``jet`` or ``identity`` term belongs to. ``degree``: which
    Taylor coefficient a jet term is (its total degree j); ``order``: the truncation order k of
    the jet it is taken from (j ≤ k). ``state``: the addend index (``source``) or stream state
    (``stream``), whose printed name is ``label``. A split jet's term is the coefficient of
    ``monomial`` over ``directions`` (the other centres). ``uid`` identifies the node.
    """

    kind: TermKind
    unit: Unit | None = None
    center: Term | None = None
    degree: int = 0
    order: int = 0
    weight: Weight = 1.0
    state: int | None = None
    label: str = ""
    directions: tuple[Term, ...] = ()
    monomial: tuple[int, ...] = ()
    uid: int = field(default_factory=lambda: next(_ids))

    @property
    def space(self) -> Space:
        """``"logits"`` for the decoder's jet terms, ``"stream"`` for every other term."""
        return "logits" if self.kind == "jet" and isinstance(self.unit, Decoder) else "stream"

    @property
    def inputs(self) -> tuple[Term, ...]:
        """The terms this one is computed from: its centre, then its directions."""
        return ((self.center,) if self.center is not None else ()) + self.directions

    @property
    def steps(self) -> tuple[str, ...]:
        """The provenance as printed steps: where the term started, then each unit it passed
        through (with the coefficient it took there)."""
        node, steps = self, []
        while node is not None:
            if node.kind in ("source", "stream"):
                steps.append(node.label)
            elif node.kind == "jet":
                if node.monomial:
                    powers = [(d.name, a) for d, a in zip(node.directions, node.monomial, strict=True)]
                    steps.append(format_split_step(node.unit.name, powers))
                else:
                    steps.append(format_step(node.unit.name, node.degree))
            node = node.center
        return tuple(reversed(steps))

    @property
    def name(self) -> str:
        """The path as the path language prints it: ``embed.token→attn0^1→unembed``."""
        return format_path(self.steps, identity=self.kind == "identity")

    def __repr__(self) -> str:
        return f"Term({self.name!r}, kind={self.kind}, space={self.space})"

    def then(self, unit: Unit, degree: int = 0, order: int = 0, weight: Weight = 1.0) -> Term:
        """The order-``degree`` coefficient of ``unit``'s order-``order`` jet centred at this term."""
        return Term("jet", unit, center=self, degree=degree, order=max(order, degree), weight=weight)

    def chain(self) -> list[Term]:
        """The terms along the centres, from the source to this one."""
        node, chain = self, []
        while node is not None:
            chain.append(node)
            node = node.center
        return chain[::-1]

    def units(self) -> list[Unit]:
        """The units (and decoder) this term's path passes through, in order."""
        return [t.unit for t in self.chain() if t.kind == "jet"]


def source_terms(prog: ResidualProgram) -> list[Term]:
    """The encoder's addends as terms (``embed.token``, ``embed.position``, …): they sum to h_0."""
    return [Term("source", state=i, label=f"{ENCODER_NAME}.{name}")
            for i, name in enumerate(prog.encoder.addend_names)]


def stream_term(prog: ResidualProgram, state: int) -> Term:
    """The stream state h_state of ``prog``'s view as one term."""
    if not 0 <= state <= len(prog.units):
        raise IndexError(f"stream state {state} out of range: the {prog.granularity} view has states "
                         f"0..{len(prog.units)}")
    return Term("stream", state=state, label=f"h{state}")


def topological(outputs: Iterable[Term]) -> list[Term]:
    """Every term the outputs are built from, each once, inputs before the terms built on them
    (and otherwise in the order the outputs name them)."""
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
            stack.extend((dep, False) for dep in reversed(term.inputs) if dep.uid not in seen)
    return ordered


def application_key(term: Term) -> tuple:
    """Terms with equal keys are coefficients of one computation — a unit's jet at one centre
    (along the same directions) — and are computed together; other terms have their own key."""
    if term.kind == "jet":
        return ("jet", id(term.unit), term.order, term.center.uid, tuple(d.uid for d in term.directions))
    return (term.kind, term.uid)
