"""Streaming an n-gram table: one path evaluated on every context in chunks through the batched
evaluator, reduced to a global top-k (ties ordered deterministically), per-row top tokens,
normalisers and keyword logits, with the cost planned first and a checkpoint after every chunk."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from jetgraph.applications.ngrams.contexts import Contexts
from jetgraph.applications.ngrams.table import NgramTable, Rank
from jetgraph.codegen import BatchedRun, Schedule, plan
from jetgraph.cost import DEFAULT_MAX_SECONDS, Plan, estimate_seconds, gemm_rate
from jetgraph.files import atomic_write
from jetgraph.ir import ResidualProgram, ResidualUnit
from jetgraph.passes.expansion import Expansion
from jetgraph.passes.paths import context_length, path_term, view_of_term
from jetgraph.passes.terms import Term


@dataclass
class _Job:
    """One table's parsed arguments: the path's schedule, its contexts and reductions."""

    term: Term
    view: ResidualProgram
    vocab: int
    contexts: Contexts
    keywords: list[int] | None
    normalise: bool
    top: int
    row_top: int
    rank: Rank
    chunk: int


def _job(prog: ResidualProgram, path: str | Term, order: int | None, contexts, first, top: int,
         row_top: int, keywords, normalise: bool, rank: Rank, chunk: int) -> _Job:
    """Validate every argument before any work (cheap: no tensors of table size)."""
    if not isinstance(top, int) or not isinstance(chunk, int) or top < 1 or chunk < 1:
        raise ValueError(f"top and chunk must be ints >= 1, got top={top!r}, chunk={chunk!r}")
    if not isinstance(row_top, int) or row_top < 0:
        raise ValueError(f"row_top must be an int >= 0, got {row_top!r}")
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
    rows = Contexts.grid(vocab, length, first) if contexts is None else Contexts.of(contexts, length, vocab)
    if keywords is not None:
        keywords = sorted({int(k) for k in keywords})
        if not keywords:
            raise ValueError("the keyword list is empty: give at least one token id")
        if keywords[0] < 0 or keywords[-1] >= vocab:
            raise ValueError(f"keyword token ids must lie in [0, {vocab})")
        normalise = True
    normalise = normalise or rank == "prob"
    return _Job(term, view, vocab, rows, keywords, normalise, top, row_top, rank, chunk)


def ngram_plan(prog: ResidualProgram, path: str | Term, *, order: int | None = None,
               contexts: torch.Tensor | Contexts | None = None, first: Sequence[int] | None = None,
               top: int = 100, row_top: int = 0, keywords: Sequence[int] | None = None,
               normalise: bool = False, rank: Rank = "logit", chunk: int = 1024) -> Plan:
    """What :func:`ngram_table` with these arguments will cost (contexts, FLOPs, peak memory above
    the model, time here), from one evaluated context: nothing of table size is allocated."""
    return _plan(_job(prog, path, order, contexts, first, top, row_top, keywords, normalise, rank, chunk))


def _plan(job: _Job) -> Plan:
    from torch.utils.flop_counter import FlopCounterMode

    schedule = path_schedule(job.view, job.term)
    device = job.view.decoder.unembedding.device
    probe = torch.zeros(1, job.contexts.length, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter:
        BatchedRun(schedule, probe).run(remainder=False)
    rows, vocab = len(job.contexts), job.vocab
    width = min(job.chunk, max(rows, 1))
    chunk_tensors = 3 if job.normalise else 2  # logits, exp pass / candidates
    per_row = (8 if job.normalise else 0) + 4 * len(job.keywords or ()) + 12 * job.row_top
    peak = width * vocab * 4 * chunk_tensors + rows * per_row + 16 * job.top * 3
    elements = rows * vocab * (4 if job.normalise else 2)
    dtype = job.view.decoder.unembedding.dtype  # a 16-bit GEMM may be far faster or slower
    seconds = estimate_seconds(counter.get_total_flops() * rows, elements,
                               overhead=2e-3 * math.ceil(rows / job.chunk), dtype=dtype)
    return Plan(f"n-gram table {job.term.name}", rows, "contexts", counter.get_total_flops() * rows,
                peak, seconds, gemm_rate(dtype))


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
    keywords: Sequence[int] | None = None,
    normalise: bool = False,
    rank: Rank = "logit",
    chunk: int = 1024,
    resume: str | Path | None = None,
    progress: bool = True,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
) -> NgramTable:
    """Evaluate one path (unit weights: its own logits) on every context — every token, or every
    token pair for paths through attention, the first token restricted to ``first`` if given,
    or the rows of ``contexts`` — in chunks, keeping the global top-``top``.

    ``row_top``: also keep each row's top tokens. ``keywords``: token ids whose probability mass
    each row puts on them is recorded (implies ``normalise``). ``normalise``: keep each row's
    normaliser, so probabilities can be reported. ``rank``: order the global top-k by ``"logit"``
    (the paper's tables; one pass less) or by conditional probability ``"prob"`` (implies
    ``normalise``; a next token that is large in every row no longer fills the table).
    ``resume``: a checkpoint file written after every chunk; an interrupted call with the same
    arguments continues from it. The cost is planned first (:func:`ngram_plan`): a table
    estimated to take longer than ``max_seconds`` (None: no limit) or more memory than is
    available is refused before any work, with the estimate.
    """
    job = _job(prog, path, order, contexts, first, top, row_top, keywords, normalise, rank, chunk)
    _plan(job).check(max_seconds, "max_seconds (None: no limit)",
                     memory_option="lower chunk, or keep fewer per-row results (keywords, row_top)")
    schedule = path_schedule(job.view, job.term)
    device = job.view.decoder.unembedding.device
    state = _State.start(job, resume)
    rows = len(job.contexts)
    bar = tqdm(total=rows, initial=state.done, unit="ctx", desc=f"n-grams {job.term.name}",
               disable=not progress, leave=False)
    keyword_index = torch.tensor(job.keywords, device=device) if job.keywords else None
    units = [unit for unit in job.term.units() if isinstance(unit, ResidualUnit)]
    with job.view.resident(units):  # a model read lazily loads the path's units only
        while state.done < rows:
            start, end = state.done, min(state.done + chunk, rows)
            logits = evaluate_path(schedule, job.contexts.rows(start, end).to(device))
            state.add(logits, start, keyword_index)
            state.done = end
            state.save()
            bar.update(end - start)
    bar.close()
    return state.table(job)



def path_schedule(view: ResidualProgram, term: Term) -> Schedule:
    """The batched plan of one logit-space path term."""
    return plan(Expansion(view, len(view.units), [term], term.order))


def evaluate_path(schedule: Schedule, ids: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] logits of the single path term at the last position."""
    outputs, _, _ = BatchedRun(schedule, ids).run(remainder=False)
    return outputs[0, :, -1, :]


