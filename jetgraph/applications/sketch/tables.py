"""Reading the sketch's tables from a model: the default read-out's rows kept sparse, the pair
table when affordable, each planned first (:func:`plan_sketch`) and checkpointed (:func:`read_sketch`)."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from jetgraph.applications.ngrams.convention import input_convention
from jetgraph.applications.ngrams.readout import DEFAULT_READOUT, RowReader
from jetgraph.applications.sketch.evaluation import LOGIT_ENTRIES
from jetgraph.applications.sketch.model import LOOKUP_ENTRIES, SketchLM, SparseRows
from jetgraph.cost import Plan, available_memory, gemm_rate
from jetgraph.errors import CostError
from jetgraph.files import atomic_write
from jetgraph.ir import ResidualProgram

PLAN_ROWS = 1024
DEFAULT_BIGRAM_TOP = 128
TRIGRAM_MAX_BYTES = 2e9
CHECKPOINT_SECONDS = 60.0



# ---------------------------------------------------------------------- the read-out
# The only calls into jetgraph.applications.ngrams (readout, convention): the tables, the plan's
# timing and the reads it counts all go through these, so the read-out's input convention
# reaches every one of them.
Convention = object  # an InputConvention, a sequence of prefix ids, or None (the tokenizer's)


def _reader(prog: ResidualProgram, count: int | None, convention: Convention, chunk: int) -> RowReader:
    """The read-out the tables are made of: the model after each context, read after the
    convention's prefix and mixed over ``count`` first tokens it expects (None: the read-out's
    default; 0: the context alone, as for the trigram's pairs and the plan's timing)."""
    return RowReader(prog, DEFAULT_READOUT, count, convention=convention, chunk=chunk)


def _reads_per_row(vocab: int, count: int | None, convention: Convention) -> tuple[int, bool]:
    """Model reads per row of the read-out, and whether it mixes over expected first tokens
    (which are found by a pass of its own first); both known without computing anything."""
    from jetgraph.applications.ngrams.readout import placeholder_prefixes

    resolved = input_convention(convention, None, vocab)
    prefixes = placeholder_prefixes(vocab, resolved, count)
    if prefixes is None:
        return 1, False
    return len(prefixes), prefixes.length > len(resolved.prefix)


def reading_convention(convention: Convention, tokenizer: object) -> Convention:
    """``convention`` as given, else the tokenizer's (the tokens it puts before a text)."""

    return input_convention(convention, tokenizer)


# ---------------------------------------------------------------------- reading the tables


