"""Cost before work: what a sweep or enumeration will take, computed before it starts.

A :class:`Plan` counts the work items (contexts of an n-gram table, terms of an expansion), the
matmul FLOPs, the peak memory above the loaded model and the time this machine needs for them at
its measured rates (a GEMM and an elementwise pass timed once per process, ≈ 30 ms). Commands
print it with ``--dry-run`` and refuse, within a second and before allocating anything large,
when it is past a limit; the refusal names the estimate and the option that lifts the limit.

A run of several phases (a pass that finds first tokens, then a table; a ranking, then
interventions) is a list of plans: :func:`format_plan` prints them, each phase under its own
label, with the total and whether ``--max-time`` will refuse it, and :func:`check_plan` refuses
it on the same terms. Plans are upper bounds: memory counts the buffers a phase really holds
(vocabulary-sized ones included), time the FLOPs, elementwise passes and small-op dispatches at
rates measured in this process.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from jetgraph.errors import CostError

DEFAULT_MAX_SECONDS = 3600.0


@dataclass(frozen=True)
class Plan:
    """The estimated cost of one job.

    ``items``: how many ``item_name`` it processes; ``flops``: matmul floating-point operations;
    ``peak_bytes``: memory it allocates at its peak on top of the loaded model; ``seconds``: the
    estimated wall time at ``gemm_rate`` FLOP/s (measured here) plus ``elements`` elementwise
    operations (reductions over the outputs).
    """

    what: str
    items: int
    item_name: str
    flops: float
    peak_bytes: float
    seconds: float
    gemm_rate: float
    elements: float = 0.0

    def seconds_at(self, flops_per_second: float, elements_per_second: float) -> float:
        """Wall time on another machine, from its sustained matmul and elementwise rates (a GPU's
        quoted dense throughput and memory bandwidth in elements, say): the FLOPs and elements
        of this plan at those rates."""
        if not flops_per_second > 0 or not elements_per_second > 0:
            raise ValueError("rates must be positive numbers")
        return self.flops / flops_per_second + self.elements / elements_per_second

    def describe(self) -> str:
        return (f"{self.what}: {format_count(self.items)} {self.item_name}, {format_flops(self.flops)}, "
                f"peak memory ≈ {format_bytes(self.peak_bytes)} above the model, "
                f"estimated {format_duration(self.seconds)} "
                f"(at {self.gemm_rate / 1e9:.3g} GFLOP/s measured here)")

    def check(self, max_seconds: float | None, option: str, max_bytes: float | None = None,
              memory_option: str | None = None) -> Plan:
        """Raise :class:`CostError` if the plan takes longer than ``max_seconds`` or more memory
        than ``max_bytes`` (default: the memory available now); ``None`` lifts a limit."""
        if max_seconds is not None and not max_seconds > 0:  # refuses nan, 0 and negatives
            raise ValueError(f"{option.split()[0]} must be a positive number of seconds or None, "
                             f"got {max_seconds!r}")
        if max_seconds is not None and self.seconds > max_seconds:
            raise CostError(f"refusing {self.describe()}: more than the limit of "
                            f"{format_duration(max_seconds)}; shrink the job or raise {option}")
        limit = available_memory() if max_bytes is None else max_bytes
        if limit is not None and self.peak_bytes > limit:
            raise CostError(f"refusing {self.describe()}: needs more memory than the "
                            f"{format_bytes(limit)} available; {memory_option or 'shrink the job'}")
        return self


def total_plan(phases: Sequence[Plan], what: str = "the whole run") -> Plan:
    """One plan for ``phases`` that run one after another and free their buffers in between: the
    items, FLOPs, elements and seconds summed, the peak memory the largest phase's."""
    if not phases:
        raise ValueError("a plan needs at least one phase")
    names = {p.item_name for p in phases}
    return Plan(what, sum(p.items for p in phases), names.pop() if len(names) == 1 else "work items",
                sum(p.flops for p in phases), max(p.peak_bytes for p in phases),
                sum(p.seconds for p in phases), phases[0].gemm_rate, sum(p.elements for p in phases))


