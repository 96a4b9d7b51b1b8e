"""Jet lenses: what each layer's stream already says about the output.

*Iterative lens* (paper §3): for each stream state h_ℓ, the order-k jet of the decoder centred at
h_ℓ and evaluated at h_L, J^k Dec(h_ℓ)(h_L). Order 0 is the logit lens, Dec(h_ℓ). All states
are decoded in one batched call (the codegen's :class:`~jetgraph.codegen.BatchedRun`), one
Taylor-mode pass for all orders.

*Joint lens*: the centres are h_0 and the units' contributions γ_ℓ(h_{ℓ−1}) (which sum to h_L),
with per-token softmax weights fitted to the logits (Adam on the logit-space remainder).

*Divergence*: the decoder's Taylor series has a finite radius of convergence, so at high order a
lens state far from h_L (typically h_0) grows like a power of the order until float32 overflows
(TinyStories-656K: order 18; see docs/lens.md). The metrics of a centre and position whose lens
logits are not all finite are NaN, never a number, and building such a result warns
(:class:`LensDivergenceWarning`).
"""

from __future__ import annotations

import csv
import functools
import io
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from jetgraph.codegen import BatchedRun, plan
from jetgraph.files import atomic_write
from jetgraph.ir import ResidualProgram, as_input_ids
from jetgraph.passes.expand import Expansion, expand, stream_term

METRICS = ("cosine", "kl", "top1", "topk", "remainder")
CSV_COLUMNS = ("lens", "order", "centre", *METRICS, "positions", "diverged")


class LensDivergenceWarning(RuntimeWarning):
    """A lens's jet overflowed (non-finite logits) at some centres and positions: their metrics are NaN."""


@dataclass
class LensResult:
    """One lens on one input.

    ``logits[s]`` is the lens's logits for centre s ([centres, batch, seq, vocab]); ``metrics``
    (computed on first use) maps each of :data:`METRICS` to a [centres, seq] tensor averaged over
    the batch: cosine to the true logits, KL(true ‖ lens), top-1 agreement, top-k overlap and the
    relative remainder ‖true − lens‖/‖true‖.

    Divergence: ``diverged`` ([centres, seq], bool) marks the centres and positions where the lens
    logits of some batch element are not all finite (the jet overflowed); every metric there is
    NaN, and constructing such a result warns (:class:`LensDivergenceWarning`, naming the order
    and how many states diverged).
    """

    kind: str
    order: int
    labels: list[str]
    logits: torch.Tensor
    true_logits: torch.Tensor
    k: int
    weights: torch.Tensor | None = None  # joint lens: fitted weights [centres, batch, seq, 1]
    fit_losses: list[float] = field(default_factory=list)
    centre_labels: list[str] = field(default_factory=list)  # joint lens: h_0 and the γ_ℓ
    centre_logits: torch.Tensor | None = None  # joint lens: each centre's weighted jet

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
        return lens_metrics(self.logits, self.true_logits, self.k)

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
        return [{"centre": label, **{m: round(self.metrics[m][i].mean().item(), 5) for m in METRICS}}
                for i, label in enumerate(self.labels)]

    def divergence(self) -> list[int]:
        """Per centre: how many positions diverged (non-finite lens logits)."""
        return self.diverged.sum(-1).tolist()

    def to_csv(self, path: str | Path) -> Path:
        """This result's :meth:`table` as CSV (columns ``centre`` and :data:`METRICS`); for several
        results with their lens and order, see :func:`write_lens_csv`."""
        return write_lens_csv([self], path, identify=False)