_CHECKPOINT_FORMAT = 2


@dataclass
class _State:
    """Streaming reductions, and their checkpoint."""

    key: str
    top: int
    row_top: int
    normalise: bool
    resume: Path | None
    rank: Rank = "logit"
    done: int = 0
    values: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    logits: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    index: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    row_values: list[torch.Tensor] = field(default_factory=list)
    row_index: list[torch.Tensor] = field(default_factory=list)
    row_max: list[torch.Tensor] = field(default_factory=list)
    log_sum: list[torch.Tensor] = field(default_factory=list)
    keyword_logits: list[torch.Tensor] = field(default_factory=list)  # per chunk

    @classmethod
    def start(cls, job: _Job, resume: str | Path | None) -> _State:
        digest = hashlib.sha256()
        digest.update(json.dumps([_CHECKPOINT_FORMAT, job.term.name, job.top, job.row_top, job.normalise,
                                  job.keywords, job.chunk, job.rank, job.contexts.length]).encode())
        job.contexts.fingerprint(digest)
        state = cls(digest.hexdigest(), job.top, job.row_top, job.normalise,
                    Path(resume) if resume else None, job.rank)
        if state.resume is not None and state.resume.is_file():
            try:
                saved = torch.load(state.resume, weights_only=False)
            except Exception as exc:  # a truncated or foreign file
                raise ValueError(f"checkpoint {state.resume} cannot be read ({type(exc).__name__}): "
                                 "delete it to start again") from exc
            if not isinstance(saved, dict) or saved.get("key") != state.key:
                raise ValueError(f"checkpoint {state.resume} belongs to another table (different path, "
                                 "contexts or options): delete it or choose another file")
            state.__dict__.update({k: v for k, v in saved.items() if k != "key"})
        return state

    def add(self, logits: torch.Tensor, offset: int, keyword_index: torch.Tensor | None) -> None:
        vocab = logits.shape[-1]
        logits = logits.float()
        if self.normalise:  # the argmax is excluded from the sum; max() with indices costs 3x amax()
            row_max, argmax = logits.max(-1)
            log_sum = _log_sum(logits, row_max, argmax)
        else:
            row_max, log_sum = logits.amax(-1), None
        by_prob = self.rank == "prob"
        row_best = -log_sum if by_prob else row_max
        threshold = self.values[-1] if len(self.values) >= self.top else None
        values, raw, flat = _chunk_top(logits, row_best, self.top, threshold,
                                       (row_max, log_sum) if by_prob else None)
        values = torch.cat([self.values, values.cpu()])
        raw = torch.cat([self.logits, raw.cpu()])
        flat = torch.cat([self.index, flat.cpu() + offset * vocab])
        keep = _ranking(values, raw, flat)[: self.top]
        self.values, self.logits, self.index = values[keep], raw[keep], flat[keep]
        if self.row_top:
            v, i = logits.topk(min(self.row_top, vocab), -1)
            self.row_values.append(v.cpu())
            self.row_index.append(i.cpu())
        if log_sum is not None:
            self.row_max.append(row_max.cpu())
            self.log_sum.append(log_sum.cpu())
            if keyword_index is not None:
                self.keyword_logits.append(logits.index_select(-1, keyword_index).cpu())

    def save(self) -> None:
        if self.resume is None:
            return
        payload = {k: v for k, v in self.__dict__.items() if k != "resume"}
        atomic_write(self.resume, lambda name: torch.save(payload, name))

    def table(self, job: _Job) -> NgramTable:
        def joined(parts: list[torch.Tensor]) -> torch.Tensor | None:
            return torch.cat(parts) if parts else None

        return NgramTable(
            job.term.name, job.contexts, self.values, self.index, job.vocab,
            top_logits=self.logits,
            row_values=joined(self.row_values), row_index=joined(self.row_index),
            row_max=joined(self.row_max), log_sum=joined(self.log_sum),
            keyword_logits=joined(self.keyword_logits),
            keywords=job.keywords or [], rank=self.rank,
        )


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


