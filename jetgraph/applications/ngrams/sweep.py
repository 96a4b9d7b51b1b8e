"""Streaming an n-gram table: one path evaluated on every context in chunks, reduced to a
global top-k (ties ordered deterministically), per-row top tokens, normalisers, keyword logits
and a per-last-token summary, with the cost planned first, checkpoints, and the chunks shared
out over the ranks of torch.distributed when the run has several (:mod:`.shard`)."""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from jetgraph.applications.ngrams.contexts import Contexts
from jetgraph.applications.ngrams.evaluator import PathEvaluator, evaluate_path, path_schedule
from jetgraph.applications.ngrams.mixture import MIXTURE_BYTES_PER_ENTRY, FirstTokens, MixtureEvaluator
from jetgraph.applications.ngrams.query import NgramQuery, RunOptions, TableJob, split_options
from jetgraph.applications.ngrams.reader import PathReader, path_reader
from jetgraph.applications.ngrams.shard import Shard, ShardError, chunk_share, current_shard
from jetgraph.applications.ngrams.state import (
    LastTokenTop,
    RowPool,
    TableState,
    TopEntries,
)
from jetgraph.applications.ngrams.table import NgramTable
from jetgraph.cost import Plan, estimate_seconds, gemm_rate
from jetgraph.ir import ResidualProgram, ResidualUnit
from jetgraph.passes.pathspec import PathSpec
from jetgraph.passes.terms import Term

__all__ = ["NgramQuery", "RunOptions", "evaluate_path", "full_table", "ngram_plan", "ngram_table",
           "path_schedule"]



def _query_and_run(prog_or_none, query, run, legacy: dict[str, object], caller: str
                   ) -> tuple[NgramQuery, RunOptions]:
    """``(query, run)`` as given, or built from 0.7-style keywords (the path, then options)."""
    if isinstance(query, NgramQuery):
        if legacy:
            raise TypeError(f"{caller}() got keyword option(s) {sorted(legacy)} beside an NgramQuery: put "
                            "them in the query (query.replace(...)) or in RunOptions")
        return query, run if run is not None else RunOptions()
    if run is not None and not isinstance(run, RunOptions):
        raise TypeError(f"{caller}()'s third argument is a RunOptions, got {type(run).__name__}")
    built, built_run = split_options(query, legacy, caller)
    return built, run if run is not None else built_run


def ngram_plan(prog: ResidualProgram, query: NgramQuery | str | PathSpec | Term,
               run: RunOptions | None = None, *, ranks: int = 1, **options: object) -> Plan:
    """What :func:`ngram_table` of ``query`` run with ``run`` will cost (contexts, FLOPs, peak
    memory above the model, time here), from one evaluated context: nothing of table size is
    allocated. ``ranks``: the time is one rank's share when the table is split over that many
    processes. (0.7 form, still accepted: ``ngram_plan(prog, path, top=…, chunk=…)``.)"""
    query, run = _query_and_run(prog, query, run, options, "ngram_plan")
    job = query.bind(prog, run.chunk)
    return _plan(job, job.evaluator(), ranks)


def _groups(job: TableJob, rows: int) -> int:
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


def _plan(job: TableJob, evaluator: PathEvaluator, ranks: int = 1) -> Plan:
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
def ngram_table(prog: ResidualProgram, query: NgramQuery | str | PathSpec | Term,
                run: RunOptions | None = None, **options: object) -> NgramTable:
    """Evaluate one path (unit weights: its own logits) on every row of ``query``
    (:class:`NgramQuery`: every token, or every token pair for paths through attention, the
    first token restricted to ``sources``, or given ``contexts``) in chunks, keeping its global
    top entries and the per-row results it asks for. A path from the model's stream read after
    ``first_tokens`` gives each row the log of the probability mixture over them (the default
    read-out, :mod:`.readout`).

    ``run`` (:class:`RunOptions`): chunking, checkpoints (a run of the same query with the same
    ``resume`` continues), progress, the time limit and sharding. Under ``torchrun`` the table
    is split over the ranks of torch.distributed (:mod:`.shard`; rank r > 0 checkpoints to
    ``NAME.rank{r}.pt`` beside ``resume``, and a run resumes with any world size). Every rank
    returns the same global and per-last-token top entries; the per-row results are gathered
    on rank 0 only. A rank that fails stops the others with :class:`ShardError` within
    ``stall_seconds`` at most.

    The cost is planned first (:func:`ngram_plan`): a table estimated to take longer than
    ``max_seconds`` or more memory than is available is refused before any work.
    (0.7 form, still accepted: ``ngram_table(prog, path, top=…, sources=…, chunk=…)``; an
    unknown keyword is refused by name.)
    """
    query, run = _query_and_run(prog, query, run, options, "ngram_table")
    job = query.bind(prog, run.chunk)
    shard = current_shard(run.stall_seconds) if run.shard == "auto" else run.shard
    with _failures_told(shard):
        return _sweep(job, shard, run.resume, run.progress, run.max_seconds, run.checkpoint_seconds)


@contextlib.contextmanager
def _failures_told(shard: Shard | None):
    """Post this rank's error for the others (they stop instead of waiting for it), then raise."""
    try:
        yield
    except BaseException as exc:
        if shard is not None and not isinstance(exc, ShardError):
            shard.fail(f"{type(exc).__name__}: {exc}")
        raise


def _sweep(job: TableJob, shard: Shard | None, resume, progress: bool, max_seconds: float | None,
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

    def start(self, key: str, job: TableJob) -> TableState:
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


def _merged(state: TableState, job: TableJob, shard: Shard, prefix: str) -> TableState:
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


def _table(state: TableState, job: TableJob) -> NgramTable:
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
        first_tokens=None if job.mixture is None else FirstTokens.of(job.mixture[0], job.mixture[1].tolist()),
    )


def _row_shapes(job: TableJob) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
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


def _reduce(state: TableState, job: TableJob, index: int, logits: torch.Tensor,
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
def full_table(prog: ResidualProgram, path: str | PathSpec | Term,
               contexts: torch.Tensor | Contexts | None = None, chunk: int = 1024,
               max_entries: int = 50_000_000) -> torch.Tensor:
    """The whole [contexts, vocab] logit table (only when asked: refuses more than ``max_entries``
    before computing anything), read through the path's :class:`~.reader.PathReader`."""
    reader = path_reader(prog, path) if not isinstance(path, Term) else PathReader(prog, path)
    rows = (Contexts.grid(reader.vocab, reader.length or 1) if contexts is None
            else Contexts.of(contexts, reader.length or 1, reader.vocab, reader.whole_context))
    if len(rows) * reader.vocab > max_entries:
        raise ValueError(f"the full table has {len(rows) * reader.vocab:,} entries, more than max_entries "
                         f"{max_entries:,}: stream it with ngram_table instead")
    parts = [reader.logits(rows.rows(i, min(i + chunk, len(rows)))) for i in range(0, len(rows), chunk)]
    return torch.cat(parts) if parts else torch.empty(0, reader.vocab)
