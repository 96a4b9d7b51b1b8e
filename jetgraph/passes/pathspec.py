"""The path language: one parser and one printer for the paths of an expansion.

A path is a source, the units it passes through and the decoder, joined by ``→``::

    embed.token→mlp3^1→unembed        (canonical, as printed)
    E→mlp3^1→U                        (the same path, with aliases)

Steps:

- the source: ``embed.NAME`` (an encoder addend: ``embed.token``, ``embed.position``) or ``hN``
  (the stream state h_N as one term);
- units by name (``attn0``, ``mlp3``, ``block2``, ``mlp3_2`` for a block's second MLP branch);
  ``^j`` takes the order-j Taylor coefficient of that unit's jet (default 0);
- the decoder, ``unembed``, also with an optional ``^j``.

Aliases accepted on input (never printed): ``->`` for ``→``; ``E`` and ``embed`` for
``embed.token``; ``U`` for ``unembed`` (both case-insensitive); ``MLP_last`` and ``ATTN_last``
for the last unit of that kind, and ``h_last`` for the stream after the last unit (resolved
against a model by :func:`jetgraph.passes.paths.path_term`; ``h_last→U`` is the model's own
output). Printed only: a split jet's monomial
``mlp3[embed.token·h2^2]`` and a skip branch's suffix ``(id)``.

This module knows the syntax only; binding names to a model's units is
:func:`jetgraph.passes.paths.path_term`, and the unit names themselves are
:func:`jetgraph.ir.unit_name`'s.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from jetgraph.ir import DECODER_NAME, ENCODER_NAME, parse_unit_name
from jetgraph.taylor.basis import MAX_ORDER

ARROW = "→"
SOURCE_ALIASES = {"e": f"{ENCODER_NAME}.token", ENCODER_NAME: f"{ENCODER_NAME}.token"}
DECODER_ALIASES = {"u": DECODER_NAME, DECODER_NAME: DECODER_NAME}
LAST_OF_KIND = {"mlp_last": "mlp", "attn_last": "attn"}
LAST_STATE = "h_last"


@dataclass(frozen=True)
class PathSpec:
    """One path as text names: ``source`` (``embed.token``, ``h3``), the ``units`` it passes
    through, and the Taylor ``degrees`` taken at each unit and at the decoder (one more than
    ``units``; all 0 at order 0). ``str(spec)`` and :attr:`name` print it canonically."""

    source: str
    units: tuple[str, ...]
    degrees: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.degrees:
            object.__setattr__(self, "degrees", (0,) * (len(self.units) + 1))
        if len(self.degrees) != len(self.units) + 1:
            raise ValueError(f"a path through {len(self.units)} unit(s) takes {len(self.units) + 1} "
                             f"degrees (one per unit and the decoder), got {len(self.degrees)}")

    @property
    def name(self) -> str:
        steps = [*self.units, DECODER_NAME]
        return format_path([self.source, *(format_step(s, j) for s, j in zip(steps, self.degrees,
                                                                             strict=True))])

    @property
    def order(self) -> int:
        """The truncation order the path needs: its largest degree."""
        return max(self.degrees)

    def __str__(self) -> str:
        return self.name


# ------------------------------------------------------------------------------ printing
def format_step(unit: str, degree: int = 0) -> str:
    """One step: the unit, with ``^j`` when the order-j coefficient (j ≥ 1) is taken."""
    return f"{unit}^{degree}" if degree else unit


def format_split_step(unit: str, powers: Sequence[tuple[str, int]]) -> str:
    """A split jet's step: the monomial over the other centres, ``mlp3[embed.token·h2^2]``
    (``powers``: each direction's name and its power; zero powers are left out)."""
    parts = [f"{name}^{power}" if power > 1 else name for name, power in powers if power]
    return f"{unit}[{'·'.join(parts)}]" if parts else unit


def format_path(steps: Sequence[str], identity: bool = False) -> str:
    """Steps joined by ``→``; ``identity`` marks a skip branch with ``(id)``."""
    return ARROW.join(steps) + ("(id)" if identity else "")


# ------------------------------------------------------------------------------- parsing
def parse_path(text: str) -> PathSpec:
    """A path from text, checked for syntax only (no model needed): ``"E→mlp3^1→U"`` →
    ``PathSpec("embed.token", ("mlp3",), (1, 0))``. Unit names are kept as written (aliases
    such as ``MLP_last`` included); :func:`jetgraph.passes.paths.path_term` binds them."""
    if not isinstance(text, str):
        raise ValueError(f"a path is text such as 'E→mlp0→U', got {type(text).__name__}")
    return _parse_text(text)


@functools.lru_cache(maxsize=1024)
def _parse_text(text: str) -> PathSpec:
    """The parser itself, once per distinct text: a PathSpec is immutable, so every layer that
    takes a path as text (the CLI's checks, plans, sweeps, readers) shares one parse."""
    steps = [s.strip() for s in text.replace("->", ARROW).split(ARROW)]
    if len(steps) < 2:
        raise ValueError(f"path {text!r} needs at least a source and the decoder, e.g. 'E→U'")
    if any(not s for s in steps):
        raise ValueError(f"path {text!r} has an empty step: write steps joined by → or ->, e.g. 'E→mlp0→U'")
    parsed = [_parse_step(text, step) for step in steps]
    (source, source_degree), *middle, (end, end_degree) = parsed
    if source_degree:
        raise ValueError(f"path {text!r}: the source {source!r} takes no Taylor order (^j goes on "
                         "the units and U)")
    if source.lower() in DECODER_ALIASES:
        raise ValueError(f"path {text!r} starts at the decoder; it must start at a source such as E")
    if end.lower() not in DECODER_ALIASES:
        raise ValueError(f"path {text!r} must end at U (the decoder)")
    source = SOURCE_ALIASES.get(source.lower(), source)
    source = LAST_STATE if source.lower() == LAST_STATE else source
    if not (source.startswith(f"{ENCODER_NAME}.") or _is_state(source) or source == LAST_STATE):
        raise ValueError(f"path {text!r} starts at {source!r}; sources are E (= embed.token), "
                         "embed.NAME (an encoder addend), hN (a stream state) or h_last")
    for name, _ in middle:
        if name.lower() in DECODER_ALIASES or name.lower() in SOURCE_ALIASES:
            raise ValueError(f"path {text!r}: {name!r} can only be the first (E) or last (U) step")
    units = tuple(_canonical_alias(n) for n, _ in middle)
    return PathSpec(source, units, tuple(j for _, j in (*middle, (end, end_degree))))


def _canonical_alias(name: str) -> str:
    """``mlp_LAST`` → ``MLP_last``: aliases in one spelling, so equal paths print equal."""
    return {"mlp_last": "MLP_last", "attn_last": "ATTN_last"}.get(name.lower(), name)


def _parse_step(text: str, step: str) -> tuple[str, int]:
    name, caret, power = step.partition("^")
    name = name.strip()
    if not name or not all(c.isalnum() or c in "_." for c in name):
        raise ValueError(f"path {text!r}: step {step!r} is not a unit name (letters, digits, '_', '.')")
    if caret and not power.strip().isdigit():
        raise ValueError(f"path {text!r}: step {step!r} takes the order as ^j with j an integer 0.."
                         f"{MAX_ORDER}, got ^{power.strip()}")
    degree = int(power) if caret else 0
    if degree > MAX_ORDER:
        raise ValueError(f"path {text!r}: order {degree} at {name!r} is above the highest supported "
                         f"order {MAX_ORDER}")
    return name, degree


def _is_state(name: str) -> bool:
    return name.startswith("h") and name[1:].isdigit()


# ---------------------------------------------------------- checks without a model
def check_unit_names(text: str, layers: int) -> None:
    """Check a path's unit names against a model with ``layers`` blocks (from its config,
    before loading it): every name must be one capture gives (:func:`jetgraph.ir.unit_name`)
    with a layer below ``layers``, or ``MLP_last`` / ``ATTN_last``."""
    for name in parse_path(text).units:
        if name.lower() in LAST_OF_KIND:
            continue
        parsed = parse_unit_name(name)
        if parsed is None:
            raise ValueError(f"path {text!r} names unknown unit {name!r}: units are attn0..attn{layers - 1}, "
                             f"mlp0..mlp{layers - 1} (sublayers), block0..block{layers - 1}, MLP_last "
                             "and ATTN_last")
        kind, layer = parsed
        if layer >= layers:
            raise ValueError(f"path {text!r} names {name!r}, but the model has {layers} layers "
                             f"({kind}0..{kind}{layers - 1})")


def starts_at_model_state(text: str | PathSpec) -> bool:
    """Whether a path starts at a stream state past the embedding (``h_last``, ``hN`` with
    N ≥ 1): the model's own computation, which reads its whole context (from the text; a bound
    term: :func:`jetgraph.passes.paths.starts_at_model_state`)."""
    source = (text if isinstance(text, PathSpec) else parse_path(text)).source
    return source == LAST_STATE or (_is_state(source) and int(source[1:]) >= 1)


def reads_context(text: str | PathSpec) -> bool | None:
    """Whether a path mixes positions, from its text alone (before a model is loaded): True if
    it passes a unit named as attention (``attnI``, ``ATTN_last``, by capture's naming,
    :func:`jetgraph.ir.parse_unit_name`), False if every unit is named as an MLP, None if it
    passes a whole block (a block's kind is known only once the model is captured). With a
    model, the units' own kinds decide (:func:`jetgraph.passes.paths.context_tokens`)."""
    unknown = False
    for name in (text if isinstance(text, PathSpec) else parse_path(text)).units:
        kind = LAST_OF_KIND.get(name.lower()) or (parse_unit_name(name) or ("", 0))[0]
        if kind == "attn":
            return True
        unknown = unknown or kind != "mlp"
    return None if unknown else False
