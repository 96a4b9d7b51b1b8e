"""Float64 oracles for Taylor coefficients: nested forward-mode AD and finite differences."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch.func import jvp


def nested_jvp_coefficients(f: Callable[[torch.Tensor], torch.Tensor], c: torch.Tensor, v: torch.Tensor,
                            order: int) -> list[torch.Tensor]:
    """[D^j f(c)[v^j] / j! for j = 0..order] by nesting torch.func.jvp."""
    functions = [f]
    for _ in range(order):
        previous = functions[-1]
        functions.append(lambda x, previous=previous: jvp(previous, (x,), (v,))[1])
    return [functions[j](c) / math.factorial(j) for j in range(order + 1)]


def finite_difference_coefficients(f: Callable[[torch.Tensor], torch.Tensor], c: torch.Tensor,
                                   v: torch.Tensor, order: int, radius: float = 0.2,
                                   points: int = 25, degree: int = 12) -> list[torch.Tensor]:
    """Taylor coefficients of t -> f(c + t v) by a least-squares polynomial fit on Chebyshev nodes."""
    nodes = radius * torch.cos(math.pi * (2 * torch.arange(points, dtype=torch.float64) + 1) / (2 * points))
    values = torch.stack([f(c + t * v).reshape(-1) for t in nodes])
    vandermonde = torch.stack([nodes**j for j in range(degree + 1)], 1)
    coefficients = torch.linalg.lstsq(vandermonde, values).solution
    shape = f(c).shape
    return [coefficients[j].reshape(shape) for j in range(order + 1)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def nested_jvp_derivative(f: Callable[[torch.Tensor], torch.Tensor], c: torch.Tensor,
                          directions: list[torch.Tensor]) -> torch.Tensor:
    """D^m f(c)[d_1, …, d_m] (m = len(directions)) by nesting torch.func.jvp, one per direction."""
    function = f
    for d in directions:
        function = functools.partial(_derivative, function, d)
    return function(c)


def _derivative(f: Callable[[torch.Tensor], torch.Tensor], d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return jvp(f, (x,), (d,))[1]


def weighted(value: torch.Tensor, weight: float | torch.Tensor) -> torch.Tensor:
    """value · w; a tensor w broadcasts against [batch, seq, d] from the right (as documented)."""
    return value * torch.as_tensor(weight, dtype=value.dtype)


class TermOracle:
    """What a symbolic term of ``jetgraph.expand`` should evaluate to, recomputed from its
    provenance alone (kind, centre, unit, order, weight, split monomial), in the precision of
    ``prog`` (a float64 capture for a float64 oracle).

    It shares no code with the evaluator: sources are the encoder's addends, stream terms the
    program's stream, order-j jet terms w · D^j f(c)[(h − c)^j] / j! by nested ``torch.func.jvp``
    at the materialised centre c along the stream state h the unit reads (h_L for the decoder),
    split terms w · D^|α| f(c)[d^α] / α! along the other centres, identity terms w · c (order 0)
    or w · h. ``prog`` must be the view (granularity) the terms were built on.
    """

    def __init__(self, prog, input_ids: torch.Tensor) -> None:
        with torch.no_grad():
            self.states = [s.detach() for s in prog.stream(input_ids)]
            self.addends = [a.detach() for a in prog.encoder.addends(input_ids).values()]
            self.logits = prog.decoder(self.states[-1]).detach()
        self.functions = {unit.name: unit for unit in prog.units}
        self.functions["unembed"] = prog.decoder
        self.reads = {unit.name: unit.reads for unit in prog.units}
        self._values: dict[int, torch.Tensor] = {}
        self._coefficients: dict[tuple, list[torch.Tensor]] = {}

    def target(self, unit: int | None) -> torch.Tensor:
        """The model's own h_{unit+1}, or its logits for ``unit=None``."""
        return self.logits if unit is None else self.states[unit + 1]

    def variate(self, term) -> torch.Tensor:
        name = term.unit.name  # by name: the oracle's program may be another (float64) capture
        return self.states[-1] if name == "unembed" else self.states[self.reads[name]]

    def value(self, term) -> torch.Tensor:
        if term.uid not in self._values:
            self._values[term.uid] = self._compute(term).detach()
        return self._values[term.uid]

    def _compute(self, term) -> torch.Tensor:
        if term.kind == "source":
            return self.addends[term.state]
        if term.kind == "stream":
            return self.states[term.state]
        h = self.variate(term)
        c = self.value(term.center).expand(h.shape).clone()  # jvp needs unaliased memory
        if term.kind == "identity":
            return weighted(c if term.order == 0 else h, term.weight)
        if term.kind != "jet":
            raise ValueError(f"unknown term kind {term.kind!r}")
        f = self.functions[term.unit.name]
        if term.monomial:
            directions = [self.value(d).expand(h.shape).clone() for d in term.directions]
            repeated = [d for d, a in zip(directions, term.monomial, strict=True) for _ in range(a)]
            scale = math.prod(math.factorial(a) for a in term.monomial)
            return weighted(nested_jvp_derivative(f, c, repeated) / scale, term.weight)
        key = (term.unit.name, term.center.uid)
        known = self._coefficients.get(key, [])
        if len(known) <= term.degree:
            known = nested_jvp_coefficients(f, c, h - c, term.degree)
            self._coefficients[key] = known
        return weighted(known[term.degree], term.weight)
