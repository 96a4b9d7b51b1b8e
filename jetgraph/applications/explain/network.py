"""A program frozen on one input: affine in its sources, with every gradient a search needs.

On the input being explained, each unit ``u`` of the view is replaced by its frozen
linearisation ``x ↦ A_u x + c_u`` (:func:`jetgraph.taylor.frozen.freeze`), which equals the unit
there. The frozen network is then affine in its *sources*: the encoder's addends at each
position (token and position embeddings) and each unit's constant ``c_u``. One forward and one
backward pass give, for the target value ``T`` (a logit, or a logit difference):

* ``G_s = ∂T/∂h_s``: the total of any vector placed in stream state ``s`` is ``G_s · v``;
* ``B_u = A_u^T G_{u+1}``: the total of what unit ``u`` makes of a vector it reads is ``B_u · v``.

Because ``G_s = G_N + Σ_{u reads ≥ s} B_u`` (a vector in state ``s`` reaches the decoder
directly or through a first unit that reads it), splitting a group of paths into its direct
path and its one-unit-longer groups conserves its total exactly.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import fx

from jetgraph.ir import ResidualProgram, ResidualUnit, StreamFunction
from jetgraph.taylor.frozen import FrozenGraph, freeze

_FROZEN: weakref.WeakKeyDictionary[fx.GraphModule, FrozenGraph] = weakref.WeakKeyDictionary()


_LINEAR_AGREES: weakref.WeakKeyDictionary[fx.GraphModule, bool] = weakref.WeakKeyDictionary()
"""Per frozen linear graph: whether it agreed with a jvp of its frozen unit the first time it ran
(it does on every tiny family; a graph whose offsets it drops wrongly, e.g. an MoE block's routed
experts, falls back to the jvp for good)."""


def frozen(function: StreamFunction) -> FrozenGraph:
    """The frozen linearisation of a unit's (or the decoder's) graph, made once per graph."""
    graph_module = function.graph_module
    if graph_module not in _FROZEN:
        _FROZEN[graph_module] = freeze(graph_module)
    return _FROZEN[graph_module]


@dataclass(frozen=True)
class Source:
    """Where paths start: an encoder addend at a position (``embed.token`` at 3) or a unit's
    constant (``mlp4`` with ``position=None``), whose vector lives in stream state ``state``."""

    name: str
    position: int | None
    state: int
    total: float


class FrozenNetwork:
    """``prog`` (one view) frozen on ``input_ids`` (one sequence) for the target
    ``target(logits[position])`` (a scalar function of one position's logits)."""

    def __init__(self, prog: ResidualProgram, input_ids: torch.Tensor, position: int,
                 target: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.prog = prog
        self.units: tuple[ResidualUnit, ...] = prog.units
        self.position = position
        ids, mask = prog.inputs(input_ids)
        self.side = prog.side(ids, mask)
        with torch.no_grad():
            self.addends = {name: value[0] for name, value in prog.encoder.addends(ids, mask).items()}
        with torch.enable_grad():  # callers may be inside torch.no_grad()
            self._forward_backward(ids, mask, target)

    # ---------------------------------------------------------------- passes
    def _call(self, function: StreamFunction, x: torch.Tensor) -> torch.Tensor:
        return frozen(function).values(x, *(self.side[name] for name in function.side_inputs))[0]

    def _values(self, function: StreamFunction, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The function's value and its held values (for :meth:`apply`)."""
        value, *held = frozen(function).values(x, *(self.side[name] for name in function.side_inputs))
        return value, [h.detach() for h in held]

    def _forward_backward(self, ids: torch.Tensor, mask: torch.Tensor,
                          target: Callable[[torch.Tensor], torch.Tensor]) -> None:
        h0 = self.prog.encoder(ids, mask).detach()
        shift = [torch.zeros_like(h0, requires_grad=True) for _ in range(len(self.units) + 1)]
        inputs = [torch.zeros_like(h0, requires_grad=True) for _ in self.units]
        states = [h0 + shift[0]]
        outputs, reads = [], []
        self.held: list[list[torch.Tensor]] = []
        with self.prog.resident(self.units):
            for unit, injected in zip(self.units, inputs, strict=True):
                x = states[unit.reads]
                reads.append(x.detach())
                out, held = self._values(unit, x + injected)
                self.held.append(held)
                outputs.append(out.detach())
                states.append(states[-1] + out + shift[len(states)])
            logits = self._call(self.prog.decoder, states[-1])[0, self.position]
            value = target(logits)
            grads = torch.autograd.grad(value, shift + inputs, allow_unused=True, materialize_grads=True)
        self.value = float(value.detach().double())
        self.gradients = torch.stack([g[0] for g in grads[:len(shift)]])  # G_s: [states, seq, d]
        self.unit_gradients = (torch.stack([g[0] for g in grads[len(shift):]]) if inputs
                               else torch.zeros(0, *h0.shape[1:], dtype=h0.dtype))  # B_u: [units, seq, d]
        self._flat_unit_gradients = self.unit_gradients.flatten(1).double()
        self._batches: dict[int, bool] = {}  # units whose linear graph refused a batch
        self.unit_inputs = [x[0] for x in reads]
        self.unit_outputs = [o[0] for o in outputs]
        self.final = states[-1].detach()[0]
        self.states = [s.detach()[0] for s in states]  # the model's own stream h_0 … h_N
        self.target = target
        self.reads = torch.tensor([u.reads for u in self.units], dtype=torch.long)

    # ---------------------------------------------------------------- totals
    def total(self, state: int, vector: torch.Tensor) -> float:
        """The total of ``vector`` placed in stream state ``state``: ``G_s · v``."""
        return float(_dot(self.gradients[state], vector))

    def direct(self, vector: torch.Tensor) -> float:
        """What ``vector`` gives through the identity to the decoder: ``G_N · v``."""
        return float(_dot(self.gradients[-1], vector))

    def readers(self, state: int) -> torch.Tensor:
        """Indices of the units that read stream state ``state`` or a later one."""
        return torch.nonzero(self.reads >= state).flatten()

    def through(self, units: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        """``B_u · v`` for each unit in ``units``: the totals of the groups one unit longer."""
        return self._flat_unit_gradients[units] @ vector.flatten().double()

    def through_many(self, vectors: torch.Tensor) -> torch.Tensor:
        """``B_u · v_k`` for every unit and every vector of ``vectors`` [k, seq, d]: [units, k]."""
        return self._flat_unit_gradients @ vectors.flatten(1).double().T

    def direct_many(self, vectors: torch.Tensor) -> torch.Tensor:
        """``G_N · v_k`` for every vector of ``vectors`` [k, seq, d]."""
        return vectors.flatten(1).double() @ self.gradients[-1].flatten().double()

    def sources(self) -> list[Source]:
        """Every source with its total: each addend at each position, each unit's constant
        (``G_{u+1}·out_u − B_u·x_u``) and the decoder's constant (``T − G_N·h_N``)."""
        found = []
        for name, value in self.addends.items():
            per_position = (self.gradients[0].double() * value.double()).flatten(1).sum(-1)  # [seq, …]
            found += [Source(f"embed.{name}", p, 0, float(t)) for p, t in enumerate(per_position)]
        for unit, x, out, gradient_in in zip(self.units, self.unit_inputs, self.unit_outputs,
                                              self.unit_gradients, strict=True):
            total = _dot(self.gradients[unit.index + 1], out) - _dot(gradient_in, x)
            found.append(Source(unit.name, None, unit.index + 1, float(total)))
        return found

    def decoder_constant(self) -> float:
        """``T − G_N · h_N``: the part of the target the decoder adds by itself (a bias, the
        held norm's offset)."""
        return self.value - float(_dot(self.gradients[-1], self.final))

    # ---------------------------------------------------------------- vectors
    def source_vector(self, source: Source) -> torch.Tensor:
        """The vector a source places in the stream ([seq, d])."""
        if source.position is not None:
            vector = torch.zeros_like(self.final)
            vector[source.position] = self.addends[source.name.split(".", 1)[1]][source.position]
            return vector
        index = next(u.index for u in self.units if u.name == source.name)
        return self.unit_outputs[index] - self.apply(index, self.unit_inputs[index])

    def path_value(self, source: str, position: int | None, units: Sequence[str]) -> float:
        """The contribution of one complete path (``"embed.token"`` at ``position``, or a unit's
        constant with ``position=None``, then ``units`` by name), computed along it."""
        vector, _ = self.prefix_vector(source, position, units)
        return self.direct(vector)

    def group_value(self, source: str, position: int | None, units: Sequence[str]) -> float:
        """The total of every path that begins with this prefix: ``G_s · v``."""
        vector, state = self.prefix_vector(source, position, units)
        return self.total(state, vector)

    def prefix_vector(self, source: str, position: int | None, units: Sequence[str]
                      ) -> tuple[torch.Tensor, int]:
        """The vector a prefix writes into the stream ([seq, d]) and the state it lives in."""
        index = {u.name: u.index for u in self.units}
        unknown = [name for name in units if name not in index]
        if unknown:
            raise ValueError(f"no unit {unknown[0]!r} in this view; units: {', '.join(index)}")
        state = 0 if position is not None else index[source] + 1
        vector = self.source_vector(Source(source, position, state, 0.0))
        for name in units:
            unit = self.units[index[name]]
            if unit.reads < state:
                raise ValueError(f"{name} reads the stream before the path reaches it")
            vector, state = self.apply(unit.index, vector), unit.index + 1
        return vector, state

    def apply_many(self, index: int, vectors: torch.Tensor) -> torch.Tensor:
        """``A_u v`` for each of ``vectors`` [k, seq, d] in one call where the unit's linear graph
        takes a batch (the held values broadcast; checked against one vector alone the first
        time), else one at a time."""
        linear = frozen(self.units[index]).linear
        if linear is not None and len(vectors) > 1 and self._batches.get(index) is not False:
            side = [self.side[name] for name in self.units[index].side_inputs]
            try:
                with self.prog.resident([self.units[index]]), torch.no_grad():
                    out = linear(vectors, *side, *self.held[index])
                checked = index in self._batches or self._agrees(index, vectors[0], out[0])
                if out.shape == vectors.shape and checked:
                    self._batches[index] = True
                    return out
            except RuntimeError:  # an op fixed to the input's batch (a bmm over batch × heads)
                pass
            self._batches[index] = False
        return torch.stack([self.apply(index, v) for v in vectors])

    def _agrees(self, index: int, vector: torch.Tensor, batched: torch.Tensor) -> bool:
        alone = self.apply(index, vector)
        return torch.allclose(batched, alone, rtol=1e-4, atol=1e-6 * float(alone.abs().max()))

    def apply(self, index: int, vector: torch.Tensor) -> torch.Tensor:
        """``A_u v``: unit ``index``'s frozen linear map applied to ``vector`` ([seq, d]): plain
        forward ops on the held values where the map could be built and, the first time a graph
        is used, agrees with a jvp of the frozen unit (:data:`_LINEAR_AGREES`); else the jvp."""
        unit = self.units[index]
        linear = frozen(unit).linear
        if linear is not None and _LINEAR_AGREES.get(linear) is not False:
            with self.prog.resident([unit]), torch.no_grad():
                side = (self.side[name] for name in unit.side_inputs)
                out = linear(vector.unsqueeze(0), *side, *self.held[index])[0]
            if linear in _LINEAR_AGREES:
                return out
            try:
                by_jvp = self._jvp(index, vector)
            except (NotImplementedError, RuntimeError):  # no forward AD (bf16 _grouped_mm): unchecked;
                _LINEAR_AGREES[linear] = True  # the remainder check of every attribution still holds
                return out
            _LINEAR_AGREES[linear] = torch.allclose(out, by_jvp, rtol=1e-4,
                                                    atol=1e-6 * float(by_jvp.abs().max()))
            return out if _LINEAR_AGREES[linear] else by_jvp
        return self._jvp(index, vector)

    def _jvp(self, index: int, vector: torch.Tensor) -> torch.Tensor:
        unit = self.units[index]
        x = self.unit_inputs[index].unsqueeze(0)
        with self.prog.resident([unit]), torch.no_grad():
            _, tangent = torch.func.jvp(lambda h: self._call(unit, h), (x,), (vector.unsqueeze(0),))
        return tangent[0].detach()


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() * b.double()).sum()


__all__ = ["FrozenNetwork", "Source", "frozen"]
