"""Cost before work: what a sweep or enumeration will take, computed before it starts.

A :class:`Plan` counts the work items (contexts of an n-gram table, terms of an expansion), the
matmul FLOPs, the peak memory above the loaded model and the time this machine needs for them at
its measured rates (a GEMM and an elementwise pass timed once per process, ≈ 30 ms). Commands
print it with ``--dry-run`` and refuse, within a second and before allocating anything large,
when it is past a limit; the refusal names the estimate and the option that lifts the limit.
"""

from __future__ import annotations

import functools
import os
import time
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
    probe = _best_mm(256, dtype, repeats=2, device=device)
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
    return x.numel() / _best_time(lambda: torch.exp(x), 3, device)


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
                     dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> float:
    """Wall time of ``flops`` matmul FLOPs in ``dtype`` plus ``elements`` elementwise operations
    at the rates measured on ``device``, plus a fixed ``overhead`` (Python dispatch, in seconds)."""
    return flops / gemm_rate(dtype, device) + elements / elementwise_rate(device) + overhead


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
    seconds = estimate_seconds(flops, terms * tokens * width * 3.0, overhead=terms * 1e-3, dtype=dtype)
    return Plan(what, terms, "terms", flops, peak, seconds, gemm_rate(dtype))