@dataclass(frozen=True)
class SketchPlan:
    """What reading the tables costs, as upper bounds at the rate measured here: seconds of each
    table (every read charged as a full pair row with its top-k selection), the tables' bytes,
    and ``peak_bytes``: the largest of the phases' peaks (:meth:`phases`), above the loaded
    model. ``trigram`` says whether it is read."""

    vocab: int
    bigram_top: int
    bigram_seconds: float
    bigram_bytes: int
    trigram_rows: int
    trigram_top: int
    trigram_seconds: float
    trigram_bytes: int
    trigram: bool
    peak_bytes: float
    reason: str = ""
    sampled_tokens: int = 0
    sampling_seconds: float = 0.0
    scored_tokens: int = 0
    scoring_seconds: float = 0.0
    chunk_bytes: float = 0.0  # working memory of reading one chunk of rows
    sampling_bytes: float = 0.0  # of sampling the text
    scoring_bytes: float = 0.0  # of scoring the test text
    reads: int = 0  # model reads of the bigram table (rows × prefixes, and the first tokens' pass)
    row_flops: float = 0.0  # matmul FLOPs of one row read
    token_flops: float = 0.0  # of one token through the model (sampling, scoring)
    gemm_rate: float = 1.0

    @property
    def seconds(self) -> float:
        return (self.bigram_seconds + self.sampling_seconds + self.scoring_seconds
                + (self.trigram_seconds if self.trigram else 0.0))

    @property
    def tables_bytes(self) -> float:
        return self.bigram_bytes + (self.trigram_bytes if self.trigram else 0)

    def phases(self) -> list[Plan]:
        """The run as :class:`jetgraph.cost.Plan` phases, one after another, for
        :func:`jetgraph.cost.format_plan` and :func:`jetgraph.cost.check_plan`: sampling the
        text (when sampled), the bigram table, the trigram table (when read), then fitting the
        weights, scoring the test text and writing the tables. Each phase's peak counts the
        tables read before it; writing holds a serialised copy of the tables."""
        from jetgraph.cost import format_count

        out = []
        if self.sampled_tokens:
            out.append(Plan(f"sampling the text (up to {format_count(self.sampled_tokens)} tokens)",
                            self.sampled_tokens, "sampled tokens", self.sampled_tokens * self.token_flops,
                            self.sampling_bytes, self.sampling_seconds, self.gemm_rate))
        bigram = f"bigram table, {format_count(self.vocab)} tokens × top {self.bigram_top}"
        out.append(Plan(bigram, self.reads, "row reads", self.reads * self.row_flops,
                        self.bigram_bytes + self.chunk_bytes, self.bigram_seconds, self.gemm_rate))
        if self.trigram:
            trigram = f"trigram table, {format_count(self.trigram_rows)} pairs × top {self.trigram_top}"
            out.append(Plan(trigram, self.trigram_rows, "pair rows", self.trigram_rows * self.row_flops,
                            self.tables_bytes + self.chunk_bytes, self.trigram_seconds, self.gemm_rate))
        out.append(Plan(f"fitting, scoring up to {format_count(self.scored_tokens)} test tokens, writing",
                        self.scored_tokens, "test tokens", self.scored_tokens * self.token_flops,
                        self.tables_bytes + max(self.scoring_bytes, self.tables_bytes), self.scoring_seconds,
                        self.gemm_rate))
        return out

    def skipped(self) -> str:
        """A line for the printed plan when the trigram table is not read ("" when it is)."""
        from jetgraph.cost import format_bytes, format_count, format_duration

        if self.trigram:
            return ""
        return (f"  trigram table skipped: {self.reason} ({format_count(self.trigram_rows)} pairs × top "
                f"{self.trigram_top} would take ≈ {format_duration(self.trigram_seconds)} and "
                f"{format_bytes(self.trigram_bytes)})")

    def describe(self) -> str:
        from jetgraph.cost import format_bytes, format_count, format_duration

        tri = (f"trigram: {format_count(self.trigram_rows)} pairs × top {self.trigram_top}, "
               f"~{format_duration(self.trigram_seconds)}, {format_bytes(self.trigram_bytes)}"
               + ("" if self.trigram else f" - skipped: {self.reason}"))
        sampling = (f"sampling up to {format_count(self.sampled_tokens)} tokens from the model, at most "
                    f"~{format_duration(self.sampling_seconds)}; " if self.sampled_tokens else "")
        scoring = (f"; scoring up to {format_count(self.scored_tokens)} test tokens with the model, "
                   f"~{format_duration(self.scoring_seconds)}" if self.scored_tokens else "")
        return (f"{sampling}bigram: {format_count(self.vocab)} tokens × top {self.bigram_top}, "
                f"~{format_duration(self.bigram_seconds)}, {format_bytes(self.bigram_bytes)}; "
                f"{tri}{scoring}; "
                f"total ≤ ~{format_duration(self.seconds)}, peak memory ≤ {format_bytes(self.peak_bytes)} "
                "above the model")