def _ranking(values: torch.Tensor, logits: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """The permutation that orders entries by value, then logit (both descending), then flat
    index (context row, then next token id, ascending): deterministic under ties."""
    order = torch.argsort(flat)
    order = order[torch.argsort(logits[order], descending=True, stable=True)]
    return order[torch.argsort(values[order], descending=True, stable=True)]


@torch.no_grad()
def full_table(prog: ResidualProgram, path: str | Term, contexts: torch.Tensor | Contexts | None = None,
               chunk: int = 1024, max_entries: int = 50_000_000) -> torch.Tensor:
    """The whole [contexts, vocab] logit table (only when asked: refuses more than ``max_entries``
    before computing anything)."""
    term = path_term(prog, path)
    view = view_of_term(prog, term)
    vocab = int(view.decoder.unembedding.shape[0])
    length = context_length(term)
    rows = Contexts.grid(vocab, length) if contexts is None else Contexts.of(contexts, length, vocab)
    if len(rows) * vocab > max_entries:
        raise ValueError(f"the full table has {len(rows) * vocab:,} entries, more than max_entries "
                         f"{max_entries:,}: stream it with ngram_table instead")
    schedule = path_schedule(view, term)
    device = view.decoder.unembedding.device
    parts = [evaluate_path(schedule, rows.rows(i, min(i + chunk, len(rows))).to(device)).cpu()
             for i in range(0, len(rows), chunk)]
    return torch.cat(parts)
