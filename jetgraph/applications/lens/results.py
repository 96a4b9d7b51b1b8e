"""What a lens gives: :class:`LensResult` (one text), :class:`LensAverage` (over prompts),
their metrics tables and CSV, and the divergence criterion and warnings."""

from __future__ import annotations

import csv
import functools
import io
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from jetgraph.files import atomic_write
from jetgraph.passes.metrics import METRICS, masked_mean, per_token_agreement

CSV_COLUMNS = ("lens", "order", "center", "written_by", *METRICS, "positions", "diverged", "divergent")
DIVERGENCE_REMAINDER = 2.0  # see divergent_series: a remainder past the logits' own negative


LensKind = Literal["iterative", "joint", "ahead", "jacobian", "averaged_jacobian", "tuned"]



class LensDivergenceWarning(RuntimeWarning):
    """A lens's jet overflowed (non-finite logits) at some centres and positions: their metrics are NaN."""


class LensSeriesDivergenceWarning(LensDivergenceWarning):
    """A lens's Taylor series diverges (finite, but its terms grow with the order) at some centres
    and positions: their metrics measure the diverging series, not the decoder."""


def divergent_series(coefficient_norms: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    """Where an order-k jet (k ≥ 1) is a diverging Taylor series: bool of ``remainder``'s shape.

    ``coefficient_norms`` [..., k+1]: ‖c_0‖..‖c_k‖ of the jet's terms c_j =
    D^j Dec(h)[(h_L − h)^j]/j! at each position; ``remainder`` [...]: ‖z − Σ_{j≤k} c_j‖ / ‖z‖
    (z: the model's logits). The criterion:

        ‖c_k‖ ≥ ‖c_{k−1}‖  and  ‖z − J^k‖ > DIVERGENCE_REMAINDER · ‖z‖   (DIVERGENCE_REMAINDER = 2)

    The top term is no smaller than the one before (inside the radius of convergence the terms
    shrink geometrically), and the partial sum is farther from the logits than their negative −z
    is (a converging jet of a normalised decoder stays near the logits' scale). Order 0 (one
    term) is never divergent, nor is a top term of zero (h_L itself). NaN (non-finite) entries
    compare False: overflow is flagged apart.
    """
    if coefficient_norms.shape[-1] < 2:
        return torch.zeros(remainder.shape, dtype=torch.bool)
    top, before = coefficient_norms[..., -1], coefficient_norms[..., -2]
    return (top >= before) & (top > 0) & (remainder > DIVERGENCE_REMAINDER)


@dataclass
class LensResult:
    """One lens on one input.

    ``labels[s]`` names centre s in the path language (``h3``: the stream state after the unit
    ``written_by[s]``); ``logits[s]`` is the lens's logits for it ([centres, batch, seq, vocab]); ``metrics``
    (computed on first use) maps each of :data:`METRICS` to a [centres, seq] tensor averaged over
    the batch: cosine to the true logits, KL(true ‖ lens), top-1 agreement, top-k overlap and the
    relative remainder ‖true − lens‖/‖true‖. ``prompt_metrics`` are [centres, batch]: each
    prompt's mean over its positions; :meth:`table` averages them over the prompts.

    Padding: ``attention_mask`` ([batch, seq], 1 = token, 0 = padding; None: no padding) keeps
    pad positions out of every average and count.

    Divergence: ``diverged`` ([centres, seq], bool) marks the centres and positions where the lens
    logits of some batch element are not all finite (the jet overflowed); every metric there is
    NaN, and constructing such a result warns (:class:`LensDivergenceWarning`, naming the order
    and how many states diverged). ``divergent`` ([centres, seq], bool) marks where the jet is a
    diverging series (:func:`divergent_series` on ``coefficient_norms``, overflow included); its
    metrics are kept but constructing such a result warns (:class:`LensSeriesDivergenceWarning`).
    Without ``coefficient_norms`` (the joint lens) only overflow is detected.
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
    attention_mask: torch.Tensor | None = None  # [batch, seq]: 1 = token, 0 = padding
    coefficient_norms: torch.Tensor | None = None  # [centres, order+1, batch, seq]: ‖c_0‖..‖c_order‖

    def __post_init__(self) -> None:
        diverged = self.diverged
        if diverged.any():
            states, positions = int(diverged.any(-1).sum()), int(diverged.sum())
            warnings.warn(
                f"order {self.order} {self.kind} lens: the jet diverges at {states} of {len(self.labels)} "
                f"states ({positions} of {diverged.numel()} state-positions have non-finite logits): "
                "their metrics are NaN; use a lower order", LensDivergenceWarning, stacklevel=3)
        series = self.divergent & ~diverged
        if series.any():
            warnings.warn(_series_message(f"order {self.order} {self.kind} lens", self.order,
                                          int(series.any(-1).sum()), len(self.labels),
                                          f"{int(series.sum())} of {series.numel()} state-positions"),
                          LensSeriesDivergenceWarning, stacklevel=3)

    @functools.cached_property
    def real(self) -> torch.Tensor:
        """[batch, seq] bool: the positions that hold tokens (all, without an attention mask)."""
        if self.attention_mask is None:
            return torch.ones(self.logits.shape[1:3], dtype=torch.bool)
        return self.attention_mask.bool().cpu()

    @functools.cached_property
    def diverged_tokens(self) -> torch.Tensor:
        """[centres, batch, seq] bool: real tokens whose lens logits are not all finite."""
        return _not_finite(self.logits).cpu() & self.real

    @functools.cached_property
    def diverged(self) -> torch.Tensor:
        """[centres, seq] bool: True where the lens logits of some batch element's token are not
        all finite."""
        return self.diverged_tokens.any(1)

    @functools.cached_property
    def divergent_tokens(self) -> torch.Tensor:
        """[centres, batch, seq] bool: real tokens whose jet is a diverging series
        (:func:`divergent_series`), the overflowed ones (:attr:`diverged_tokens`) included."""
        flagged = self.diverged_tokens
        norms = self.coefficient_norms
        if norms is None or norms.shape[1] < 2:
            return flagged
        growing = ((norms[:, -1] >= norms[:, -2]) & (norms[:, -1] > 0)).cpu() & self.real
        if not growing.any():  # the usual case: no metric needs computing here
            return flagged
        series = divergent_series(norms.cpu().movedim(1, -1), self.relative_remainder.cpu())
        return flagged | (series & self.real)

    @functools.cached_property
    def relative_remainder(self) -> torch.Tensor:
        """[centres, batch, seq]: ‖true − lens‖ / ‖true‖ per token (the metric ``remainder``, NaN
        where not finite), computed alone when no other metric is asked for: the divergence
        check needs only this one pass over the logits, not the softmaxes of every metric."""
        if "token_metrics" in self.__dict__:
            return self.token_metrics["remainder"]
        true = self.true_logits.detach().double()
        true_norm = true.norm(dim=-1)
        true_finite = torch.isfinite(true).all(-1)
        rows = []
        for center in self.logits.detach():
            finite = torch.isfinite(center).all(-1) & true_finite
            difference = (true - center.double().masked_fill(~finite.unsqueeze(-1), 0)).norm(dim=-1)
            rows.append((difference / true_norm).masked_fill(~finite, math.nan).float())
        return torch.stack(rows)

    @functools.cached_property
    def divergent(self) -> torch.Tensor:
        """[centres, seq] bool: True where some batch element's token has a diverging jet."""
        return self.divergent_tokens.any(1)

    @functools.cached_property
    def token_metrics(self) -> dict[str, torch.Tensor]:
        """Each of :data:`METRICS` per centre and token, [centres, batch, seq] (pads included)."""
        return per_token_agreement(self.logits, self.true_logits, self.k)

    @functools.cached_property
    def metrics(self) -> dict[str, torch.Tensor]:
        """Each of :data:`METRICS` per centre and position, averaged over the prompts with a token
        there (computed on first use; NaN where :attr:`diverged`)."""
        return {name: masked_mean(value.cpu(), self.real, 1) for name, value in self.token_metrics.items()}

    @functools.cached_property
    def prompt_metrics(self) -> dict[str, torch.Tensor]:
        """Each of :data:`METRICS` per centre and prompt, [centres, batch]: the mean over the
        prompt's tokens (NaN if one of them diverged)."""
        return {name: masked_mean(value.cpu(), self.real, 2) for name, value in self.token_metrics.items()}

    @property
    def positions(self) -> int:
        """How many tokens the averages cover (padding excluded)."""
        return int(self.real.sum())

    def top1(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids, probabilities) of each centre's top-1 prediction, [centres, batch, seq]."""
        probs = self.logits.float().softmax(-1)
        value, index = probs.max(-1)
        return index, value

    def table(self) -> list[dict[str, float | str]]:
        """One row per centre: every metric averaged over each prompt's positions, then over the
        prompts (rounded to 5 decimals); see :func:`metric_table`."""
        return metric_table(self.labels, self.written_by, self.prompt_metrics)

    def divergence(self) -> list[int]:
        """Per centre: how many tokens diverged (non-finite lens logits)."""
        return self.diverged_tokens.sum((1, 2)).tolist()

    def divergent_counts(self) -> list[int]:
        """Per centre: how many tokens have a diverging jet (:attr:`divergent_tokens`)."""
        return self.divergent_tokens.sum((1, 2)).tolist()

    def _repr_html_(self) -> str:
        from jetgraph.applications.report.inline import lens_html

        return lens_html(self)

    def show(self, tokenizer: object = None, input_ids: torch.Tensor | None = None):
        """The states × positions explorer inline in a notebook (``input_ids`` names positions)."""
        from jetgraph.applications.report import explorer

        return explorer(self, tokenizer=tokenizer, input_ids=input_ids)

    def to_html(self, path: str | Path, tokenizer: object = None,
                input_ids: torch.Tensor | None = None) -> Path:
        """This lens as a self-contained HTML explorer (:func:`jetgraph.report`)."""
        from jetgraph.applications.report import report

        return report(self, path=path, title=f"lens: {self.kind}, order {self.order}",
                      tokenizer=tokenizer, input_ids=input_ids)

    def to_csv(self, path: str | Path) -> Path:
        """This result's :meth:`table` as CSV (columns ``center`` and :data:`METRICS`); for several
        results with their lens and order, see :func:`write_lens_csv`."""
        return write_lens_csv([self], path, identify=False)


def metric_table(labels: Sequence[str], written_by: Sequence[str],
                 prompt_metrics: dict[str, torch.Tensor]) -> list[dict[str, float | str]]:
    """One row per centre: each metric's ``prompt_metrics`` ([centres, prompts]) averaged over the
    prompts, rounded to 5 decimals.

    NaN convention: if any token of a centre diverged, that centre's averages are NaN, not the
    mean over the remaining tokens; ``divergence()`` counts them.
    """
    written = list(written_by) or [""] * len(labels)
    return [{"center": label, "written_by": by,
             **{m: round(prompt_metrics[m][i].mean().item(), 5) for m in METRICS}}
            for i, (label, by) in enumerate(zip(labels, written, strict=True))]


@dataclass
class LensAverage:
    """One lens order over many prompts (:func:`lens_over_prompts`): per-centre metrics of each
    prompt, ``prompt_metrics[m]`` [centres, prompts] (each prompt's mean over its tokens), in the
    order the prompts were given. :meth:`table` averages them over the prompts, as the paper's
    faithfulness numbers are means over sentences."""

    kind: LensKind
    order: int
    labels: list[str]
    written_by: list[str]
    k: int
    prompt_metrics: dict[str, torch.Tensor]
    diverged_tokens: torch.Tensor  # [centres]: tokens with non-finite lens logits, all prompts
    positions: int  # tokens averaged over, all prompts
    divergent_tokens: torch.Tensor | None = None  # [centres]: tokens with a diverging jet, all prompts

    def table(self) -> list[dict[str, float | str]]:
        """One row per centre: every metric's mean over the prompts (see :func:`metric_table`)."""
        return metric_table(self.labels, self.written_by, self.prompt_metrics)

    def divergence(self) -> list[int]:
        """Per centre: how many tokens diverged over all prompts."""
        return self.diverged_tokens.tolist()

    def divergent_counts(self) -> list[int]:
        """Per centre: how many tokens have a diverging jet over all prompts (overflow included)."""
        counts = self.divergent_tokens if self.divergent_tokens is not None else self.diverged_tokens
        return counts.tolist()

    @property
    def divergent(self) -> torch.Tensor:
        """[centres] bool: some prompt's token has a diverging jet there."""
        return torch.tensor(self.divergent_counts()) > 0

    @property
    def prompts(self) -> int:
        return int(self.prompt_metrics[METRICS[0]].shape[1])

    def _repr_html_(self) -> str:
        from jetgraph.applications.report.inline import lens_average_html

        return lens_average_html(self)

    def show(self):
        """The per-state curves with their ranges over the prompts, inline in a notebook."""
        from jetgraph.applications.report import explorer

        return explorer(self)

    def to_html(self, path: str | Path) -> Path:
        from jetgraph.applications.report import report

        return report(self, path=path, title=f"lens over {self.prompts} prompts")

    def to_csv(self, path: str | Path) -> Path:
        """This average's :meth:`table` as CSV (see :func:`write_lens_csv`)."""
        return write_lens_csv([self], path, identify=False)


def lens_rows(results: Iterable[LensResult | LensAverage]) -> list[dict[str, float | int | str]]:
    """One row per result and centre with the columns of :data:`CSV_COLUMNS`: ``lens`` (iterative
    or joint), ``order``, ``center`` (the path-language name of the state), ``written_by`` (the
    unit that wrote it), every metric as in :meth:`LensResult.table` (NaN where a
    token diverged), ``positions`` (the tokens averaged over, padding excluded), ``diverged``
    (how many of them have non-finite logits) and ``divergent`` (how many have a diverging jet,
    :func:`divergent_series`, the non-finite ones included). The joint lens contributes one row,
    center "Σ weighted centres"."""
    rows: list[dict[str, float | int | str]] = []
    for result in results:
        for row, diverged, divergent in zip(result.table(), result.divergence(), result.divergent_counts(),
                                            strict=True):
            rows.append({"lens": result.kind, "order": result.order, **row, "positions": result.positions,
                         "diverged": diverged, "divergent": divergent})
    return rows


def write_lens_csv(results: LensResult | LensAverage | Iterable[LensResult | LensAverage],
                   path: str | Path, *,
                   identify: bool = True) -> Path:
    """Write every given lens result (any orders of the iterative lens, joint lenses) into one CSV,
    one row per result and centre, columns :data:`CSV_COLUMNS` (see :func:`lens_rows`); NaN
    metrics are written as ``nan``. ``identify=False`` writes only ``center`` and the metrics
    (what :meth:`LensResult.to_csv` writes for one result)."""
    results = [results] if isinstance(results, (LensResult, LensAverage)) else list(results)
    if not results:
        raise ValueError("write_lens_csv needs at least one LensResult")
    rows = lens_rows(results)
    columns = list(CSV_COLUMNS) if identify else ["center", *METRICS]
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, buffer.getvalue())


