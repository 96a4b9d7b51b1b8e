"""The expansion IR's graph: like ``torch.fx.Graph``, one topologically ordered list of nodes.

An :class:`Expansion` holds the summands (``terms``, the outputs) of one expanded unit or of the
decoder, and every node they are built from (``nodes``, inputs first: the one walk). It says what
the terms must add up to — the stream state after ``unit``, or the logits — so that evaluating it
gives the exact remainder, target − Σ terms. Terms refer to the program's units and decoder
objects; an expansion only holds terms of its own program's view.
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import torch

from jetgraph.files import atomic_write
from jetgraph.ir import ResidualProgram
from jetgraph.passes.evaluate import RunInputs, evaluate_nodes
from jetgraph.passes.metrics import summary_agreement
from jetgraph.passes.pathspec import format_path
from jetgraph.passes.terms import Space, Term, topological


@dataclass
class ExpansionValues:
    """Evaluated terms (by name, in order), the target and the exact remainder, at every position
    of the batch; ``real`` ([batch, seq] bool) marks the positions that hold tokens, not padding."""

    terms: dict[str, torch.Tensor]
    target: torch.Tensor
    remainder: torch.Tensor
    real: torch.Tensor

    def total(self) -> torch.Tensor:
        return torch.stack(list(self.terms.values())).sum(0)


class Expansion:
    """The terms of one expanded unit (``unit``, an index of ``prog.units``) or of the decoder
    (``unit == len(prog.units)``), and every node they are built from.

    ``terms``: the summands, in order. ``nodes``: every term they depend on and the terms
    themselves, inputs first. ``space``: ``"logits"`` for the decoder, else ``"stream"``.
    ``order``: the truncation order the expansion was built at.
    """

    def __init__(self, prog: ResidualProgram, unit: int, terms: Sequence[Term], order: int = 0) -> None:
        self.prog = prog
        self.unit = unit
        self.terms: tuple[Term, ...] = tuple(terms)
        self.order = order
        self.space: Space = "logits" if unit == len(prog.units) else "stream"
        self.fit_losses: list[float] = []  # set when the weights were fitted
        self.nodes: tuple[Term, ...] = tuple(topological(self.terms))
        self._check()

    def _check(self) -> None:
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names):
            raise ValueError("terms with the same provenance appear twice: "
                             f"{sorted({n for n in names if names.count(n) > 1})[:5]}")
        wrong = [t for t in self.terms if t.space != self.space]
        if wrong:
            raise ValueError(f"a {self.space}-space expansion holds {wrong[0].space}-space terms, such as "
                             f"{wrong[0].name!r}")
        known = {id(u) for u in self.prog.units} | {id(self.prog.decoder)}
        for node in self.nodes:
            if node.unit is not None and id(node.unit) not in known:
                raise ValueError(f"term {node.name!r} names unit {node.unit.name!r}, which is not a unit of "
                                 f"this program's {self.prog.granularity} view: "
                                 f"{[u.name for u in self.prog.units]}")

    def __len__(self) -> int:
        return len(self.terms)

    def __repr__(self) -> str:
        where = "decoder" if self.space == "logits" else self.prog.units[self.unit].name
        return f"Expansion({where}, order={self.order}, terms={len(self.terms)})"

    def _repr_html_(self) -> str:
        """A compact view for notebooks: where it expands, its order and its first terms."""
        where = "decoder" if self.space == "logits" else self.prog.units[self.unit].name
        names = "".join(f"<li><code>{html.escape(t.name)}</code></li>" for t in self.terms[:12])
        more = f"<li>… {len(self.terms) - 12} more</li>" if len(self.terms) > 12 else ""
        return (f"<div><b>Expansion</b> of {html.escape(where)} at order {self.order}: "
                f"{len(self.terms)} terms ({self.space} space)<ol>{names}{more}</ol></div>")

    @property
    def target_state(self) -> int:
        """The stream state the terms reconstruct (h_N, decoded, for the decoder)."""
        return len(self.prog.units) if self.space == "logits" else self.unit + 1

    # ------------------------------------------------------------------ values
    @torch.no_grad()
    def evaluate(self, input_ids: torch.Tensor, space: Space | None = None, *,
                 attention_mask: torch.Tensor | None = None) -> ExpansionValues:
        """Every term's tensor on ``input_ids`` (padded as ``attention_mask`` says), the target and
        target − Σ terms.

        ``space="logits"`` on a stream-space expansion decodes each term (the decoder's order-0
        jet at every term, unit weights) and compares with the model's logits.
        """
        if space not in (None, "stream", "logits"):
            raise ValueError(f"space must be 'stream' or 'logits', got {space!r}")
        if space == "logits" and self.space == "stream":  # the decoder's order-0 jet at every term
            decoded = [term.then(self.prog.decoder) for term in self.terms]
            return Expansion(self.prog, len(self.prog.units), decoded).evaluate(
                input_ids, attention_mask=attention_mask)
        if space == "stream" and self.space == "logits":
            raise ValueError("a logit-space expansion has no stream-space values")
        inputs = RunInputs(self.prog, input_ids, attention_mask)
        values = evaluate_nodes(self.nodes, inputs)
        target = inputs.logits() if self.space == "logits" else inputs.states[self.target_state]
        terms = {term.name: values[term.uid] for term in self.terms}
        total = torch.stack(list(terms.values())).sum(0)
        return ExpansionValues(terms, target, target - total, inputs.attention_mask.bool())

    @torch.no_grad()
    def faithfulness(self, input_ids: torch.Tensor, k: int = 5, *,
                     attention_mask: torch.Tensor | None = None) -> dict[str, float]:
        """How well Σ terms stands for the model, in logit space (stream sums are decoded):
        ``relative_remainder`` (‖remainder‖/‖target‖ in the expansion's own space) and the
        means of :func:`jetgraph.passes.metrics.logit_agreement`, over real tokens only."""
        result = self.evaluate(input_ids, attention_mask=attention_mask)
        real = result.real
        inputs = RunInputs(self.prog, input_ids, attention_mask)
        approx = result.total() if self.space == "logits" else self.prog.decoder(result.total(), inputs.side)
        return {"relative_remainder": (result.remainder[real].norm() / result.target[real].norm()).item(),
                **summary_agreement(approx[real], inputs.logits()[real], k)}

    def rank(self, input_ids: torch.Tensor, top: int | None = None, *,
             attention_mask: torch.Tensor | None = None) -> list[tuple[Term, float]]:
        """Terms by decreasing norm over the real tokens of ``input_ids`` (the first ``top``)."""
        values = self.evaluate(input_ids, attention_mask=attention_mask)
        ranked = sorted(((t, values.terms[t.name][values.real].norm().item()) for t in self.terms),
                        key=lambda pair: -pair[1])
        return ranked[:top] if top is not None else ranked

    # ------------------------------------------------------------------ export
    def export(self, path: str | Path, input_ids: torch.Tensor | None = None) -> Path:
        """Write the terms' provenance (and norms, given an input) as CSV or JSON (by suffix)."""
        path = Path(path)
        if path.suffix not in (".csv", ".json"):
            raise ValueError(f"export writes .csv or .json, not {path.suffix!r}")
        norms = {t.uid: n for t, n in self.rank(input_ids)} if input_ids is not None else {}
        rows = [{"name": t.name, "kind": t.kind, "path": format_path(t.steps),
                 "unit": t.unit.name if t.unit is not None else "", "degree": t.degree, "order": t.order,
                 "space": t.space, "center": t.center.name if t.center is not None else "",
                 "weight": _describe(t.weight), "norm": norms.get(t.uid, "")} for t in self.terms]
        if path.suffix == ".json":
            return atomic_write(path, json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        return atomic_write(path, buffer.getvalue())

    def to_networkx(self) -> nx.DiGraph:
        """The nodes as a DiGraph: an edge from each centre (role ``"center"``) and direction
        (``"direction"``) to the terms built on it; node attributes ``term``, ``label``, ``kind``,
        ``unit`` (its name), ``degree``, ``order``, ``space`` and ``output`` (a summand)."""
        graph = nx.DiGraph()
        outputs = {t.uid for t in self.terms}
        for term in self.nodes:
            graph.add_node(term.uid, term=term, label=term.name, kind=term.kind,
                           unit=term.unit.name if term.unit is not None else None, degree=term.degree,
                           order=term.order, space=term.space, output=term.uid in outputs)
            center = (term.center,) if term.center is not None else ()
            for role, inputs in (("center", center), ("direction", term.directions)):
                for source in inputs:
                    graph.add_edge(source.uid, term.uid, unit=graph.nodes[term.uid]["unit"], role=role)
        return graph


def _describe(weight: float | torch.Tensor) -> str | float:
    if isinstance(weight, torch.Tensor):
        return weight.item() if weight.numel() == 1 else f"tensor{tuple(weight.shape)}"
    return weight
