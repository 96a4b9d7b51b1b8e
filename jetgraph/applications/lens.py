"""Jet lenses: what each layer's stream already says about the output.

*Iterative lens* (paper §3): for each stream state h_ℓ, the order-k jet of the decoder centred at
h_ℓ and evaluated at h_L, J^k Dec(h_ℓ)(h_L). Order 0 is the logit lens, Dec(h_ℓ). All states
are decoded in one batched call (the codegen's :class:`~jetgraph.codegen.BatchedRun`), and one
Taylor-mode pass at the highest order gives every lower order too: the order-j lens is the sum
of the coefficients 0..j (:func:`iterative_lenses`).

*Joint lens*: the centres are h_0 and the units' contributions γ_ℓ(h_{ℓ−1}) (which sum to h_L),
with per-token softmax weights fitted to the logits (Adam on the logit-space remainder).

*Divergence*: the decoder's Taylor series has a finite radius of convergence, so a lens state far
from h_L (typically h_0, or mid-stack states of a model whose stream norm grows with depth) has
terms that grow geometrically with the order. Such a jet is flagged *divergent*
(:attr:`LensResult.divergent`, the criterion is :func:`divergent_series`) and building the result
warns (:class:`LensSeriesDivergenceWarning`): its metrics are numbers, but they measure a diverging
series, not the decoder. At high order the terms overflow float32 (TinyStories-656K: order 18; see
docs/lens.md); the metrics of a centre and position whose lens logits are not all finite are NaN,
never a number (:class:`LensDivergenceWarning`). The metrics are :mod:`jetgraph.passes.metrics`'.

*Cost*: :func:`lens_plan` prices a lens over prompts (time and peak memory) before any work, and
:func:`lens_over_prompts` picks its batch size so that the planned peak stays under a memory budget.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from jetgraph.codegen import BatchedRun, plan
from jetgraph.cost import (
    DEFAULT_MAX_SECONDS,
    Plan,
    available_memory,
    elementwise_rate,
    estimate_seconds,
    format_bytes,
    gemm_rate,
)
from jetgraph.errors import CostError
from jetgraph.files import atomic_write
from jetgraph.ir import ENCODER_NAME, ResidualProgram, as_input_ids
from jetgraph.passes.expansion import Expansion
from jetgraph.passes.metrics import METRICS, masked_mean, per_token_agreement
from jetgraph.passes.rewrite import expand
from jetgraph.passes.terms import stream_term
from jetgraph.taylor import check_order

LensKind = Literal["iterative", "joint"]
CSV_COLUMNS = ("lens", "order", "center", "written_by", *METRICS, "positions", "diverged", "divergent")
JOINT_LABEL = "Σ weighted centres"
DIVERGENCE_REMAINDER = 2.0  # see divergent_series: a remainder past the logits' own negative
DEFAULT_BATCH_SIZE = 8
MEMORY_FRACTION = 0.5  # default budget of lens_over_prompts: this share of the memory available


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
        series = divergent_series(norms.cpu().movedim(1, -1), self.token_metrics["remainder"].cpu())
        return flagged | (series & self.real)

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


@torch.no_grad()
def iterative_lenses(prog: ResidualProgram, input_ids: torch.Tensor, orders: Sequence[int] = (0, 1, 2),
                     k: int = 5, granularity: str | None = None,
                     layers: Sequence[int] | None = None, *,
                     attention_mask: torch.Tensor | None = None) -> dict[int, LensResult]:
    """The iterative lens at every order in ``orders``, from one Taylor-mode pass at the highest.

    The order-j lens at h_ℓ is the sum of the decoder jet's coefficients 0..j at h_ℓ, so one
    pass at K = max(orders) gives every order ≤ K. ``layers``: the stream states to decode
    (indices 0..N of the view's h_0..h_N, like the paper's code; default all). ``granularity``
    picks the states (``"block"``: after each block; ``"sublayer"``: after each attention and MLP
    unit); default: the program's view. ``attention_mask``: a padded batch (1 = token, 0 =
    padding, either side); each prompt gets its own results and pads count in no metric.
    Returns one :class:`LensResult` per order, by order.
    """
    orders = sorted({check_order(o, "lens order") for o in orders})
    if not orders:
        raise ValueError("orders is empty: give at least one lens order, e.g. (0, 1, 2)")
    view = prog.at(granularity) if granularity else prog  # type: ignore[arg-type]
    ids, mask = view.inputs(input_ids, attention_mask)
    states = list(range(len(view.units) + 1)) if layers is None else _states(layers, len(view.units))
    top = orders[-1]
    centers = [stream_term(view, i) for i in states]
    expansion = expand(view, "decoder", centers, order=top, weights="unit")
    outputs, true_logits, _ = BatchedRun(plan(expansion), ids, mask).run()
    per_degree = outputs.view(len(centers), top + 1, *outputs.shape[1:])  # terms: centre-major
    norms = _norms(per_degree)
    labels = [c.name for c in centers]
    written = [ENCODER_NAME if i == 0 else view.units[i - 1].name for i in states]
    padding = mask if attention_mask is not None else None
    if len(orders) == 1:
        sums = {top: per_degree.sum(1)}
    else:  # partial sums in place: every order is a view of the one buffer (no copy per order)
        for j in range(1, top + 1):
            per_degree[:, j] += per_degree[:, j - 1]
        sums = {order: per_degree[:, order] for order in orders}
    return {order: LensResult("iterative", order, labels, sums[order], true_logits, k, written_by=written,
                              attention_mask=padding, coefficient_norms=norms[:, : order + 1])
            for order in orders}


@torch.no_grad()
def iterative_lens(prog: ResidualProgram, input_ids: torch.Tensor, order: int = 0, k: int = 5,
                   granularity: str | None = None, layers: Sequence[int] | None = None, *,
                   attention_mask: torch.Tensor | None = None) -> LensResult:
    """The order-``order`` jet of the decoder at every stream state h_0..h_L, evaluated at h_L
    (:func:`iterative_lenses` for one order; the same arguments)."""
    return iterative_lenses(prog, input_ids, (order,), k, granularity, layers,
                            attention_mask=attention_mask)[order]


@dataclass(frozen=True)
class LensSizes:
    """What the cost of an iterative lens depends on besides the prompts: ``states`` decoded,
    ``orders`` read out (the jet's order is their maximum), the decoder's ``vocab`` and ``hidden``
    size, the parameters of the model's blocks (``forward_parameters``: its forward costs 2 FLOPs
    per parameter and token, the unembedding apart), and the dtype of the model's activations."""

    states: int
    orders: tuple[int, ...]
    vocab: int
    hidden: int
    forward_parameters: float = 0.0
    dtype: torch.dtype = torch.float32

    @classmethod
    def of(cls, prog: ResidualProgram, orders: Sequence[int] = (0, 1, 2), granularity: str | None = None,
           layers: Sequence[int] | None = None) -> LensSizes:
        """The sizes of ``prog``'s lens at ``orders`` (``granularity`` and ``layers`` as in
        :func:`iterative_lenses`)."""
        view = prog.at(granularity) if granularity else prog  # type: ignore[arg-type]
        states = len(view.units) + 1 if layers is None else len(_states(layers, len(view.units)))
        unembedding = prog.decoder.unembedding
        vocab, hidden = unembedding.shape if unembedding is not None else (1, 1)
        return cls(states, _orders(orders), int(vocab), int(hidden),
                   float(sum(u.num_parameters for u in prog.blocks)),
                   unembedding.dtype if unembedding is not None else torch.float32)

    def batch_bytes(self, batch: int, seq: int) -> float:
        """Peak memory of one padded [batch, seq] batch above the loaded model, an upper bound.

        The Taylor pass holds the jet's K+1 terms at every state, O = [states·(K+1), batch, seq,
        V], and builds them through one more buffer of that size (2·O); the partial sums are then
        made in place and the float64 metrics run one centre at a time. On top: 48 [batch, seq, V]
        float32 buffers for the metrics' temporaries, the model's logits and what the allocator
        keeps of them (measured: up to 39 on tiny models), and the forward's activations."""
        tokens = batch * seq
        slab = tokens * self.vocab * 4.0  # one [batch, seq, V] float32 buffer
        size = torch.empty((), dtype=self.dtype).element_size()
        terms = self.states * (max(self.orders) + 1) * tokens * self.vocab * size
        forward = 64.0 * tokens * self.hidden * 4 + 16.0 * batch * seq * seq * 4
        return 2 * terms + 48 * slab + forward

    def batch_work(self, batch: int, seq: int, k: int = 5) -> tuple[float, float, float]:
        """(matmul FLOPs, seconds per-logit work, fixed seconds) of one batch: the model's forward
        and the decoder's jet at every state (its unembedding dominates the FLOPs); per logit and
        state, the read-out of every order (finiteness and the float64 metrics, top-``k``) and the
        norm and partial sum of every jet term, at the costs timed here
        (:func:`_seconds_per_logit`, ×1.25 for buffers larger than the probe's); and ≈ 0.5 s of
        Python per batch (building the expansion and its schedule) plus a little per state and term."""
        tokens = batch * seq
        top = max(self.orders)
        flops = 2.0 * tokens * (self.forward_parameters + self.vocab * self.hidden)
        flops += 2.0 * tokens * self.states * (top + 1) * self.vocab * self.hidden
        read_out, term = _seconds_per_logit(k, self.vocab)
        logits = tokens * self.vocab * self.states
        seconds = 1.25 * logits * (len(self.orders) * read_out + (top + 1) * term)
        overhead = 0.5 + 0.002 * self.states * (top + 1) ** 2 + 0.005 * self.states * len(self.orders)
        return flops, seconds, overhead