def _series_message(what: str, order: int, states: int, total: int, where: str) -> str:
    return (f"{what}: the Taylor series diverges at {states} of {total} states ({where}: ‖c_{order}‖ ≥ "
            f"‖c_{order - 1}‖ and remainder > {DIVERGENCE_REMAINDER:g}× the logits' norm): their metrics "
            "measure a diverging series, not the decoder; use a lower order")


def _warn_average(average: LensAverage) -> None:
    """One warning per kind of divergence of a lens over prompts."""
    what = f"order {average.order} iterative lens over {average.prompts} prompts"
    overflow = average.diverged_tokens
    if overflow.any():
        warnings.warn(f"{what}: the jet diverges at {int((overflow > 0).sum())} of {len(average.labels)} "
                      f"states ({int(overflow.sum())} state-tokens have non-finite logits): their metrics "
                      "are NaN; use a lower order", LensDivergenceWarning, stacklevel=4)
    series = torch.tensor(average.divergent_counts()) - overflow
    if series.any():
        warnings.warn(_series_message(what, average.order, int((series > 0).sum()), len(average.labels),
                                      f"{int(series.sum())} of {average.positions * len(average.labels)} "
                                      "state-tokens"), LensSeriesDivergenceWarning, stacklevel=4)


def _not_finite(values: torch.Tensor) -> torch.Tensor:
    """``~isfinite(values).all(-1)``, from one float32 sum per row (8× faster than ``isfinite``
    over the vocabulary); rows whose sum is not finite are checked element by element, since a
    sum of finite values can overflow."""
    suspect = ~torch.isfinite(values.sum(-1, dtype=torch.float32))
    if suspect.any():
        suspect[suspect.clone()] = ~torch.isfinite(values[suspect]).all(-1)
    return suspect