def lens_rows(results: Iterable[LensResult]) -> list[dict[str, float | int | str]]:
    """One row per result and centre with the columns of :data:`CSV_COLUMNS`: ``lens`` (iterative
    or joint), ``order``, ``centre``, every metric as in :meth:`LensResult.table` (NaN where a
    position diverged), ``positions`` and ``diverged`` (how many of them have non-finite logits).
    The joint lens contributes one row, centre "Σ weighted centres"."""
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
    metrics are written as ``nan``. ``identify=False`` writes only ``centre`` and the metrics
    (what :meth:`LensResult.to_csv` writes for one result)."""
    results = [results] if isinstance(results, LensResult) else list(results)
    if not results:
        raise ValueError("write_lens_csv needs at least one LensResult")
    rows = lens_rows(results)
    columns = list(CSV_COLUMNS) if identify else ["centre", *METRICS]
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, buffer.getvalue())


def lens_metrics(logits: torch.Tensor, true_logits: torch.Tensor, k: int = 5) -> dict[str, torch.Tensor]:
    """Per centre and position (mean over batch): cosine, KL(true ‖ lens), top-1, top-k, remainder.

    ``logits`` [centres, batch, seq, vocab], ``true_logits`` [batch, seq, vocab]; returns float32
    [centres, seq] tensors. Computed in float64, one centre at a time, so that huge but finite
    jets (a diverging series reaches 1e30 long before float32 overflows) give their true cosine
    and remainder rather than overflowing to 0 and inf. Where the lens (or true) logits of a
    position are not all finite every metric is NaN, and so is its mean over the batch.
    """
    true = true_logits.detach().double()
    true_log = true.log_softmax(-1)
    true_top = true_logits.detach().topk(k, -1).indices
    true_arg = true_logits.detach().argmax(-1)
    true_norm = true.norm(dim=-1)
    per_centre: dict[str, list[torch.Tensor]] = {m: [] for m in METRICS}
    for centre in logits.detach():
        finite = torch.isfinite(centre).all(-1) & torch.isfinite(true).all(-1)
        centre = centre.masked_fill(~finite.unsqueeze(-1), 0)  # NaN-masked below
        lens_top = centre.topk(k, -1).indices  # ranks in the logits' own dtype
        safe = centre.double()
        values = {
            "cosine": F.cosine_similarity(safe, true, dim=-1),
            "kl": (true_log.exp() * (true_log - safe.log_softmax(-1))).sum(-1),
            "top1": (centre.argmax(-1) == true_arg).double(),
            "topk": (true_top.unsqueeze(-1) == lens_top.unsqueeze(-2)).any(-1).double().mean(-1),
            "remainder": (true - safe).norm(dim=-1) / true_norm,
        }
        for name, value in values.items():
            per_centre[name].append(value.masked_fill(~finite, math.nan).mean(0).float())
    return {name: torch.stack(value) for name, value in per_centre.items()}


@torch.no_grad()
def iterative_lens(prog: ResidualProgram, input_ids: torch.Tensor, order: int = 0, k: int = 5,
                   granularity: str | None = None) -> LensResult:
    """The order-``order`` jet of the decoder at every stream state h_0..h_L, evaluated at h_L.

    ``granularity`` picks the states (``"block"``: after each block; ``"sublayer"``: after each
    attention and MLP unit); default: the program's view.
    """
    if not isinstance(order, int) or order < 0:
        raise ValueError(f"order must be a non-negative int, got {order!r}")
    ids = as_input_ids(input_ids)
    view = prog.at(granularity) if granularity else prog  # type: ignore[arg-type]
    states = [stream_term(view, i) for i in range(len(view.units) + 1)]
    expansion = expand(view, "decoder", states, order=order, weights="unit")
    run = BatchedRun(plan(expansion), ids)
    outputs, true_logits, _ = run.run()
    per_order = outputs.view(len(states), order + 1, *outputs.shape[1:])  # terms: centre-major
    labels = ["h0 (embed)"] + [f"h{i + 1} ({u.name})" for i, u in enumerate(view.units)]
    return LensResult("iterative", order, labels, per_order.sum(1), true_logits, k)


def contribution_centres(prog: ResidualProgram) -> Expansion:
    """h_0 and every unit's contribution γ_ℓ(h_{ℓ−1}) as terms: they sum to h_L."""
    terms = [stream_term(prog, 0)]
    for index, unit in enumerate(prog.units):
        step = expand(prog, index, [stream_term(prog, unit.reads)], order=0, weights="unit")
        terms.append(step.terms[-1])
    return Expansion(prog, len(prog.units) - 1, terms, "stream", 0)


@torch.no_grad()
def joint_lens(prog: ResidualProgram, input_ids: torch.Tensor, order: int = 0, k: int = 5,
               steps: int = 100, lr: float = 1e-2) -> LensResult:
    """The decoder expanded jointly around h_0 and the units' contributions, with per-token softmax
    weights fitted on ``input_ids``; ``logits[i]`` is centre i's weighted jet, their sum the lens."""
    ids = as_input_ids(input_ids)
    centres = contribution_centres(prog)
    with torch.enable_grad():
        expansion = expand(prog, "decoder", centres, order=order, weights="fit", fit_on=ids,
                           fit_steps=steps, fit_lr=lr)
    values = expansion.evaluate(ids)
    terms = torch.stack(list(values.terms.values()))
    per_centre = terms.view(len(centres), order + 1, *terms.shape[1:]).sum(1)
    labels = ["h0 (embed)"] + [f"γ {u.name}" for u in prog.units]
    weights = torch.stack([t.weight for t in expansion.terms[:: order + 1]])
    return LensResult("joint", order, ["Σ weighted centres"], per_centre.sum(0, keepdim=True),
                      values.target, k, weights=weights, fit_losses=expansion.fit_losses,
                      centre_labels=labels, centre_logits=per_centre)