def _orders(orders: Sequence[int]) -> tuple[int, ...]:
    checked = tuple(sorted({check_order(o, "lens order") for o in orders}))
    if not checked:
        raise ValueError("orders is empty: give at least one lens order, e.g. (0, 1, 2)")
    return checked


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Prompt indices in batches of ``batch_size``, prompts of similar length together."""
    by_length = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [by_length[i:i + batch_size] for i in range(0, len(lengths), batch_size)]


def lens_plan(sizes: LensSizes, lengths: Sequence[int], batch_size: int = DEFAULT_BATCH_SIZE,
              k: int = 5) -> Plan:
    """The cost of :func:`lens_over_prompts` on prompts of these token ``lengths`` in batches of
    ``batch_size``, before any work: time summed over the batches, peak memory (above the loaded
    model) of the largest batch. Both are meant as upper bounds (a test holds a measured run's
    time and peak RSS against 1.5× the plan). The per-logit work is expressed in the plan's
    ``elements`` as exp-like operations at this machine's elementwise rate."""
    if not lengths:
        raise ValueError("no prompts: give at least one")
    batches = _batches(lengths, batch_size)
    shapes = [(len(b), max(lengths[i] for i in b)) for b in batches]
    flops = per_logit = overhead = 0.0
    for batch, seq in shapes:
        f, e, o = sizes.batch_work(batch, seq, k)
        flops, per_logit, overhead = flops + f, per_logit + e, overhead + o
    peak = max(sizes.batch_bytes(batch, seq) for batch, seq in shapes)
    seconds = estimate_seconds(flops, 0.0, overhead, dtype=sizes.dtype) + per_logit
    elements = per_logit * elementwise_rate()
    return Plan(f"the order-{max(sizes.orders)} lens at {sizes.states} states over {len(lengths):,} prompts "
                f"({sum(lengths):,} tokens, vocabulary {sizes.vocab:,}) in {len(shapes)} batches of at most "
                f"{max(b for b, _ in shapes)}", len(lengths), "prompts", flops, peak, seconds,
                gemm_rate(sizes.dtype), elements)


