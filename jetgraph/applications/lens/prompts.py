"""A lens over many prompts: sizes and a cost plan first, a batch size that fits a memory budget,
the prompts padded in batches and their metrics averaged."""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from jetgraph.applications.lens.compute import _norms, _states, iterative_lenses
from jetgraph.applications.lens.results import LensAverage, LensDivergenceWarning, _not_finite, _warn_average
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
from jetgraph.ir import ResidualProgram
from jetgraph.passes.metrics import METRICS
from jetgraph.taylor import check_order

DEFAULT_BATCH_SIZE = 8
MEMORY_FRACTION = 0.5  # default budget of lens_over_prompts: this share of the memory available


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
