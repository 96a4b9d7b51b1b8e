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
from tqdm.auto import tqdm

from jetgraph.codegen import BatchedRun, plan
from jetgraph.cost import DEFAULT_MAX_SECONDS, Plan, expansion_plan
from jetgraph.files import atomic_write
from jetgraph.ir import ENCODER_NAME, ResidualProgram, as_input_ids
from jetgraph.passes.expansion import Expansion
from jetgraph.passes.metrics import METRICS, masked_mean, per_token_agreement
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
    relative remainder ‖true − lens‖/‖true‖. ``prompt_metrics`` are [centres, batch]: each
    prompt's mean over its positions; :meth:`table` averages them over the prompts.

    Padding: ``attention_mask`` ([batch, seq], 1 = token, 0 = padding; None: no padding) keeps
    pad positions out of every average and count.

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
    attention_mask: torch.Tensor | None = None  # [batch, seq]: 1 = token, 0 = padding

    def __post_init__(self) -> None:
        diverged = self.diverged
        if diverged.any():
            states, positions = int(diverged.any(-1).sum()), int(diverged.sum())
            warnings.warn(
                f"order {self.order} {self.kind} lens: the jet diverges at {states} of {len(self.labels)} "
                f"states ({positions} of {diverged.numel()} state-positions have non-finite logits): "
                "their metrics are NaN; use a lower order", LensDivergenceWarning, stacklevel=3)

    @functools.cached_property
    def real(self) -> torch.Tensor:
        """[batch, seq] bool: the positions that hold tokens (all, without an attention mask)."""
        if self.attention_mask is None:
            return torch.ones(self.logits.shape[1:3], dtype=torch.bool)
        return self.attention_mask.bool().cpu()

    @functools.cached_property
    def diverged_tokens(self) -> torch.Tensor:
        """[centres, batch, seq] bool: real tokens whose lens logits are not all finite."""
        return ~torch.isfinite(self.logits).all(-1).cpu() & self.real

    @functools.cached_property
    def diverged(self) -> torch.Tensor:
        """[centres, seq] bool: True where the lens logits of some batch element's token are not
        all finite."""
        return self.diverged_tokens.any(1)

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

    def table(self) -> list[dict[str, float | str]]:
        """One row per centre: every metric's mean over the prompts (see :func:`metric_table`)."""
        return metric_table(self.labels, self.written_by, self.prompt_metrics)

    def divergence(self) -> list[int]:
        """Per centre: how many tokens diverged over all prompts."""
        return self.diverged_tokens.tolist()

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
    token diverged), ``positions`` (the tokens averaged over, padding excluded) and ``diverged``
    (how many of them have non-finite logits). The joint lens contributes one row, center
    "Σ weighted centres"."""
    rows: list[dict[str, float | int | str]] = []
    for result in results:
        for row, diverged in zip(result.table(), result.divergence(), strict=True):
            rows.append({"lens": result.kind, "order": result.order, **row, "positions": result.positions,
                         "diverged": diverged})
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
    labels = [c.name for c in centers]
    written = [ENCODER_NAME if i == 0 else view.units[i - 1].name for i in states]
    padding = mask if attention_mask is not None else None
    return {order: LensResult("iterative", order, labels, per_degree[:, : order + 1].sum(1), true_logits, k,
                              written_by=written, attention_mask=padding) for order in orders}


@torch.no_grad()
def iterative_lens(prog: ResidualProgram, input_ids: torch.Tensor, order: int = 0, k: int = 5,
                   granularity: str | None = None, layers: Sequence[int] | None = None, *,
                   attention_mask: torch.Tensor | None = None) -> LensResult:
    """The order-``order`` jet of the decoder at every stream state h_0..h_L, evaluated at h_L
    (:func:`iterative_lenses` for one order; the same arguments)."""
    return iterative_lenses(prog, input_ids, (order,), k, granularity, layers,
                            attention_mask=attention_mask)[order]


def lens_plan(prog: ResidualProgram, shapes: Sequence[tuple[int, int]], centers: int, order: int) -> Plan:
    """The cost of the iterative lens at ``centers`` states and ``order`` on padded batches of the
    given [batch, seq] ``shapes``: time summed over the batches, memory of the largest."""
    plans = [expansion_plan(prog, centers * (order + 1), torch.empty(shape, device="meta"), order,
                            "lens") for shape in shapes]
    largest = max(plans, key=lambda p: p.peak_bytes)
    return Plan(f"the order-{order} lens at {centers} states over {sum(b for b, _ in shapes):,} prompts "
                f"in {len(shapes)} batches", sum(p.items for p in plans), "terms",
                sum(p.flops for p in plans), largest.peak_bytes, sum(p.seconds for p in plans),
                largest.gemm_rate)


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
                      orders: Sequence[int] = (0, 1, 2), *, k: int = 5, batch_size: int = 8,
                      granularity: str | None = None, layers: Sequence[int] | None = None,
                      side: str = "left", progress: bool = True,
                      max_seconds: float | None = DEFAULT_MAX_SECONDS) -> dict[int, LensAverage]:
    """The iterative lens over many prompts (token id lists of any lengths), in padded batches of
    ``batch_size`` (prompts of similar length together), with a progress bar: per order, a
    :class:`LensAverage` whose table is each centre's metrics averaged over the prompts.

    The cost is planned first (:func:`lens_plan`): past ``max_seconds`` (None: no limit) or the
    memory available for one batch it is refused with the estimate before anything runs.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    rows = [torch.as_tensor(p, dtype=torch.long).flatten() for p in prompts]
    if not rows:
        raise ValueError("no prompts: give at least one")
    by_length = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    batches = [by_length[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    view = prog.at(granularity) if granularity else prog  # type: ignore[arg-type]
    centers = len(view.units) + 1 if layers is None else len(_states(layers, len(view.units)))
    shapes = [(len(batch), len(rows[batch[-1]])) for batch in batches]
    lens_plan(view, shapes, centers, max(orders, default=0)).check(
        max_seconds, "max_seconds (None: no limit)", memory_option="lower batch_size")
    device = prog.decoder.unembedding.device if prog.decoder.unembedding is not None else None
    per_prompt: dict[int, dict[str, list[torch.Tensor]]] = {}
    diverged: dict[int, torch.Tensor] = {}
    meta: dict[int, LensResult] = {}
    tokens = 0
    for batch in tqdm(batches, desc="lens over prompts", unit="batch", disable=not progress):
        ids, mask = pad_batch([rows[i] for i in batch], side)
        if device is not None:
            ids, mask = ids.to(device), mask.to(device)
        results = iterative_lenses(prog, ids, orders, k, granularity, layers, attention_mask=mask)
        tokens += int(mask.sum())
        for order, result in results.items():
            meta[order] = result
            store = per_prompt.setdefault(order, {m: [] for m in METRICS})
            for name, value in result.prompt_metrics.items():
                store[name].append(value)
            counts = result.diverged_tokens.sum((1, 2))
            diverged[order] = counts if order not in diverged else diverged[order] + counts
    restore = torch.tensor(by_length).argsort()  # back to the order the prompts were given
    return {order: LensAverage("iterative", order, meta[order].labels, meta[order].written_by, k,
                               {m: torch.cat(v, 1)[:, restore] for m, v in per_prompt[order].items()},
                               diverged[order], tokens)
            for order in sorted(per_prompt)}


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