def lens_batch_size(sizes: LensSizes, lengths: Sequence[int], budget: float | None = None,
                    most: int = DEFAULT_BATCH_SIZE) -> int:
    """The most prompts per batch, at most ``most``, whose planned peak stays within ``budget``
    bytes (None: :data:`MEMORY_FRACTION` of the memory available now; unknown: ``most``).
    Raises :class:`~jetgraph.errors.CostError` when the longest prompt alone does not fit."""
    if not isinstance(most, int) or most < 1:
        raise ValueError(f"batch_size must be a positive integer, got {most!r}")
    if budget is None:
        available = available_memory()
        if available is None:
            return most
        budget = MEMORY_FRACTION * available
    for batch_size in range(most, 0, -1):
        batches = _batches(lengths, batch_size)
        if max(sizes.batch_bytes(len(b), max(lengths[i] for i in b)) for b in batches) <= budget:
            return batch_size
    needed = sizes.batch_bytes(1, max(lengths))
    raise CostError(f"refusing the order-{max(sizes.orders)} lens at {sizes.states} states: one prompt of "
                    f"{max(lengths)} tokens needs ≈ {format_bytes(needed)}, more than the memory budget of "
                    f"{format_bytes(budget)}; shorten the prompts, decode fewer states or a lower order, "
                    "or raise max_memory")