def _labels(phases: Sequence[Plan]) -> list[str]:
    """Each phase's ``what``, a repeated one numbered ("…", "… (2)") so no two labels are equal."""
    seen: dict[str, int] = {}
    labels = []
    for plan in phases:
        seen[plan.what] = seen.get(plan.what, 0) + 1
        labels.append(plan.what if seen[plan.what] == 1 else f"{plan.what} ({seen[plan.what]})")
    while len(set(labels)) < len(labels):  # a numbered label that equals another phase's own
        labels = [f"{i}. {label}" for i, label in enumerate(labels, 1)]
    return labels


def format_plan(phases: Sequence[Plan], max_seconds: float | None, option: str = "--max-time",
                default: float | None = DEFAULT_MAX_SECONDS, max_bytes: float | None = None) -> str:
    """The plan of a run as text for ``--dry-run`` and before the work starts.

    One line per phase (every label distinct: a repeated one is numbered), then the total (time
    summed, peak memory the largest phase's, since phases run one after another), then whether
    ``option`` at ``max_seconds`` (said to be the default when it equals ``default``; None: no
    limit) and the memory available (``max_bytes``, default: available now) let it run or
    refuse it, as :func:`check_plan` will. Memory is counted above the loaded model; every
    figure is an upper bound.

    >>> print(format_plan([ranking, interventions], 3600))  # doctest: +SKIP
    plan (upper bounds; memory above the loaded model; matmuls at 180 GFLOP/s measured here):
      ranking 9 paths: 18,441 path rows, 2.49 GFLOP, peak ≈ 50.3 MB, ≈ 0.41 s
      interventions: 1.18e+05 token passes, 21.8 GFLOP, peak ≈ 120 MB, ≈ 3.1 s
      total: ≈ 3.51 s, peak ≈ 120 MB
      --max-time 1 h (the default) lets it run; 12.3 GB of memory available
    """
    total = total_plan(phases)
    rates = sorted({p.gemm_rate for p in phases}, reverse=True)
    lines = ["plan (upper bounds; memory above the loaded model; matmuls at "
             + " / ".join(f"{r / 1e9:.3g}" for r in rates) + " GFLOP/s measured here):"]
    for label, plan in zip(_labels(phases), phases, strict=True):
        lines.append(f"  {label}: {format_count(plan.items)} {plan.item_name}, {format_flops(plan.flops)}, "
                     f"peak ≈ {format_bytes(plan.peak_bytes)}, ≈ {format_duration(plan.seconds)}")
    lines.append(f"  total: ≈ {format_duration(total.seconds)}, peak ≈ {format_bytes(total.peak_bytes)}")
    limit = "" if max_seconds is None else format_duration(max_seconds)
    is_default = max_seconds == default
    said = f"{option} {limit or 'none'}" + (" (the default)" if is_default else "")
    if max_seconds is not None and total.seconds > max_seconds:
        verdict = (f"{said} refuses it (≈ {format_duration(total.seconds)} > {limit}): shrink the job, or "
                   f"raise {option}")
    else:
        verdict = f"{said} lets it run"
    memory = available_memory() if max_bytes is None else max_bytes
    if memory is not None:
        fits = total.peak_bytes <= memory
        verdict += (f"; {format_bytes(memory)} of memory available" if fits else
                    f"; refused for memory: needs more than the {format_bytes(memory)} available")
    lines.append(f"  {verdict}")
    return "\n".join(lines)


def check_plan(phases: Sequence[Plan], max_seconds: float | None, option: str = "--max-time",
               max_bytes: float | None = None, memory_option: str | None = None,
               what: str | None = None) -> Plan:
    """Refuse (:class:`CostError`) a run whose phases together take longer than ``max_seconds``
    or whose largest phase needs more memory than ``max_bytes`` (default: available now), as
    :func:`format_plan` says; returns the total plan, named ``what`` in the refusal (default:
    the phase's own name when there is one, else "the whole run")."""
    name = what or (phases[0].what if len(phases) == 1 else "the whole run")
    return total_plan(phases, name).check(max_seconds, option, max_bytes, memory_option)


