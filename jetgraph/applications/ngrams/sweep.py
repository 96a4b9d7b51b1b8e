"""Streaming an n-gram table: one path evaluated on every context in chunks, reduced to a
global top-k (ties ordered deterministically), per-row top tokens, normalisers, keyword logits
and a per-last-token summary, with the cost planned first, checkpoints, and the chunks shared
out over the ranks of torch.distributed when the run has several (:mod:`.shard`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from jetgraph.applications.ngrams.contexts import Contexts
from jetgraph.applications.ngrams.evaluator import PathEvaluator, evaluate_path, path_schedule
from jetgraph.applications.ngrams.mixture import MIXTURE_BYTES_PER_ENTRY, MixtureEvaluator
from jetgraph.applications.ngrams.shard import (
    DEFAULT_STALL_SECONDS,
    Shard,
    ShardError,
    chunk_share,
    current_shard,
)
from jetgraph.applications.ngrams.state import (
    CHECKPOINT_FORMAT,
    LastTokenTop,
    RowPool,
    TableState,
    TopEntries,
)
from jetgraph.applications.ngrams.table import NgramTable, Rank
from jetgraph.cost import DEFAULT_MAX_SECONDS, Plan, estimate_seconds, gemm_rate
from jetgraph.ir import ResidualProgram, ResidualUnit
from jetgraph.passes.paths import context_length, path_term, reads_whole_context, view_of_term
from jetgraph.passes.terms import Term

__all__ = ["evaluate_path", "full_table", "ngram_plan", "ngram_table", "path_schedule"]

DEFAULT_CHECKPOINT_SECONDS = 60.0
Average = tuple[Sequence[Sequence[int] | int], Sequence[float]]  # prefixes (or first tokens), weights
PROBE_ROWS = 8


@dataclass
class _Job:
    """One table's parsed arguments: the path, its contexts and reductions."""

    term: Term
    view: ResidualProgram
    vocab: int
    contexts: Contexts
    keywords: list[int] | None
    normalise: bool
    top: int
    row_top: int
    last_top: int
    rank: Rank
    chunk: int
    average: tuple[torch.Tensor, torch.Tensor] | None = None  # [prefixes, length] ids and their weights

    @property
    def chunks(self) -> int:
        return math.ceil(len(self.contexts) / self.chunk)

    def chunk_rows(self, index: int) -> tuple[int, int]:
        return index * self.chunk, min((index + 1) * self.chunk, len(self.contexts))

    def evaluator(self) -> PathEvaluator | MixtureEvaluator:
        rows = self.contexts
        if rows.explicit is not None:
            tokens = torch.unique(rows.explicit)
        else:
            parts = [rows.first] + ([rows.second] if rows.second is not None else [])
            tokens = torch.unique(torch.cat(parts))
        if self.average is None:
            return PathEvaluator(self.view, self.term, rows.length, tokens, self.vocab)
        first, weights = self.average
        tokens = torch.unique(torch.cat([tokens, first.flatten()]))
        inner = PathEvaluator(self.view, self.term, rows.length + first.shape[1], tokens, self.vocab)
        return MixtureEvaluator(inner, first, weights)

    def probe(self) -> torch.Tensor:
        """A few of the table's own contexts, spread over it."""
        count = len(self.contexts)
        picks = sorted({int(i) for i in torch.linspace(0, max(count - 1, 0), min(PROBE_ROWS, count))})
        return torch.cat([self.contexts.rows(i, i + 1) for i in picks]) if picks else self.contexts.rows(0, 0)

    def key(self) -> str:
        digest = hashlib.sha256()
        digest.update(json.dumps([CHECKPOINT_FORMAT, self.term.name, self.top, self.row_top, self.last_top,
                                  self.normalise, self.keywords, self.chunk, self.rank,
                                  self.contexts.length]).encode())
        if self.average is not None:
            digest.update(self.average[0].numpy().tobytes() + self.average[1].double().numpy().tobytes())
        self.contexts.fingerprint(digest)
        return digest.hexdigest()