def plan_sketch(prog: ResidualProgram, first_tokens: int | None = None, trigram: str = "auto",
                top: int = 16, max_seconds: float | None = 900.0, max_bytes: float = TRIGRAM_MAX_BYTES,
                sampled_tokens: int = 0, seconds_per_sampled_token: float = 0.0, *,
                bigram_top: int = DEFAULT_BIGRAM_TOP, chunk: int = 1024, sample_batch: int = 64,
                sample_length: int = 256, max_memory: float | None = None,
                convention: Convention = None, scored_tokens: int = 0) -> SketchPlan:
    """Cost the tables before computing any (two chunks of pairs read and reduced here), and the
    sampling of ``sampled_tokens`` at ``seconds_per_sampled_token`` (timed by
    :func:`sampling_rate`, in batches of ``sample_batch`` texts of ``sample_length``).
    ``trigram``: ``"auto"`` reads it when it fits ``max_seconds`` and ``max_bytes``, ``"on"``
    refuses (:class:`CostError`) when it does not, ``"off"`` never reads it. Everything together
    past ``max_seconds``, or a peak past ``max_memory`` (default: the memory available now), is
    refused, naming the option that lifts it. ``scored_tokens``: tokens of test text the model
    itself scores, each charged as a pair row. ``first_tokens`` and ``convention``: as for
    :func:`read_sketch`."""
    from jetgraph.cost import format_bytes

    if trigram not in ("auto", "on", "off"):
        raise ValueError(f"trigram must be 'auto', 'on' or 'off', got {trigram!r}")
    if bigram_top < 1 or top < 1:
        raise ValueError(f"tokens kept per row must be at least 1, got {min(bigram_top, top)}")
    vocab = int(prog.decoder.unembedding.shape[0])
    bigram_top, top = min(bigram_top, vocab), min(top, vocab)
    pair_rows = vocab * vocab
    reader = _reader(prog, 0, convention, chunk)
    per_row = _seconds_per_row(reader, top, min(pair_rows, 2 * min(reader.chunk, PLAN_ROWS)))
    reads, mixes = _reads_per_row(vocab, first_tokens, convention)
    bigram_seconds = per_row * vocab * (reads + mixes)  # finding the first tokens: at most V rows
    bigram_bytes = vocab * (bigram_top * 12 + 16)  # int32 ids, float64 probabilities; unigram, column sums
    seconds = per_row * pair_rows
    memory = pair_rows * top * 8  # int32 ids, float32 probabilities
    reason = ""
    if trigram == "off":
        reason = 'trigram="off"'
    elif max_seconds is not None and seconds > max_seconds:
        reason = f"estimated {seconds:,.0f} s, more than the {max_seconds:,.0f} s allowed"
    elif memory > max_bytes:
        reason = f"needs {memory / 1e9:.1f} GB, more than {max_bytes / 1e9:.1f} GB"
    if reason and trigram == "on":
        raise CostError(f"refusing the trigram table of {pair_rows:,} pairs: {reason}; use trigram=\"auto\" "
                        "or trigram=\"off\", or raise max_seconds")
    chunk_bytes = _chunk_bytes(prog, reader.chunk)
    sampling_bytes = _sampling_bytes(prog, sample_batch, sample_length) if sampled_tokens else 0.0
    scoring_bytes = _scoring_bytes(prog, bigram_top, top)
    row_flops, token_flops = _flops(prog, reader.first_tokens.length + 2 if reader.first_tokens else 2)
    plan = SketchPlan(vocab, bigram_top, bigram_seconds, bigram_bytes, pair_rows, top, seconds, memory,
                      not reason, 0.0, reason, sampled_tokens, sampled_tokens * seconds_per_sampled_token,
                      scored_tokens, scored_tokens * per_row, chunk_bytes, sampling_bytes, scoring_bytes,
                      vocab * (reads + mixes), row_flops, token_flops, gemm_rate())
    plan = dataclasses.replace(plan, peak_bytes=max(p.peak_bytes for p in plan.phases()))
    peak = plan.peak_bytes
    if max_seconds is not None and plan.seconds > max_seconds:
        raise CostError(f"refusing the sketch: {plan.describe()}; more than the {max_seconds:,.0f} s allowed "
                        "(fewer samples, fewer first_tokens, trigram=\"off\", or raise max_seconds)")
    limit = available_memory() if max_memory is None else max_memory
    if limit is not None and peak > limit:
        raise CostError(f"refusing the sketch: {plan.describe()}; more than the {format_bytes(limit)} of "
                        f"memory available (lower bigram_top from {bigram_top}, or trigram=\"off\")")
    return plan