def gemm_rate(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> float:
    """Matmul FLOP/s on ``device`` in ``dtype`` (best of five 1024³ products after a warm-up, in
    ``nn.Linear``'s layout: activations times a transposed [out, in] weight), measured once per
    dtype, device and process.

    16-bit GEMMs run from 2.5× faster than float32 (bfloat16 with AMX or AVX-512 BF16) to several
    times slower (float16 on CPUs without native support; in other layouts up to 40× slower
    still): a 256³ probe first measures a slow dtype in milliseconds, and only a fast one is
    timed at 1024³."""
    return _gemm_rate(dtype, torch.device(device))


@functools.lru_cache(maxsize=8)
def _gemm_rate(dtype: torch.dtype, device: torch.device) -> float:
    probe = _best_mm(256, dtype, repeats=10, device=device)  # best of ten: past another process's burst
    if probe < 1e10:  # under 10 GFLOP/s: a 1024³ product would take seconds
        return probe
    return _best_mm(4096 if device.type == "cuda" else 1024, dtype, repeats=5, device=device)


def _best_mm(size: int, dtype: torch.dtype, repeats: int, device: torch.device) -> float:
    a = torch.randn(size, size, dtype=dtype, device=device)
    weight = torch.randn(size, size, dtype=dtype, device=device)
    return 2 * size**3 / _best_time(lambda: torch.mm(a, weight.t()), repeats, device)


def _best_time(call, repeats: int, device: torch.device) -> float:
    call()  # warm the thread pool, the allocator (and the GPU's kernels)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def elementwise_rate(device: torch.device | str = "cpu") -> float:
    """Elements per second of one exp pass over a large float32 tensor on ``device``."""
    return _elementwise_rate(torch.device(device))


@functools.lru_cache(maxsize=4)
def _elementwise_rate(device: torch.device) -> float:
    x = torch.randn(1 << (26 if device.type == "cuda" else 22), device=device)
    return x.numel() / _best_time(lambda: torch.exp(x), 5, device)


def op_seconds(device: torch.device | str = "cpu") -> float:
    """Seconds one small op costs here: an add of 64k-element tensors (large enough to wake the
    intra-op threads, whose hand-offs are most of a small op's cost), the median of seven runs of
    40 (like :func:`gemm_rate`'s best-of, the machine's own speed rather than another process's
    burst), plus 15 µs of Python per FX node. Prices the many small ops of a tiny model's
    forward, which FLOPs do not see. Measured once per device and process."""
    return _op_seconds(torch.device(device)) + 15e-6


@functools.lru_cache(maxsize=4)
def _op_seconds(device: torch.device) -> float:
    x = torch.randn(1 << 16, device=device)

    def forty() -> None:
        for _ in range(40):
            x + x

    forty()  # warm the thread pool
    times = []
    for _ in range(7):
        times.append(_best_time(forty, 1, device) / 40)
    return sorted(times)[3]


def available_memory() -> float | None:
    """Bytes of memory available to new allocations now (``MemAvailable``), if known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def estimate_seconds(flops: float, elements: float = 0.0, overhead: float = 0.0,
                     dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                     ops: float = 0.0) -> float:
    """Wall time of ``flops`` matmul FLOPs in ``dtype`` plus ``elements`` elementwise operations
    at the rates measured on ``device``, plus a fixed ``overhead`` (in seconds) and ``ops`` small
    op dispatches at :func:`op_seconds`."""
    dispatch = ops * op_seconds(device) if ops else 0.0
    return flops / gemm_rate(dtype, device) + elements / elementwise_rate(device) + overhead + dispatch


def format_count(value: float) -> str:
    return f"{value:,.0f}" if value < 1e9 else f"{value:.2e}"


def format_flops(value: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g} FLOP"


def format_bytes(value: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} B"


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.3g} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.3g} h"
    return f"{seconds / 86400:.3g} days"


def expansion_plan(prog, terms: int, input_ids, order: int, what: str, space: str = "logits") -> Plan:
    """The cost of evaluating ``terms`` terms of ``prog`` on ``input_ids`` (``space``: "logits"
    for terms that end in the decoder, "stream" for stream-space terms).

    Each term applies a unit (and, in logit space, the decoder) to [batch, seq] tokens: about
    2·(mean unit parameters [+ V·d]) multiply-adds per token and Taylor order, and holds its
    [batch, seq, width] value (4 bytes per entry) until the terms are summed. An estimate:
    shared prefixes make it an upper bound at order 0.
    """
    tokens = int(input_ids.numel())
    unembedding = prog.decoder.unembedding
    vocab, hidden = (unembedding.shape if unembedding is not None else (1, 1))
    unit_params = sum(u.num_parameters for u in prog.units) / max(len(prog.units), 1)
    logits = space == "logits"
    width = vocab if logits else hidden
    flops = terms * tokens * 2.0 * (unit_params + (vocab * hidden if logits else 0)) * (order + 1)
    dtype = unembedding.dtype if unembedding is not None else torch.float32
    peak = terms * tokens * width * 4.0 * 2
    seconds = estimate_seconds(flops, terms * tokens * width * 3.0, overhead=terms * 1e-3, dtype=dtype,
                               ops=terms * _term_ops(prog))
    return Plan(what, terms, "terms", flops, peak, seconds, gemm_rate(dtype))


TRACE_SECONDS = 2.0  # make_fx's start-up, measured here
TRACE_SECONDS_PER_NODE = 0.01  # symbolic tracing of one op (3-12 ms measured here, under load)
TRACE_BYTES_PER_NODE = 20e3  # a traced node with its fake tensors and metadata


def _term_ops(prog) -> float:
    """Ops one term of ``prog`` dispatches, at most about: a mean unit's graph and the decoder's."""
    units = prog.units
    mean = sum(u.op_count for u in units) / max(len(units), 1)
    return mean + prog.decoder.op_count


def weight_bytes(prog) -> float:
    """Bytes of every parameter and buffer of ``prog``'s graphs, each shared tensor once."""
    return float(sum(_weights(prog).values()))


def _weights(prog) -> dict[int, int]:
    seen: dict[int, int] = {}
    for module in prog.graph_modules():
        for tensor in [*module.parameters(), *module.buffers()]:
            seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return seen


def emit_plan(prog, terms: int, input_ids, order: int, what: str, space: str = "logits",
              remainder: bool = True) -> list[Plan]:
    """The phases of emitting ``terms`` terms of ``prog`` as code (:func:`jetgraph.emit_source`):

    - tracing: every term's ops (and with ``remainder`` the model's forward twice, for the
      target) traced symbolically, :data:`TRACE_SECONDS_PER_NODE` each after
      :data:`TRACE_SECONDS` of start-up; the traced values are those of :func:`expansion_plan`;
    - writing the weights: the serialised copy of every weight the code holds (at most all of
      ``prog``'s), built in memory before it is written, beside the traced code.
    """
    values = expansion_plan(prog, terms, input_ids, order, what, space)
    forward = sum(u.op_count for u in prog.units) + prog.decoder.op_count
    nodes = terms * _term_ops(prog) + (2 * forward if remainder else 0)
    tracing = Plan(f"{what}: tracing", int(nodes), "traced ops", values.flops,
                   values.peak_bytes + nodes * TRACE_BYTES_PER_NODE,
                   values.seconds + TRACE_SECONDS + nodes * TRACE_SECONDS_PER_NODE, values.gemm_rate,
                   values.elements)
    size = weight_bytes(prog)
    held = nodes * TRACE_BYTES_PER_NODE  # the traced code lives on while its weights are written
    writing = Plan(f"{what}: writing the weights", len(_weights(prog)), "weight tensors", 0.0,
                   2 * size + held, estimate_seconds(0.0, 2 * size / 4), values.gemm_rate, 2 * size / 4)
    return [tracing, writing]
