"""Jet lenses: what each layer's stream already says about the output.

*Iterative lens* (paper §3): for each stream state h_ℓ, the order-k jet of the decoder centred at
h_ℓ and evaluated at h_L, J^k Dec(h_ℓ)(h_L). Order 0 is the logit lens, Dec(h_ℓ). All states
are decoded in one batched call (the codegen's :class:`~jetgraph.codegen.BatchedRun`), and one
Taylor-mode pass at the highest order gives every lower order too: the order-j lens is the sum
of the coefficients 0..j (:func:`iterative_lenses`).

*Joint lens*: the centres are h_0 and the units' contributions γ_ℓ(h_{ℓ−1}) (which sum to h_L),
with per-token softmax weights fitted to the logits (Adam on the logit-space remainder).

*Divergence*: the decoder's Taylor series has a finite radius of convergence, so at high order a
lens state far from h_L (typically h_0) grows like a power of the order until float32 overflows
(TinyStories-656K: order 18; see docs/lens.md). The metrics of a center and position whose lens
logits are not all finite are NaN, never a number, and building such a result warns
(:class:`LensDivergenceWarning`). The metrics are :mod:`jetgraph.passes.metrics`'.
"""

from __future__ import annotations

import csv
import functools
import io
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from jetgraph.codegen import BatchedRun, plan
from jetgraph.files import atomic_write
from jetgraph.ir import ENCODER_NAME, ResidualProgram, as_input_ids
from jetgraph.passes.expansion import Expansion
from jetgraph.passes.metrics import METRICS, per_center_agreement
from jetgraph.passes.rewrite import expand
from jetgraph.passes.terms import stream_term
from jetgraph.taylor import check_order

LensKind = Literal["iterative", "joint"]
CSV_COLUMNS = ("lens", "order", "center", "written_by", *METRICS, "positions", "diverged")
JOINT_LABEL = "Σ weighted centres"


class LensDivergenceWarning(RuntimeWarning):
    """A lens's jet overflowed (non-finite logits) at some centres and positions: their metrics are NaN."""


@dataclass
class LensResult:
    """One lens on one input.

    ``labels[s]`` names centre s in the path language (``h3``: the stream state after the unit
    ``written_by[s]``); ``logits[s]`` is the lens's logits for it ([centres, batch, seq, vocab]); ``metrics``
    (computed on first use) maps each of :data:`METRICS` to a [centres, seq] tensor averaged over
    the batch: cosine to the true logits, KL(true ‖ lens), top-1 agreement, top-k overlap and the
    relative remainder ‖true − lens‖/‖true‖.

    Divergence: ``diverged`` ([centres, seq], bool) marks the centres and positions where the lens
    logits of some batch element are not all finite (the jet overflowed); every metric there is
    NaN, and constructing such a result warns (:class:`LensDivergenceWarning`, naming the order
    and how many states diverged).
    """

    kind: LensKind
    order: int
    labels: list[str]
    logits: torch.Tensor
    true_logits: torch.Tensor
    k: int
    written_by: list[str] = field(default_factory=list)
    weights: torch.Tensor | None = None  # joint lens: fitted weights [centres, batch, seq, 1]
    fit_losses: list[float] = field(default_factory=list)
    center_labels: list[str] = field(default_factory=list)  # joint lens: h0 and each h_i→unit
    center_logits: torch.Tensor | None = None  # joint lens: each centre's weighted jet

    def __post_init__(self) -> None:
        diverged = self.diverged
        if diverged.any():
            states, positions = int(diverged.any(-1).sum()), int(diverged.sum())
            warnings.warn(
                f"order {self.order} {self.kind} lens: the jet diverges at {states} of {len(self.labels)} "
                f"states ({positions} of {diverged.numel()} state-positions have non-finite logits): "
                "their metrics are NaN; use a lower order", LensDivergenceWarning, stacklevel=3)

    @functools.cached_property
    def diverged(self) -> torch.Tensor:
        """[centres, seq] bool: True where the lens logits of some batch element are not all finite."""
        return ~torch.isfinite(self.logits).all(-1).all(1)

    @functools.cached_property
    def metrics(self) -> dict[str, torch.Tensor]:
        """Each of :data:`METRICS` per centre and position (computed on first use; NaN where
        :attr:`diverged`)."""
        return per_center_agreement(self.logits, self.true_logits, self.k)

    def top1(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids, probabilities) of each centre's top-1 prediction, [centres, batch, seq]."""
        probs = self.logits.float().softmax(-1)
        value, index = probs.max(-1)
        return index, value

    def table(self) -> list[dict[str, float | str]]:
        """One row per centre: every metric averaged over positions (rounded to 5 decimals).

        NaN convention: if any position of a centre diverged (see :attr:`diverged`), that centre's
        averages are NaN, not the mean over the remaining positions; :meth:`divergence` counts them.
        """
        written = self.written_by or [""] * len(self.labels)
        return [{"center": label, "written_by": by,
                 **{m: round(self.metrics[m][i].mean().item(), 5) for m in METRICS}}
                for i, (label, by) in enumerate(zip(self.labels, written, strict=True))]

    def divergence(self) -> list[int]:
        """Per centre: how many positions diverged (non-finite lens logits)."""
        return self.diverged.sum(-1).tolist()

    def to_csv(self, path: str | Path) -> Path:
        """This result's :meth:`table` as CSV (columns ``center`` and :data:`METRICS`); for several
        results with their lens and order, see :func:`write_lens_csv`."""
        return write_lens_csv([self], path, identify=False)