def pad_batch(prompts: Sequence[Sequence[int] | torch.Tensor], side: str = "left", pad_id: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists of different lengths as one batch: (input_ids, attention_mask), [batch,
    longest], padded on ``side`` ("left" or "right") with ``pad_id`` (any id: pads are masked)."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    rows = [torch.as_tensor(p, dtype=torch.long).flatten() for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        where = slice(longest - len(row), longest) if side == "left" else slice(0, len(row))
        ids[i, where], mask[i, where] = row, 1
    return ids, mask


@torch.no_grad()
def lens_over_prompts(prog: ResidualProgram, prompts: Sequence[Sequence[int] | torch.Tensor],
                      orders: Sequence[int] = (0, 1, 2), *, k: int = 5, batch_size: int = DEFAULT_BATCH_SIZE,
                      granularity: str | None = None, layers: Sequence[int] | None = None,
                      side: str = "left", progress: bool = True,
                      max_seconds: float | None = DEFAULT_MAX_SECONDS,
                      max_memory: float | None = None) -> dict[int, LensAverage]:
    """The iterative lens over many prompts (token id lists of any lengths), in padded batches
    (prompts of similar length together), with a progress bar: per order, a :class:`LensAverage`
    whose table is each centre's metrics averaged over the prompts.

    The cost is planned first (:func:`lens_plan`). Batches hold at most ``batch_size`` prompts,
    fewer when the planned peak of a batch would pass ``max_memory`` bytes (None: half the
    memory available now, :data:`MEMORY_FRACTION`); a plan past ``max_seconds`` (None: no limit),
    or a longest prompt that alone passes the memory budget, is refused with the estimate before
    anything runs. Divergence is reported once per order over all prompts (one warning each for
    overflow and for diverging series), not per batch.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    rows = [torch.as_tensor(p, dtype=torch.long).flatten() for p in prompts]
    if not rows:
        raise ValueError("no prompts: give at least one")
    lengths = [len(r) for r in rows]
    sizes = LensSizes.of(prog, orders, granularity, layers)
    chosen = lens_batch_size(sizes, lengths, max_memory, batch_size)
    lens_plan(sizes, lengths, chosen, k).check(max_seconds, "max_seconds (None: no limit)",
                                            max_bytes=math.inf, memory_option="lower batch_size")
    batches = _batches(lengths, chosen)
    device = prog.decoder.unembedding.device if prog.decoder.unembedding is not None else None
    per_prompt: dict[int, dict[str, list[torch.Tensor]]] = {}
    diverged: dict[int, torch.Tensor] = {}
    divergent: dict[int, torch.Tensor] = {}
    labels: list[str] = []
    written: list[str] = []
    tokens = 0
    for batch in tqdm(batches, desc="lens over prompts", unit="batch", disable=not progress):
        ids, mask = pad_batch([rows[i] for i in batch], side)
        if device is not None:
            ids, mask = ids.to(device), mask.to(device)
        with warnings.catch_warnings():  # reported once over all prompts, below
            warnings.simplefilter("ignore", LensDivergenceWarning)
            results = iterative_lenses(prog, ids, orders, k, granularity, layers, attention_mask=mask)
        tokens += int(mask.sum())
        for order, result in results.items():
            labels, written = result.labels, result.written_by
            store = per_prompt.setdefault(order, {m: [] for m in METRICS})
            for name, value in result.prompt_metrics.items():
                store[name].append(value)
            for totals, counts in ((diverged, result.diverged_tokens), (divergent, result.divergent_tokens)):
                counts = counts.sum((1, 2))
                totals[order] = counts if order not in totals else totals[order] + counts
        del results, result  # the logits of this batch go before the next one is computed
    restore = torch.tensor(_batches(lengths, len(lengths))[0]).argsort()  # back to the given order
    averages = {order: LensAverage("iterative", order, labels, written, k,
                                   {m: torch.cat(v, 1)[:, restore] for m, v in per_prompt[order].items()},
                                   diverged[order], tokens, divergent[order])
                for order in sorted(per_prompt)}
    for average in averages.values():
        _warn_average(average)
    return averages


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


def _norms(values: torch.Tensor) -> torch.Tensor:
    """Float64 norms over the last dimension, summed in float32 where that cannot overflow (a
    float64 pass over the vocabulary costs 8× as much) and in float64 for the rest."""
    norms = torch.linalg.vector_norm(values, dim=-1, dtype=torch.float32).double()
    large = ~torch.isfinite(norms) | (norms > 1e18)
    if large.any():
        norms[large] = torch.linalg.vector_norm(values[large], dim=-1, dtype=torch.float64)
    return norms


@functools.lru_cache(maxsize=8)
def _seconds_per_logit(k: int, vocab: int) -> tuple[float, float]:
    """(seconds per logit and state of one order's read-out: finiteness and the float64 metrics;
    seconds per logit and state of one jet term: its norm and partial sum), timed here once per
    process on a [4, 16, min(V, 8192)] slab: the mean of two runs after a warm-up, so that the
    plan tracks what the metrics cost on this machine and under its load now."""
    from jetgraph.passes.metrics import logit_agreement

    generator = torch.Generator().manual_seed(0)
    shape = (4, 16, min(vocab, 8192))
    lens, true = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    terms = torch.randn((2, *shape), generator=generator)

    def timed(call) -> float:
        call()
        start = time.perf_counter()
        for _ in range(2):
            call()
        return (time.perf_counter() - start) / 2 / lens.numel()

    read_out = timed(lambda: (_not_finite(lens), logit_agreement(lens, true, k)))
    term = timed(lambda: (_norms(terms), terms[1].add_(terms[0]))) / 2
    return read_out, term


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