@torch.no_grad()
def read_sketch(prog: ResidualProgram, first_tokens: int | None = None,
                plan: SketchPlan | None = None, top: int = 16, chunk: int = 1024, progress: bool = True,
                resume: str | Path | None = None, bigram_top: int = DEFAULT_BIGRAM_TOP,
                convention: Convention = None) -> SketchLM:
    """The tables of the sketch LM, read from ``prog`` in chunks of rows (the trigram only when
    ``plan`` says so): each bigram row's top tokens, each trigram row's, as many as ``plan``
    says (without a plan: ``bigram_top``, no trigram), and the unigram from the exact rows.
    ``convention``: the tokens put before every context (an ``InputConvention`` or ids; see
    :mod:`jetgraph.applications.ngrams.convention`); ``first_tokens``: how many tokens the model
    expects first each bigram row is mixed over (None: none after a prefix, 16 without one).
    ``resume``: a folder for the sweeps' checkpoints (``bigram.ckpt``, ``trigram.ckpt``; an
    interrupted run continues)."""
    plan = plan or plan_sketch(prog, first_tokens, "off", top, max_seconds=None, bigram_top=bigram_top,
                               chunk=chunk, max_memory=math.inf, convention=convention)
    vocab = int(prog.decoder.unembedding.shape[0])
    folder = Path(resume) if resume is not None else None
    reader = _reader(prog, first_tokens, convention, chunk)
    bigram, columns = _sweep(reader, lambda start, end: torch.arange(start, end)[:, None], vocab,
                             plan.bigram_top, torch.float64, columns=True, progress=progress,
                             desc="bigram rows", checkpoint=folder / "bigram.ckpt" if folder else None)
    unigram = columns / vocab  # every token equally likely as the context
    trigram = None
    if plan.trigram:
        pairs = _reader(prog, 0, convention, chunk)
        trigram, _ = _sweep(pairs, lambda start, end: _pair_contexts(vocab, start, end), vocab * vocab,
                            plan.trigram_top, torch.float32, columns=False, progress=progress,
                            desc="trigram pairs", checkpoint=folder / "trigram.ckpt" if folder else None)
    return SketchLM(unigram, bigram, trigram, (0.0, 0.9, 0.1), list(reader.first))