def lens_rows(results: Iterable[LensResult]) -> list[dict[str, float | int | str]]:
    """One row per result and centre with the columns of :data:`CSV_COLUMNS`: ``lens`` (iterative
    or joint), ``order``, ``center`` (the path-language name of the state), ``written_by`` (the
    unit that wrote it), every metric as in :meth:`LensResult.table` (NaN where a
    position diverged), ``positions`` and ``diverged`` (how many of them have non-finite logits).
    The joint lens contributes one row, center "Σ weighted centres"."""
    rows: list[dict[str, float | int | str]] = []
    for result in results:
        positions = int(result.logits.shape[2])
        for row, diverged in zip(result.table(), result.divergence(), strict=True):
            rows.append({"lens": result.kind, "order": result.order, **row, "positions": positions,
                         "diverged": diverged})
    return rows


def write_lens_csv(results: LensResult | Iterable[LensResult], path: str | Path, *,
                   identify: bool = True) -> Path:
    """Write every given lens result (any orders of the iterative lens, joint lenses) into one CSV,
    one row per result and centre, columns :data:`CSV_COLUMNS` (see :func:`lens_rows`); NaN
    metrics are written as ``nan``. ``identify=False`` writes only ``center`` and the metrics
    (what :meth:`LensResult.to_csv` writes for one result)."""
    results = [results] if isinstance(results, LensResult) else list(results)
    if not results:
        raise ValueError("write_lens_csv needs at least one LensResult")
    rows = lens_rows(results)
    columns = list(CSV_COLUMNS) if identify else ["center", *METRICS]
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, buffer.getvalue())


@torch.no_grad()
def iterative_lenses(prog: ResidualProgram, input_ids: torch.Tensor, orders: Sequence[int] = (0, 1, 2),
                     k: int = 5, granularity: str | None = None,
                     layers: Sequence[int] | None = None) -> dict[int, LensResult]:
    """The iterative lens at every order in ``orders``, from one Taylor-mode pass at the highest.

    The order-j lens at h_ℓ is the sum of the decoder jet's coefficients 0..j at h_ℓ, so one
    pass at K = max(orders) gives every order ≤ K. ``layers``: the stream states to decode
    (indices 0..N of the view's h_0..h_N, like the paper's code; default all). ``granularity``
    picks the states (``"block"``: after each block; ``"sublayer"``: after each attention and MLP
    unit); default: the program's view. Returns one :class:`LensResult` per order, by order.
    """
    orders = sorted({check_order(o, "lens order") for o in orders})
    if not orders:
        raise ValueError("orders is empty: give at least one lens order, e.g. (0, 1, 2)")
    ids = as_input_ids(input_ids)
    view = prog.at(granularity) if granularity else prog  # type: ignore[arg-type]
    states = list(range(len(view.units) + 1)) if layers is None else _states(layers, len(view.units))
    top = orders[-1]
    centers = [stream_term(view, i) for i in states]
    expansion = expand(view, "decoder", centers, order=top, weights="unit")
    outputs, true_logits, _ = BatchedRun(plan(expansion), ids).run()
    per_degree = outputs.view(len(centers), top + 1, *outputs.shape[1:])  # terms: centre-major
    labels = [c.name for c in centers]
    written = [ENCODER_NAME if i == 0 else view.units[i - 1].name for i in states]
    return {order: LensResult("iterative", order, labels, per_degree[:, : order + 1].sum(1), true_logits, k,
                              written_by=written) for order in orders}


@torch.no_grad()
def iterative_lens(prog: ResidualProgram, input_ids: torch.Tensor, order: int = 0, k: int = 5,
                   granularity: str | None = None, layers: Sequence[int] | None = None) -> LensResult:
    """The order-``order`` jet of the decoder at every stream state h_0..h_L, evaluated at h_L
    (:func:`iterative_lenses` for one order; the same arguments)."""
    return iterative_lenses(prog, input_ids, (order,), k, granularity, layers)[order]


def _states(layers: Sequence[int], units: int) -> list[int]:
    states = sorted({int(i) for i in layers})
    if not states or states[0] < 0 or states[-1] > units:
        raise ValueError(f"layers must name stream states 0..{units} (h_0 is the embedding), got "
                         f"{list(layers)}")
    return states


def contribution_centers(prog: ResidualProgram) -> Expansion:
    """h_0 and every unit's contribution γ_ℓ(h_{ℓ−1}) as terms: they sum to h_L."""
    terms = [stream_term(prog, 0)]
    for index, unit in enumerate(prog.units):
        step = expand(prog, index, [stream_term(prog, unit.reads)], order=0, weights="unit")
        terms.append(step.terms[-1])
    return Expansion(prog, len(prog.units) - 1, terms, 0)


@torch.no_grad()
def joint_lens(prog: ResidualProgram, input_ids: torch.Tensor, order: int = 0, k: int = 5,
               steps: int = 100, lr: float = 1e-2) -> LensResult:
    """The decoder expanded jointly around h_0 and the units' contributions, with per-token softmax
    weights fitted on ``input_ids``; ``logits[i]`` is centre i's weighted jet, their sum the lens."""
    ids = as_input_ids(input_ids)
    centers = contribution_centers(prog)
    with torch.enable_grad():
        expansion = expand(prog, "decoder", centers, order=order, weights="fit", fit_on=ids,
                           fit_steps=steps, fit_lr=lr)
    values = expansion.evaluate(ids)
    terms = torch.stack(list(values.terms.values()))
    per_center = terms.view(len(centers), order + 1, *terms.shape[1:]).sum(1)
    weights = torch.stack([t.weight for t in expansion.terms[:: order + 1]])
    return LensResult("joint", order, [JOINT_LABEL], per_center.sum(0, keepdim=True),
                      values.target, k, written_by=["all units"], weights=weights,
                      fit_losses=expansion.fit_losses, center_labels=[c.name for c in centers.terms],
                      center_logits=per_center)