def _job(prog: ResidualProgram, path: str | Term, order: int | None, contexts, first, top: int,
         row_top: int, last_top: int, keywords, normalise: bool, rank: Rank, chunk: int,
         average: Average | None = None) -> _Job:
    """Validate every argument before any work (cheap: no tensors of table size)."""
    if not isinstance(top, int) or not isinstance(chunk, int) or top < 1 or chunk < 1:
        raise ValueError(f"top and chunk must be ints >= 1, got top={top!r}, chunk={chunk!r}")
    for name, value in (("row_top", row_top), ("last_top", last_top)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if rank not in ("logit", "prob"):
        raise ValueError(f"rank must be 'logit' or 'prob', got {rank!r}")
    term = path_term(prog, path, order)
    view = view_of_term(prog, term)
    if view.decoder.unembedding is None:
        raise ValueError("the decoder has no affine readout: cannot size the vocabulary")
    vocab = int(view.decoder.unembedding.shape[0])
    length = context_length(term)
    if contexts is not None and first is not None:
        raise ValueError("give contexts or first, not both")
    any_length = reads_whole_context(term)
    rows = (Contexts.grid(vocab, length, first) if contexts is None
            else Contexts.of(contexts, length, vocab, any_length))
    if keywords is not None:
        keywords = sorted({int(k) for k in keywords})
        if not keywords:
            raise ValueError("the keyword list is empty: give at least one token id")
        if keywords[0] < 0 or keywords[-1] >= vocab:
            raise ValueError(f"keyword token ids must lie in [0, {vocab})")
        normalise = True
    normalise = normalise or rank == "prob"
    mixture = None
    if average is not None:
        if not reads_whole_context(term):
            raise ValueError("average mixes contexts of a path from the model's stream (h_last→U); "
                             f"{term.name} reads exactly its own tokens")
        sequences = [[p] if isinstance(p, int) else list(p) for p in average[0]]
        if not sequences or len({len(s) for s in sequences}) != 1 or not sequences[0]:
            raise ValueError("average's prefixes must be token sequences of one length >= 1, at least one")
        first_ids = torch.as_tensor(sequences, dtype=torch.long)
        if first_ids.min() < 0 or first_ids.max() >= vocab:
            raise ValueError(f"average's token ids must lie in [0, {vocab})")
        mixture = (first_ids, torch.as_tensor(list(average[1]), dtype=torch.double))
    return _Job(term, view, vocab, rows, keywords, normalise, top, row_top, last_top, rank, chunk, mixture)


def ngram_plan(prog: ResidualProgram, path: str | Term, *, order: int | None = None,
               contexts: torch.Tensor | Contexts | None = None, first: Sequence[int] | None = None,
               top: int = 100, row_top: int = 0, last_top: int = 0, keywords: Sequence[int] | None = None,
               normalise: bool = False, rank: Rank = "logit", chunk: int = 1024, ranks: int = 1,
               average: Average | None = None) -> Plan:
    """What :func:`ngram_table` with these arguments will cost (contexts, FLOPs, peak memory above
    the model, time here), from one evaluated context: nothing of table size is allocated.
    ``ranks``: the time is one rank's share when the table is split over that many processes."""
    job = _job(prog, path, order, contexts, first, top, row_top, last_top, keywords, normalise, rank, chunk,
               average)
    return _plan(job, job.evaluator(), ranks)


def _groups(job: _Job, rows: int) -> int:
    """How many runs of contexts with the same earlier tokens ``rows`` of the table's contexts
    form, chunk by chunk (what a split position-mixing unit computes its earlier positions for)."""
    contexts, chunks = job.contexts, math.ceil(rows / job.chunk)
    if contexts.length < 2:
        return rows
    if contexts.explicit is not None:
        prefix = contexts.explicit[:, :-1]
        runs = 1 + int((prefix[1:] != prefix[:-1]).any(1).sum()) if len(prefix) else 0
        return min(rows, math.ceil(runs * rows / max(len(prefix), 1)) + chunks)
    return min(rows, math.ceil(rows / len(contexts.second)) + chunks)


def _plan(job: _Job, evaluator: PathEvaluator, ranks: int = 1) -> Plan:
    rows, vocab = len(job.contexts), job.vocab
    mine = math.ceil(rows / max(ranks, 1))
    flops = evaluator.flops(mine, _groups(job, mine))
    width = min(job.chunk, max(rows, 1))
    chunk_tensors = 3 if job.normalise else 2  # logits, exp pass / candidates
    per_row = (8 if job.normalise else 0) + 4 * len(job.keywords or ()) + 12 * job.row_top
    summary = 16 * vocab * job.last_top * (2 if job.last_top else 0)
    mixes = isinstance(evaluator, MixtureEvaluator) and len(evaluator.first) > 1
    mixture = MIXTURE_BYTES_PER_ENTRY if mixes else 0
    peak = (width * vocab * (4 * chunk_tensors + mixture) + rows * per_row + 16 * job.top * 3 + summary
            + evaluator.shared_bytes)
    elements = mine * vocab * (4 if job.normalise else 2)
    dtype = job.view.decoder.unembedding.dtype  # a 16-bit GEMM may be far faster or slower
    device = job.view.decoder.unembedding.device
    seconds = estimate_seconds(flops, elements, overhead=2e-3 * math.ceil(mine / job.chunk), dtype=dtype,
                               device=device)
    what = f"n-gram table {job.term.name}" + (f", per rank of {ranks}" if ranks > 1 else "")
    return Plan(what, rows, "contexts", flops, peak, seconds, gemm_rate(dtype, device), elements)


@torch.no_grad()
def ngram_table(
    prog: ResidualProgram,
    path: str | Term,
    *,
    order: int | None = None,
    contexts: torch.Tensor | Contexts | None = None,
    first: Sequence[int] | None = None,
    top: int = 100,
    row_top: int = 0,
    last_top: int = 0,
    keywords: Sequence[int] | None = None,
    normalise: bool = False,
    rank: Rank = "logit",
    chunk: int = 1024,
    resume: str | Path | None = None,
    progress: bool = True,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    shard: Shard | str | None = "auto",
    checkpoint_seconds: float = DEFAULT_CHECKPOINT_SECONDS,
    stall_seconds: float = DEFAULT_STALL_SECONDS,
    average: Average | None = None,
) -> NgramTable:
    """Evaluate one path (unit weights: its own logits) on every context — every token, or every
    token pair for paths through attention, the first token restricted to ``first`` if given,
    or the rows of ``contexts`` — in chunks, keeping the global top-``top``.

    ``row_top``: also keep each row's top tokens. ``last_top``: for each last context token
    (z2 of a pair), keep the ``last_top`` best (context → next) entries of the rows ending in
    it. ``keywords``: token ids whose probability mass each row puts on them is recorded
    (implies ``normalise``). ``normalise``: keep each row's normaliser, so probabilities can be
    reported. ``rank``: order the top entries by ``"logit"`` (the paper's tables; one pass less)
    or by conditional probability ``"prob"`` (implies ``normalise``).

    ``average``: (prefixes, weights) for a path from the model's stream: each prefix is a token
    sequence (all of one length; a bare int is a one-token prefix), each row's next-token
    distribution is the weighted mean over ``s ⊕ context`` of the prefixes s, and its logits are
    that mixture's log-probabilities (the default read-out, :mod:`.readout`: a BOS alone, or
    BOS and the expected first tokens, or the first tokens alone).

    ``resume``: a checkpoint file, written at most every ``checkpoint_seconds``, when the run
    stops (an error or Ctrl-C) and at the end; a run with the same arguments continues from it.
    ``shard``: ``"auto"`` splits the table over the ranks of torch.distributed when this process
    runs under ``torchrun`` (see :mod:`.shard`; rank r > 0 checkpoints to ``NAME.rank{r}.pt``
    beside ``resume``, and a run resumes with any world size); a :class:`Shard`; or None for
    one process. Every rank returns the same global and per-last-token top entries; the per-row
    results are gathered on rank 0 only. A rank that fails stops the others with
    :class:`ShardError` within ``stall_seconds`` at most.

    The cost is planned first (:func:`ngram_plan`): a table estimated to take longer than
    ``max_seconds`` (None: no limit) or more memory than is available is refused before any work.
    """
    job = _job(prog, path, order, contexts, first, top, row_top, last_top, keywords, normalise, rank, chunk,
               average)
    if shard == "auto":
        shard = current_shard(stall_seconds)
    elif shard is not None and not isinstance(shard, Shard):
        raise ValueError(f"shard must be 'auto', a Shard or None, got {shard!r}")
    with _failures_told(shard):
        return _sweep(job, shard, resume, progress, max_seconds, checkpoint_seconds)


@contextlib.contextmanager
def _failures_told(shard: Shard | None):
    """Post this rank's error for the others (they stop instead of waiting for it), then raise."""
    try:
        yield
    except BaseException as exc:
        if shard is not None and not isinstance(exc, ShardError):
            shard.fail(f"{type(exc).__name__}: {exc}")
        raise


def _sweep(job: _Job, shard: Shard | None, resume, progress: bool, max_seconds: float | None,
           checkpoint_seconds: float) -> NgramTable:
    world = shard.world if shard else 1
    evaluator = job.evaluator()
    _plan(job, evaluator, world).check(max_seconds, "max_seconds (None: no limit)",
                                       memory_option="lower chunk, or keep fewer per-row results "
                                                     "(keywords, row_top)")
    evaluator.verify(job.probe())
    checkpoints = _Checkpoints(Path(resume) if resume else None, shard)
    state = checkpoints.start(job.key(), job)
    prefix = shard.session() if shard else ""
    done = set().union(*(shard.all_gather(state.done, "the chunks already done") if shard else [state.done]))
    todo = [c for c in range(job.chunks) if c not in done]
    mine = chunk_share(todo, shard.rank, world) if shard else todo
    device = evaluator.device
    keyword_index = torch.tensor(job.keywords, device=device) if job.keywords else None
    units = [unit for unit in job.term.units() if isinstance(unit, ResidualUnit)]
    label = f"n-grams {job.term.name}" + (f" (rank {shard.rank}/{world})" if shard else "")
    bar = tqdm(total=len(mine), unit="chunk", desc=label, leave=False,
               disable=not progress or (shard is not None and not shard.is_main))
    pool = RowPool(sum(job.chunk_rows(c)[1] - job.chunk_rows(c)[0] for c in mine), _row_shapes(job))
    saved = time.monotonic()
    try:
        with job.view.resident(units):  # a model read lazily loads the path's units only
            for index in mine:
                start, end = job.chunk_rows(index)
                logits = evaluate_chunk(evaluator, job.contexts.rows(start, end))
                _reduce(state, job, index, logits, keyword_index, pool)
                if shard:
                    shard.beat(prefix)
                if time.monotonic() - saved >= checkpoint_seconds:
                    checkpoints.save(state)
                    saved = time.monotonic()
                bar.update(1)
    except BaseException:
        checkpoints.save(state)
        raise
    finally:
        bar.close()
    checkpoints.save(state)
    if shard and world > 1:
        state = _merged(state, job, shard, prefix)
    return _table(state, job)


def evaluate_chunk(evaluator: PathEvaluator, ids: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] last-position logits of one chunk of contexts."""
    return evaluator(ids)


class _Checkpoints:
    """Rank r's checkpoint file, and the absorption of any earlier run's files into it.

    Files are ``resume`` (rank 0) and ``NAME.rank{r}.SUFFIX`` (rank r). Starting, rank r of W
    absorbs every existing file i with i mod W == r and writes the union to its own file
    before deleting the absorbed ones, so a run resumes with any world size and a crash in
    between leaves duplicates, which merging ignores.
    """

    def __init__(self, resume: Path | None, shard: Shard | None) -> None:
        self.resume, self.shard = resume, shard
        self.rank, self.world = (shard.rank, shard.world) if shard else (0, 1)
        self.own = None if resume is None else rank_file(resume, self.rank)

    def start(self, key: str, job: _Job) -> TableState:
        state = TableState(key, last=LastTokenTop.empty(job.vocab, job.last_top) if job.last_top else None)
        if self.resume is None:
            return state
        mine = {i: p for i, p in rank_files(self.resume).items() if i % self.world == self.rank}
        if mine:
            state.absorb([TableState.load(p, key) for p in mine.values()], job.top)
            others = [p for p in mine.values() if p != self.own]
            if others:
                self.save(state)
                for path in others:
                    path.unlink(missing_ok=True)
        return state

    def save(self, state: TableState) -> None:
        if self.own is not None:
            state.save(self.own)


def rank_file(resume: Path, rank: int) -> Path:
    """Where rank ``rank`` keeps its checkpoint of the table checkpointed at ``resume``."""
    return resume if rank == 0 else resume.with_name(f"{resume.stem}.rank{rank}{resume.suffix}")


def rank_files(resume: Path) -> dict[int, Path]:
    """Every existing checkpoint file of ``resume``, by the rank that wrote it."""
    files = {0: resume} if resume.is_file() else {}
    for path in resume.parent.glob(f"{resume.stem}.rank*{resume.suffix}"):
        number = path.name[len(resume.stem) + len(".rank"):len(path.name) - len(resume.suffix)]
        if number.isdigit():
            files[int(number)] = path
    return files


def _merged(state: TableState, job: _Job, shard: Shard, prefix: str) -> TableState:
    """Every rank's reductions merged: top entries on every rank, per-row results on rank 0."""
    shard.wait_for_all(prefix, "the merge")
    tops = shard.all_gather(state.top, "the global top-k")
    lasts = shard.all_gather(state.last, "the per-last-token summaries") if state.last is not None else None
    rows = shard.gather_to_main((state.done, state.packed_rows()), "the per-row results")
    merged = TableState(state.key, TopEntries().merged(tops, job.top))
    if lasts is not None:
        merged.last = lasts[0].merged(lasts[1:])
    if rows is not None:
        for done, packed in rows:
            merged.done |= done
            merged.rows.update(TableState.unpacked_rows(*packed))
    return merged


def _table(state: TableState, job: _Job) -> NgramTable:
    rows = state.joined_rows(job.chunks) if state.done else {}  # rank > 0: per-row results are on rank 0
    last = state.last
    return NgramTable(
        job.term.name, job.contexts, state.top.values, state.top.index, job.vocab,
        top_logits=state.top.logits,
        row_values=rows.get("row_values"), row_index=rows.get("row_index"),
        row_max=rows.get("row_max"), log_sum=rows.get("log_sum"),
        keyword_logits=rows.get("keyword_logits"),
        keywords=job.keywords or [], rank=job.rank,
        last_values=None if last is None else last.values,
        last_logits=None if last is None else last.logits,
        last_index=None if last is None else last.index,
        average=None if job.average is None else (job.average[0].tolist(), job.average[1].tolist()),
    )


def _row_shapes(job: _Job) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The per-row fields this table keeps: trailing shape and dtype."""
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    if job.row_top:
        top = min(job.row_top, job.vocab)
        shapes["row_values"], shapes["row_index"] = ((top,), torch.float32), ((top,), torch.long)
    if job.normalise:
        shapes["row_max"] = shapes["log_sum"] = ((), torch.float32)
        if job.keywords:
            shapes["keyword_logits"] = ((len(job.keywords),), torch.float32)
    return shapes


def _reduce(state: TableState, job: _Job, index: int, logits: torch.Tensor,
            keyword_index: torch.Tensor | None, pool: RowPool) -> None:
    """Fold one chunk's [rows, vocab] logits into ``state``."""
    offset = job.chunk_rows(index)[0]
    vocab = logits.shape[-1]
    logits = logits.float()
    if job.normalise:  # the argmax is excluded from the sum; max() with indices costs 3x amax()
        row_max, argmax = logits.max(-1)
        log_sum = _log_sum(logits, row_max, argmax)
    else:
        row_max, log_sum = logits.amax(-1), None
    by_prob = job.rank == "prob"
    row_best = -log_sum if by_prob else row_max
    top = state.top
    threshold = top.values[-1] if len(top) >= job.top else None
    values, raw, flat = _chunk_top(logits, row_best, job.top, threshold,
                                   (row_max, log_sum) if by_prob else None)
    candidates = TopEntries(values.cpu(), raw.cpu(), flat.cpu() + offset * vocab)
    state.top = top.merged([candidates], job.top)
    per_row: dict[str, torch.Tensor] = {}
    if job.row_top:
        v, i = logits.topk(min(job.row_top, vocab), -1)
        per_row["row_values"], per_row["row_index"] = v.cpu(), i.cpu()
    if log_sum is not None:
        per_row["row_max"], per_row["log_sum"] = row_max.cpu(), log_sum.cpu()
        if keyword_index is not None:
            per_row["keyword_logits"] = logits.index_select(-1, keyword_index).cpu()
    if state.last is not None:
        m = min(job.last_top, vocab)
        raw, token = logits.topk(m, -1)
        value = raw if not by_prob else (raw - row_max[:, None]) - log_sum[:, None]
        rows = torch.arange(offset, offset + len(logits), device=logits.device)
        flat = rows[:, None] * vocab + token
        last = job.contexts.rows(offset, offset + len(logits))[:, -1]
        state.last.add(last, value.cpu(), raw.cpu(), flat.cpu())
    state.rows[index] = pool.put(per_row)
    state.done.add(index)


def _log_sum(logits: torch.Tensor, row_max: torch.Tensor, argmax: torch.Tensor) -> torch.Tensor:
    """log Σ_j exp(l_j − max) per row, as log1p of the sum over all entries but one maximum.

    Written so, a row whose top entry holds almost all the mass keeps its tiny remainder (log p of
    the top entry is −log1p(s), exact for s far below float32's 1e−7), and no large logit is
    subtracted from a large normaliser. exp() of arguments far below −88 takes a slow CPU path;
    they are clamped at −80, which adds at most V·e^−80 ≈ 1e−30 to the sum.
    """
    shifted = (logits - row_max.unsqueeze(-1)).clamp_(min=-80.0).exp_()
    shifted.scatter_(-1, argmax.unsqueeze(-1), 0.0)
    return shifted.sum(-1).log1p_()


def _chunk_top(logits: torch.Tensor, row_best: torch.Tensor, top: int, threshold: torch.Tensor | None,
               shift: tuple[torch.Tensor, torch.Tensor] | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every entry of the chunk that can be in the global top (ranking value, logit, flat index),
    ties at the cut included, reading the big table only twice.

    The chunk's top-``top`` entries lie in the rows whose best value is at least the ``top``-th
    largest row best (those rows hold ``top`` distinct entries at least that large), so one pass
    over the row maxima picks the candidate rows; rows whose best is below the running global
    threshold cannot enter. ``shift = (row_max, log_sum)`` ranks log-probabilities
    ``(logit − row_max) − log_sum`` instead of logits.
    """
    vocab = logits.shape[-1]
    cut = row_best.topk(min(top, row_best.numel())).values[-1]
    if threshold is not None:
        cut = torch.maximum(cut, threshold.to(cut.device))
    rows = (row_best >= cut).nonzero().squeeze(1)
    raw = logits.index_select(0, rows)
    value = raw if shift is None else (raw - shift[0][rows, None]) - shift[1][rows, None]
    if value.numel() == 0:
        empty = logits.new_empty(0)
        return empty, empty, torch.empty(0, dtype=torch.long, device=logits.device)
    kth = value.reshape(-1).topk(min(top, value.numel())).values[-1]
    if threshold is not None:
        kth = torch.maximum(kth, threshold.to(kth.device))
    hit_row, hit_token = (value >= kth).nonzero(as_tuple=True)
    return value[hit_row, hit_token], raw[hit_row, hit_token], rows[hit_row] * vocab + hit_token


@torch.no_grad()
def full_table(prog: ResidualProgram, path: str | Term, contexts: torch.Tensor | Contexts | None = None,
               chunk: int = 1024, max_entries: int = 50_000_000) -> torch.Tensor:
    """The whole [contexts, vocab] logit table (only when asked: refuses more than ``max_entries``
    before computing anything)."""
    term = path_term(prog, path)
    view = view_of_term(prog, term)
    vocab = int(view.decoder.unembedding.shape[0])
    length = context_length(term)
    rows = (Contexts.grid(vocab, length) if contexts is None
            else Contexts.of(contexts, length, vocab, reads_whole_context(term)))
    if len(rows) * vocab > max_entries:
        raise ValueError(f"the full table has {len(rows) * vocab:,} entries, more than max_entries "
                         f"{max_entries:,}: stream it with ngram_table instead")
    schedule = path_schedule(view, term)
    device = view.decoder.unembedding.device
    parts = [evaluate_path(schedule, rows.rows(i, min(i + chunk, len(rows))).to(device)).cpu()
             for i in range(0, len(rows), chunk)]
    return torch.cat(parts)