def _keep_top(log_probs: torch.Tensor, top: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``top`` most probable tokens (ascending ids, int32) and their probabilities."""
    values, index = log_probs.topk(top, -1)
    index, order = index.sort(-1)
    return index.int(), values.gather(-1, order).exp().to(dtype)


def _sweep(reader: Callable[[torch.Tensor], torch.Tensor], contexts: Callable[[int, int], torch.Tensor],
           rows: int, top: int, dtype: torch.dtype, *, columns: bool, progress: bool, desc: str,
           checkpoint: Path | None = None) -> tuple[SparseRows, torch.Tensor | None]:
    """Read ``rows`` contexts (``contexts(start, end)``) in the reader's chunks, keeping each row's
    top ``top`` tokens, and (``columns``) the sum of the exact rows. Memory: the kept rows and one
    chunk. ``checkpoint``: a file written at most every minute and when interrupted; a run
    with the same reader, rows and ``top`` continues from it."""
    from tqdm.auto import tqdm

    vocab = int(reader.vocab)
    top = min(top, vocab)
    key = {"rows": rows, "top": top, "vocab": vocab, "dtype": str(dtype), "reader": reader.describe()}
    state = _load_checkpoint(checkpoint, key)
    if state is None:
        state = {"key": key, "done": 0, "index": torch.zeros(rows, top, dtype=torch.int32),
                 "prob": torch.zeros(rows, top, dtype=dtype),
                 "columns": torch.zeros(vocab if columns else 0, dtype=torch.double)}
    step = int(reader.chunk)
    begun, saved = state["done"], time.monotonic()
    try:
        for start in tqdm(range(begun, rows, step), desc=desc, disable=not progress, leave=False):
            end = min(start + step, rows)
            log_probs = reader(contexts(start, end))
            state["index"][start:end], state["prob"][start:end] = _keep_top(log_probs, top, dtype)
            if columns:
                state["columns"] += log_probs.exp_().sum(0)  # in place: no second [chunk, V] tensor
            state["done"] = end
            if checkpoint is not None and time.monotonic() - saved > CHECKPOINT_SECONDS:
                _save_checkpoint(checkpoint, state)
                saved = time.monotonic()
    except BaseException:
        if checkpoint is not None and state["done"] > begun:
            _save_checkpoint(checkpoint, state)
        raise
    return SparseRows(state["index"], state["prob"]), state["columns"] if columns else None


def _save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda temporary: torch.save(state, temporary))


def _load_checkpoint(path: Path | None, key: dict) -> dict | None:
    """The sweep's saved state when ``path`` holds one for the same ``key``, else None."""
    if path is None or not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception:  # a damaged or foreign file: start over (it is overwritten)
        return None
    return state if isinstance(state, dict) and state.get("key") == key else None


def _seconds_per_row(reader: RowReader, top: int, rows: int) -> float:
    """Seconds per pair row, read and reduced to its top tokens, timed here on the second of two
    chunks (the first warms up), so the estimate is this machine's, under its present load."""
    vocab = int(reader.vocab)
    half = max(1, rows // 2)
    _keep_top(reader(_pair_contexts(vocab, 0, half)), min(top, vocab), torch.float64)
    start = time.perf_counter()
    log_probs = reader(_pair_contexts(vocab, half, max(rows, half + 1)))
    _keep_top(log_probs, min(top, vocab), torch.float64)
    log_probs.exp_().sum(0)
    return (time.perf_counter() - start) / max(1, rows - half)


def _dims(prog: ResidualProgram) -> tuple[int, int, int, int]:
    """Vocabulary, hidden width, residual units and the largest unit's parameters."""
    vocab, hidden = prog.decoder.unembedding.shape
    return int(vocab), int(hidden), len(prog.units), max((u.num_parameters for u in prog.units), default=0)


def _flops(prog: ResidualProgram, positions: int) -> tuple[float, float]:
    """Matmul FLOPs of one row read (every unit at ``positions`` tokens: the prefix, a first
    token and the context; the decoder at the last) and of one token through the model (every
    unit and the decoder)."""
    vocab, hidden, _, _ = _dims(prog)
    units = 2.0 * sum(u.num_parameters for u in prog.units)
    return units * positions + 2.0 * vocab * hidden, units + 2.0 * vocab * hidden


def _chunk_bytes(prog: ResidualProgram, rows: int, positions: int = 3) -> float:
    """Bound on the working memory of one chunk of ``rows`` contexts of up to ``positions``
    tokens (a BOS, a first token, the context): six float64 [rows, V] tensors (the read-out,
    its mixture, softmax, exp and top-k), float32 logits at every position, and activations of
    width unit parameters / hidden + 8·hidden, twice."""
    vocab, hidden, _, params = _dims(prog)
    return rows * vocab * (6 * 8 + positions * 4) + rows * positions * (params / hidden + 8 * hidden) * 4 * 2


def _sampling_bytes(prog: ResidualProgram, batch: int, length: int) -> float:
    """Bound on sampling's working memory: a key-value cache of hidden width per unit (twice, as
    the cache grows by copies) and a few float32 [batch, V] logits."""
    vocab, hidden, units, _ = _dims(prog)
    return 2 * units * batch * length * hidden * 4 * 2 + batch * vocab * 4 * 4


def _scoring_bytes(prog: ResidualProgram, bigram_top: int, trigram_top: int) -> float:
    """Bound on scoring's working memory: the model's own log-probabilities (float32 logits, two
    float64 copies of a batch of ``LOGIT_ENTRIES``), the sparse look-ups (ids, probabilities,
    positions and hits of ``LOOKUP_ENTRIES`` kept entries, three times for the trigram's), and
    the back-off scales."""
    vocab, *_ = _dims(prog)
    return max(LOGIT_ENTRIES * 20, LOOKUP_ENTRIES * 40 * 3) + vocab * bigram_top * 8


def _pair_contexts(vocab: int, start: int, end: int) -> torch.Tensor:
    """Rows start..end of the pair grid (a, b), row a·V + b."""
    rows = torch.arange(start, end)
    return torch.stack([rows // vocab, rows % vocab], 1)
