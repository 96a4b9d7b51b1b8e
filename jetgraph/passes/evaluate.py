"""What a term computes: one definition, shared by the reference evaluator and the batched run.

:func:`evaluate_terms` gives the values of a group of terms that share a kind, a unit and an
order, on centres stacked along a leading dimension:

- ``source``: the encoder addend ``state``; ``stream``: the stream state h_``state``;
- ``identity``: J^k id(c)(h), which is the centre c at k = 0 and the stream h the unit reads
  above (the skip branch), times the weight;
- ``jet``: the coefficient (``degree``, or a split jet's ``monomial``) of the unit's order-k jet
  at the centre, along h − c (or along the ``directions``), times the weight.

:func:`evaluate_nodes` is the reference evaluator: it walks an expansion's nodes in topological
order, one jet per distinct (unit, centre). :class:`~jetgraph.codegen.BatchedRun` calls the same
function on whole schedule steps, with many centres at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from jetgraph.ir import Decoder, ResidualProgram
from jetgraph.passes.terms import Term, Unit, Weight, application_key
from jetgraph.taylor import Basis, jet


class RunInputs:
    """What terms are computed from, on one input (token ids and their attention mask): the
    addends, the model's own stream, the side inputs (each computed on first use: order-0 paths
    never run the model's forward)."""

    def __init__(self, prog: ResidualProgram, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> None:
        self.prog = prog
        self.input_ids, self.attention_mask = prog.inputs(input_ids, attention_mask)
        self.batch, self.seq = self.input_ids.shape
        self._states: list[torch.Tensor] | None = None
        self._side: dict[str, torch.Tensor] | None = None
        self._addends: list[torch.Tensor] | None = None
        self._stacked_side: dict[int, dict[str, torch.Tensor]] = {}

    @property
    def states(self) -> list[torch.Tensor]:
        """h_0..h_N of the program's view."""
        if self._states is None:
            self._states, self._side = self.prog.stream_with_side_inputs(self.input_ids, self.attention_mask)
        return self._states

    @property
    def side(self) -> dict[str, torch.Tensor]:
        if self._side is None:
            self._side = self.prog.side(self.input_ids, self.attention_mask)
        return self._side

    @property
    def addends(self) -> list[torch.Tensor]:
        if self._addends is None:
            self._addends = list(self.prog.encoder.addends(self.input_ids, self.attention_mask).values())
        return self._addends

    @property
    def stream_shape(self) -> torch.Size:
        """[batch, seq, *per position]: [batch, seq, d], or [batch, seq, n, d] for n parallel
        streams; the encoder's addends broadcast to it ([seq, d] position tables included)."""
        shape = torch.broadcast_shapes(*(a.shape for a in self.addends))
        return torch.Size((self.batch, self.seq, *shape[2:]))

    def variate(self, unit: Unit) -> torch.Tensor:
        """The stream state ``unit`` reads, where its jets are evaluated (h_N for the decoder)."""
        return self.states[-1] if isinstance(unit, Decoder) else self.states[unit.reads]

    def logits(self) -> torch.Tensor:
        return self.prog.decoder(self.states[-1], self.side)

    def side_for(self, count: int) -> dict[str, torch.Tensor]:
        """Side inputs for ``count`` copies of the batch stacked along it (masks, RoPE tables),
        computed by the side-input graph from the stacked ids and mask: right by construction,
        whatever the padding and whether or not the side inputs depend on token ids."""
        if count == 1 or not self.side:
            return self.side
        if count not in self._stacked_side:
            self._stacked_side[count] = self.prog.side(self.input_ids.repeat(count, 1),
                                                       self.attention_mask.repeat(count, 1))
        return self._stacked_side[count]


def coefficient_index(term: Term) -> int:
    """Where a jet term's coefficient sits in the unit's jet (its monomial's basis index)."""
    basis = Basis(max(len(term.directions), 1), term.order)
    return basis.index[term.monomial] if term.monomial else basis.index[(term.degree,)]


def evaluate_terms(terms: Sequence[Term], inputs: RunInputs, centers: torch.Tensor | None = None,
                   center_of: Sequence[int] | None = None,
                   directions: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """The values of ``terms`` (one kind, unit and order), stacked [rows, batch, seq, width].

    ``centers`` [n, batch, seq, d]: the distinct centres of jet (and order-0 identity) terms; term i uses
    centre ``center_of[i]``. ``directions``: for split jets, one [n, batch, seq, d] tensor per
    direction (the other centres of each application).
    """
    kind = terms[0].kind
    full = (inputs.batch, inputs.seq)
    if kind == "source":
        return torch.stack([inputs.addends[t.state].expand(inputs.stream_shape) for t in terms])
    if kind == "stream":
        return torch.stack([inputs.states[t.state] for t in terms])
    unit = terms[0].unit
    if kind == "identity" and terms[0].order >= 1:  # J^k id(c)(h) = h for k ≥ 1: no centre needed
        return weighted(torch.stack([inputs.variate(unit)] * len(terms)), [t.weight for t in terms])
    if centers is None or center_of is None:
        raise ValueError(f"{kind} terms are computed from their centres: give centers and center_of")
    centers = centers.expand(centers.shape[0], *full, *centers.shape[3:])  # an addend may have batch 1
    if kind == "identity":  # J^0 id(c)(h) = c
        return weighted(centers[list(center_of)], [t.weight for t in terms])
    coefficients = unit_jet(unit, terms[0].order, centers, inputs, directions)
    return term_rows(terms, coefficients, centers.shape[0], center_of)


def term_rows(terms: Sequence[Term], coefficients: torch.Tensor, count: int,
              center_of: Sequence[int]) -> torch.Tensor:
    """The rows of jet ``terms`` from their unit's coefficients [size·count, …] (coefficient-major
    over ``count`` centres), times their weights."""
    flat_rows = [coefficient_index(t) * count + a for t, a in zip(terms, center_of, strict=True)]
    if flat_rows == list(range(flat_rows[0], flat_rows[0] + len(flat_rows))):
        rows = coefficients[flat_rows[0]:flat_rows[-1] + 1]  # a contiguous slice: no copy
    else:
        rows = coefficients.index_select(0, torch.tensor(flat_rows, device=coefficients.device))
    return weighted(rows, [t.weight for t in terms])


def unit_jet(unit: Unit, order: int, centers: torch.Tensor, inputs: RunInputs,
             directions: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Every coefficient of ``unit``'s order-``order`` jet at each of ``centers`` [n, batch, seq,
    d], in one Taylor-mode pass on the centres stacked along the batch: [size·n, batch, seq, w],
    coefficient-major. Along h − c (h: the state the unit reads), or along ``directions``. A
    lazily read program holds the unit's weights only while its jet runs."""
    count = centers.shape[0]
    flat = (count * inputs.batch, inputs.seq, *centers.shape[3:])
    stacked = centers.reshape(flat)
    side = inputs.side_for(count)
    if directions:
        along = [d.expand(centers.shape).reshape(flat) for d in directions]
        variate = None
    else:  # at order 0 the variate is not read: the centres stand in for it
        along = None
        variate = stacked if order == 0 else \
            inputs.variate(unit).expand(count, *inputs.variate(unit).shape).reshape(flat)
    with inputs.prog.resident([] if isinstance(unit, Decoder) else [unit]):
        coefficients = jet(unit, stacked, variate, order=order, directions=along, side=side).coefficients
    return coefficients.reshape(coefficients.shape[0] * count, inputs.batch, inputs.seq,
                                *coefficients.shape[3:])


def weighted(rows: torch.Tensor, weights: Sequence[Weight]) -> torch.Tensor:
    """rows · w per row; tensor weights broadcast against [batch, seq, width] from the right."""
    if all(not isinstance(w, torch.Tensor) for w in weights):
        if all(w == 1.0 for w in weights):
            return rows
        if len(set(weights)) == 1:
            return rows * weights[0]
        column = torch.tensor(weights, dtype=rows.dtype, device=rows.device)
        return rows * column.view(-1, *([1] * (rows.dim() - 1)))
    tensors = [torch.as_tensor(w, dtype=rows.dtype).to(rows.device) for w in weights]
    shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    stacked = torch.stack([t.expand(shape) for t in tensors])
    return rows * stacked.view(len(tensors), *([1] * (rows.dim() - 1 - len(shape))), *shape)


def evaluate_nodes(nodes: Sequence[Term], inputs: RunInputs) -> dict[int, torch.Tensor]:
    """The reference evaluator: every node's value by uid, walking ``nodes`` (topologically
    ordered) once; the coefficients of one unit's jet at one centre are computed together."""
    groups: dict[tuple, list[Term]] = {}
    for term in nodes:
        groups.setdefault(application_key(term), []).append(term)
    values: dict[int, torch.Tensor] = {}
    for terms in groups.values():  # a group's first member follows all of its inputs
        first = terms[0]
        centers = values[first.center.uid].unsqueeze(0) if first.center is not None else None
        directions = [values[d.uid].unsqueeze(0) for d in first.directions] or None
        rows = evaluate_terms(terms, inputs, centers, [0] * len(terms), directions)
        for term, row in zip(terms, rows, strict=True):
            values[term.uid] = row
    return values
