"""Jet n-grams: n-gram tables read from the weights (paper §4).

A path that skips every attention unit sees one token only, so evaluated on every vocabulary
token it is a bigram table: ``E→U`` (the embedding decoded directly), ``E→mlp3→U``, MLP
compositions. A path through one attention unit, evaluated on token pairs, is a skip-bigram /
trigram table. Tables are streamed in row chunks through the codegen's batched evaluator — the
V×V table is never held unless asked — keeping a global top-k, a row-wise top-k and, given a
keyword set, each row's probability mass on it. Progress is shown with tqdm and saved after every
chunk, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from jetgraph.codegen import BatchedRun, Schedule, plan
from jetgraph.cost import DEFAULT_MAX_SECONDS, Plan, estimate_seconds, gemm_rate
from jetgraph.files import atomic_write
from jetgraph.ir import ResidualProgram
from jetgraph.passes.expand import Expansion, Term, source_terms
from jetgraph.taylor import MAX_ORDER, check_order

ALIASES = {"e": "embed.token", "embed": "embed.token", "u": "unembed", "unembed": "unembed"}


def path_term(prog: ResidualProgram, spec: str | Term, order: int | None = None) -> Term:
    """A logit-space path term from text: ``"E→U"``, ``"E→mlp3→U"``, ``"E→MLP_last^1→U"``.

    Steps are separated by ``→`` or ``->``; ``E`` is the token embedding, ``U`` the decoder, the
    others are unit names of the sublayer view (``attn0``, ``mlp3``) or ``MLP_last`` /
    ``ATTN_last``; ``^j`` takes the order-j Taylor coefficient at that step (default 0). ``order``
    is the jets' truncation depth (default: the largest j on the path).
    """
    view = prog.at("sublayer")
    if isinstance(spec, Term):
        if spec.space != "logits":
            raise ValueError(f"an n-gram path must end in the decoder (logit space), got {spec!r}")
        return spec
    parsed = parse_path(spec)
    depth = check_order(order if order is not None else max(j for _, j in parsed), "the path's order")
    units = {u.name: u for u in view.units}
    mlps = [u.name for u in view.units if u.kind == "mlp"]
    attns = [u.name for u in view.units if u.kind == "attn"]
    aliases = {"mlp_last": mlps[-1] if mlps else None, "attn_last": attns[-1] if attns else None}
    source_name = ALIASES.get(parsed[0][0].lower(), parsed[0][0])
    sources = {t.path[0]: t for t in source_terms(view)}
    if source_name not in sources:
        raise ValueError(f"path {spec!r} starts at {parsed[0][0]!r}; sources are E (= embed.token) and "
                         f"{sorted(sources)}")
    if ALIASES.get(parsed[-1][0].lower()) != "unembed":
        raise ValueError(f"path {spec!r} must end at U (the decoder)")
    term = sources[source_name]
    previous = -1
    for name, j in parsed[1:-1]:
        unit = aliases.get(name.lower()) or name
        if unit not in units:
            raise ValueError(f"path {spec!r} names unknown unit {name!r}; units: {list(units)} "
                             "(or MLP_last, ATTN_last)")
        if units[unit].index <= previous:
            raise ValueError(f"path {spec!r}: units must appear in model order")
        previous = units[unit].index
        term = term.then(unit, j, depth)
    return term.then("unembed", parsed[-1][1], depth, space="logits")


def parse_path(spec: str) -> list[tuple[str, int]]:
    """The steps of a path spec as (name, Taylor order), checked for syntax only (no model needed):
    ``"E→mlp3^1→U"`` → ``[("E", 0), ("mlp3", 1), ("U", 0)]``."""
    if not isinstance(spec, str):
        raise ValueError(f"a path is text such as 'E→mlp0→U', got {type(spec).__name__}")
    raw = spec.replace("->", "→").split("→")
    steps = [s.strip() for s in raw]
    if any(not s for s in steps) and len(steps) > 1:
        raise ValueError(f"path {spec!r} has an empty step: write steps joined by → or ->, e.g. 'E→mlp0→U'")
    if len(steps) < 2:
        raise ValueError(f"path {spec!r} needs at least a source and the decoder, e.g. 'E→U'")
    parsed = []
    for step in steps:
        name, caret, power = step.partition("^")
        name = name.strip()
        if not name or not all(c.isalnum() or c in "_." for c in name):
            raise ValueError(f"path {spec!r}: step {step!r} is not a unit name (letters, digits, '_', '.')")
        if caret and not power.strip().isdigit():
            raise ValueError(f"path {spec!r}: step {step!r} takes the order as ^j with j an integer 0.."
                             f"{MAX_ORDER}, got ^{power.strip() or ''}")
        order = int(power) if caret else 0
        if order > MAX_ORDER:
            raise ValueError(f"path {spec!r}: order {order} at {name!r} is above the highest supported "
                             f"order {MAX_ORDER}")
        parsed.append((name, order))
    if parsed[0][1]:
        raise ValueError(f"path {spec!r}: the source {parsed[0][0]!r} takes no Taylor order (^j goes on "
                         "the units and U)")
    if ALIASES.get(parsed[0][0].lower()) == "unembed":
        raise ValueError(f"path {spec!r} starts at the decoder; it must start at a source such as E")
    if ALIASES.get(parsed[-1][0].lower()) != "unembed":
        raise ValueError(f"path {spec!r} must end at U (the decoder)")
    return parsed


def check_path_units(spec: str, layers: int) -> None:
    """Check the unit names of a path spec against a model with ``layers`` blocks (from its
    config, before loading it): ``attnI`` / ``mlpI`` (``mlpI_2`` for a block's second) need
    I < layers. The capture checks the names again against the units it finds."""
    for name, _ in parse_path(spec)[1:-1]:
        lowered = name.lower()
        if lowered in ("mlp_last", "attn_last"):
            continue
        kind = next((k for k in ("attn", "mlp") if lowered.startswith(k)), None)
        index = lowered[len(kind):].split("_")[0] if kind else ""  # mlp3_2: a block's second MLP
        if kind is None or not index.isdigit():
            raise ValueError(f"path {spec!r} names unknown unit {name!r}: units are attn0..attn{layers - 1}, "
                             f"mlp0..mlp{layers - 1}, MLP_last and ATTN_last")
        if int(index) >= layers:
            raise ValueError(f"path {spec!r} names {name!r}, but the model has {layers} layers "
                             f"({kind}0..{kind}{layers - 1})")


def spec_context_length(spec: str) -> int:
    """Tokens of context a path spec reads, from its text alone (the rule of
    :func:`context_length`: 2 through an attention unit, else 1)."""
    return 2 if any(name.lower().startswith("attn") for name, _ in parse_path(spec)[1:-1]) else 1


def context_length(term: Term) -> int:
    """Tokens of context a path sees: 1 without attention, 2 through attention units."""
    units = []
    node = term
    while node is not None:
        if node.unit is not None:
            units.append(node.unit)
        node = node.center
    return 2 if any(u.startswith("attn") for u in units) else 1


class Contexts:
    """The contexts of a table, generated lazily from their row index.

    A grid (every token, or every pair ``first × second``) is never held as a list: row i of the
    pair grid is ``(first[i // len(second)], second[i % len(second)])``, so a V² sweep costs no
    memory for its contexts. An explicit ``[rows, length]`` tensor of token ids is kept as given.
    Row order is the order of the ids (the tie-breaker of the tables).
    """

    def __init__(self, length: int, first: torch.Tensor | None = None, second: torch.Tensor | None = None,
                 explicit: torch.Tensor | None = None) -> None:
        self.length = length
        self.first, self.second, self.explicit = first, second, explicit

    @classmethod
    def grid(cls, vocab: int, length: int, first: Sequence[int] | None = None,
             second: Sequence[int] | None = None) -> Contexts:
        """Every context of ``length`` tokens, the first token restricted to ``first`` and the
        second (for pairs) to ``second``."""
        if length not in (1, 2):
            raise ValueError(f"contexts are one or two tokens long, not {length}")
        tokens = [_token_ids(first, vocab, "first"), _token_ids(second, vocab, "second")]
        return cls(length, tokens[0], tokens[1] if length == 2 else None)

    @classmethod
    def of(cls, contexts: torch.Tensor | Contexts, length: int, vocab: int) -> Contexts:
        """``contexts`` as given: a [rows, length] tensor of ids in [0, vocab)."""
        if isinstance(contexts, Contexts):
            if contexts.length != length:
                raise ValueError(f"contexts have {contexts.length} token(s), the path reads {length}")
            return contexts
        tensor = torch.as_tensor(contexts)
        if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
            raise ValueError(f"contexts must be integer token ids, got {tensor.dtype}")
        tensor = tensor.long()
        if tensor.dim() != 2 or tensor.shape[1] != length:
            raise ValueError(f"a path that reads {length} token(s) of context needs contexts of shape "
                             f"[rows, {length}], got {tuple(tensor.shape)}")
        if tensor.numel() and (tensor.min() < 0 or tensor.max() >= vocab):
            raise ValueError(f"context token ids must lie in [0, {vocab})")
        return cls(length, explicit=tensor)

    def __len__(self) -> int:
        if self.explicit is not None:
            return int(self.explicit.shape[0])
        return len(self.first) * (len(self.second) if self.second is not None else 1)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.length)

    def rows(self, start: int, end: int) -> torch.Tensor:
        """Rows ``start..end`` as a [end − start, length] id tensor."""
        if self.explicit is not None:
            return self.explicit[start:end]
        index = torch.arange(start, end)
        if self.second is None:
            return self.first[index].unsqueeze(1)
        return torch.stack([self.first[index // len(self.second)], self.second[index % len(self.second)]], 1)

    def __getitem__(self, row: int) -> torch.Tensor:
        return self.rows(row, row + 1)[0]

    def tensor(self) -> torch.Tensor:
        """All rows materialised (only for tables small enough to hold)."""
        return self.rows(0, len(self))

    def fingerprint(self, digest) -> None:
        """Feed what defines the rows into a hashlib ``digest`` (checkpoint keys)."""
        parts = [self.explicit] if self.explicit is not None else [self.first, self.second]
        for part in parts:
            digest.update(b"-" if part is None else part.numpy().tobytes() + b"|")

    def held_bytes(self) -> int:
        parts = (self.explicit, self.first, self.second)
        return sum(p.numel() * p.element_size() for p in parts if p is not None)


def _token_ids(tokens: Sequence[int] | None, vocab: int, which: str) -> torch.Tensor:
    if tokens is None:
        return torch.arange(vocab)
    ids = torch.as_tensor(list(tokens), dtype=torch.long)
    if ids.numel() == 0:
        raise ValueError(f"the {which} token subset is empty")
    if ids.min() < 0 or ids.max() >= vocab:
        raise ValueError(f"{which} token ids must lie in [0, {vocab})")
    return ids


@dataclass
class NgramTable:
    """The streamed result of one path over a set of contexts.

    The path carries unit weights: its logits are the path's own, as a bigram table reads them.
    ``top_values`` holds the global top-k by the ranking key (logits, or log-probabilities with
    ``rank="prob"``), ``top_logits`` their logits and ``top_index`` the flat position
    ``row · vocab + next token``; ties are ordered by probability (or logit), then logit, then ids,
    so a smaller ``top`` is always a prefix of a larger one. ``row_values``/``row_index`` hold
    each context's top tokens. With normalisers kept, ``row_max`` and ``log_sum`` give each row's
    log-probabilities as ``(logit − row_max) − log_sum`` without the cancellation of
    ``logit − logsumexp`` when the logits are large; ``keyword_logits`` each row's logits at the
    keyword tokens, from which :meth:`keyword_mass` gives the probability on any subset.
    """

    path: str
    contexts: Contexts
    top_values: torch.Tensor
    top_index: torch.Tensor  # flat row * vocab + next token
    vocab: int
    top_logits: torch.Tensor | None = None
    row_values: torch.Tensor | None = None
    row_index: torch.Tensor | None = None
    row_max: torch.Tensor | None = None
    log_sum: torch.Tensor | None = None  # log Σ exp(logit − row_max), ≥ 0
    keyword_logits: torch.Tensor | None = None  # [rows, len(keywords)]
    keywords: list[int] = field(default_factory=list)
    rank: str = "logit"  # what top_values hold: logits, or log-probabilities ("prob")

    @property
    def log_normaliser(self) -> torch.Tensor | None:
        """Each row's logsumexp in float64 (``row_max + log_sum``)."""
        if self.row_max is None or self.log_sum is None:
            return None
        return self.row_max.double() + self.log_sum.double()

    def log_prob(self, row: int, logit: float) -> float:
        """log p(next | context row) of a next token with this ``logit``, in float64."""
        if self.row_max is None or self.log_sum is None:
            raise ValueError("this table was built without row normalisers (normalise=False)")
        return (float(logit) - float(self.row_max[row])) - float(self.log_sum[row])

    def keyword_mass(self, subset: Sequence[int] | None = None) -> torch.Tensor:
        """Each row's probability on the keywords (or on ``subset``, token ids among them)."""
        if self.keyword_logits is None or self.row_max is None or self.log_sum is None:
            raise ValueError("this table was built without keywords")
        columns = slice(None)
        if subset is not None:
            position = {k: i for i, k in enumerate(self.keywords)}
            missing = sorted(set(subset) - set(position))
            if missing or not subset:
                raise ValueError("subset must be a non-empty list of the table's keywords; "
                                 f"not in it: {missing}")
            columns = [position[k] for k in subset]
        shifted = self.keyword_logits[:, columns].double() - self.row_max.double()[:, None]
        return torch.exp(torch.logsumexp(shifted, -1) - self.log_sum.double())

    def entries(self, tokenizer=None) -> list[dict]:
        """The global top-k as rows: rank, context, next token, logit and, when the row
        normalisers were kept, the log-probability and probability of the next token."""
        rows = []
        logits = self.top_logits if self.top_logits is not None else self.top_values
        for rank, (logit, flat) in enumerate(zip(logits.tolist(), self.top_index.tolist(), strict=True),
                                             start=1):
            row, token = divmod(int(flat), self.vocab)
            context = self.contexts[row].tolist()
            entry = {"rank": rank, "context_ids": " ".join(map(str, context)), "next_id": token,
                     "logit": float(f"{logit:.7g}")}
            if self.row_max is not None:
                log_p = self.log_prob(row, logit)
                entry["log_prob"] = float(f"{log_p:.9g}")
                entry["prob"] = float(f"{math.exp(log_p):.9g}")
            if tokenizer is not None:
                entry["context"] = tokenizer.decode(context)
                entry["next"] = tokenizer.decode([token])
            rows.append(entry)
        return rows

    def export(self, path: str | Path, tokenizer=None) -> Path:
        """The global top-k as CSV or JSON (by suffix), decoded with ``tokenizer`` if given;
        written whole or not at all."""
        path = Path(path)
        if path.suffix not in (".csv", ".json"):
            raise ValueError(f"export writes .csv or .json, not {path.suffix!r}")
        rows = self.entries(tokenizer)
        if path.suffix == ".json":
            text = json.dumps({"path": self.path, "weights": "unit", "rank": self.rank, "top": rows},
                              indent=1, ensure_ascii=False) + "\n"
        else:
            buffer = io.StringIO(newline="")
            writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["rank"])
            writer.writeheader()
            writer.writerows(rows)
            text = buffer.getvalue()
        return atomic_write(path, text)

    def mass(self, subset: Sequence[int] | None = None, samples: int = 1000, confidence: float = 0.95,
             seed: int = 0) -> dict[str, float]:
        """Mean probability mass on the keyword set (or a subset) over contexts, with a bootstrap
        confidence interval."""
        return bootstrap_mean(self.keyword_mass(subset), samples, confidence, seed)


def bootstrap_mean(values: torch.Tensor, samples: int = 1000, confidence: float = 0.95,
                   seed: int = 0) -> dict[str, float]:
    """Mean of ``values`` and a percentile bootstrap confidence interval (resampling rows)."""
    values = values.double().flatten()
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, values.numel(), (samples, values.numel()), generator=generator)
    means = values[draws].mean(1)
    alpha = (1 - confidence) / 2
    return {"mean": values.mean().item(), "low": means.quantile(alpha).item(),
            "high": means.quantile(1 - alpha).item(), "confidence": confidence, "samples": samples}


def all_contexts(vocab: int, length: int, first: Sequence[int] | None = None,
                 second: Sequence[int] | None = None) -> torch.Tensor:
    """Every context as a tensor: all tokens (length 1) or all pairs first × second (length 2).
    For large grids use :meth:`Contexts.grid`, which never materialises them."""
    return Contexts.grid(vocab, length, first, second).tensor()


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
    rank: str
    chunk: int


def _job(prog: ResidualProgram, path: str | Term, order: int | None, contexts, first, top: int,
         row_top: int, keywords, normalise: bool, rank: str, chunk: int) -> _Job:
    """Validate every argument before any work (cheap: no tensors of table size)."""
    if not isinstance(top, int) or not isinstance(chunk, int) or top < 1 or chunk < 1:
        raise ValueError(f"top and chunk must be ints >= 1, got top={top!r}, chunk={chunk!r}")
    if not isinstance(row_top, int) or row_top < 0:
        raise ValueError(f"row_top must be an int >= 0, got {row_top!r}")
    if rank not in ("logit", "prob"):
        raise ValueError(f"rank must be 'logit' or 'prob', got {rank!r}")
    term = path_term(prog, path, order)
    view = prog.at("sublayer")
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
               normalise: bool = False, rank: str = "logit", chunk: int = 1024) -> Plan:
    """What :func:`ngram_table` with these arguments will cost (contexts, FLOPs, peak memory above
    the model, time here), from one evaluated context: nothing of table size is allocated."""
    return _plan(_job(prog, path, order, contexts, first, top, row_top, keywords, normalise, rank, chunk))


def _plan(job: _Job) -> Plan:
    from torch.utils.flop_counter import FlopCounterMode

    schedule = _schedule(job.view, job.term)
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
    seconds = estimate_seconds(counter.get_total_flops() * rows, elements,
                               overhead=2e-3 * math.ceil(rows / job.chunk))
    return Plan(f"n-gram table {job.term.name}", rows, "contexts", counter.get_total_flops() * rows,
                peak, seconds, gemm_rate())


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
    rank: str = "logit",
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
    schedule = _schedule(job.view, job.term)
    device = job.view.decoder.unembedding.device
    state = _State.start(job, resume)
    rows = len(job.contexts)
    bar = tqdm(total=rows, initial=state.done, unit="ctx", desc=f"n-grams {job.term.name}",
               disable=not progress, leave=False)
    keyword_index = torch.tensor(job.keywords, device=device) if job.keywords else None
    while state.done < rows:
        start, end = state.done, min(state.done + chunk, rows)
        logits = _evaluate(schedule, job.contexts.rows(start, end).to(device))
        state.add(logits, start, keyword_index)
        state.done = end
        state.save()
        bar.update(end - start)
    bar.close()
    return state.table(job)


def _schedule(view: ResidualProgram, term: Term) -> Schedule:
    """The batched plan of one logit-space path term."""
    return plan(Expansion(view, len(view.units), [term], "logits", term.depth))


def _evaluate(schedule: Schedule, ids: torch.Tensor) -> torch.Tensor:
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
    rank: str = "logit"
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
    view = prog.at("sublayer")
    vocab = int(view.decoder.unembedding.shape[0])
    length = context_length(term)
    rows = Contexts.grid(vocab, length) if contexts is None else Contexts.of(contexts, length, vocab)
    if len(rows) * vocab > max_entries:
        raise ValueError(f"the full table has {len(rows) * vocab:,} entries, more than max_entries "
                         f"{max_entries:,}: stream it with ngram_table instead")
    schedule = _schedule(view, term)
    device = view.decoder.unembedding.device
    parts = [_evaluate(schedule, rows.rows(i, min(i + chunk, len(rows))).to(device)).cpu()
             for i in range(0, len(rows), chunk)]
    return torch.cat(parts)


# ----------------------------------------------------------------- analyses
def keyword_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """Token ids of a keyword list: every word's first token, with and without a leading space.

    A first token that decodes to nothing but white space (SentencePiece's bare word-start "▁",
    which begins every word) is skipped for the token after it: it says nothing about the word.
    """
    words = [w.strip() for w in words if w.strip()]
    if not words:
        raise ValueError("the keyword list is empty")
    decode = getattr(tokenizer, "decode", None)
    ids: set[int] = set()
    for word in words:
        for variant in (word, " " + word):
            encoded = [int(i) for i in tokenizer(variant, add_special_tokens=False).input_ids]
            meaningful = [i for i in encoded if decode is None or decode([i]).strip()]
            if meaningful:
                ids.add(meaningful[0])
    return sorted(ids)


def load_keywords(name_or_path: str | Path) -> list[str]:
    """A shipped keyword list (``"refusal"``, ``"toxic"``) or a text file, one entry per line."""
    from importlib import resources

    candidate = Path(name_or_path)
    if candidate.is_file():
        text = candidate.read_text(encoding="utf-8")
    else:
        shipped = resources.files("jetgraph.data").joinpath(f"keywords_{name_or_path}.txt")
        if not shipped.is_file():
            raise ValueError(f"no keyword list {str(name_or_path)!r}: give a file or one of "
                             "'refusal', 'toxic'")
        text = shipped.read_text(encoding="utf-8")
    words = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not words:
        raise ValueError(f"the keyword list {str(name_or_path)!r} is empty")
    return words


@torch.no_grad()
def diff_tables(prog_a: ResidualProgram, prog_b: ResidualProgram, path: str, top: int = 50,
                contexts: torch.Tensor | None = None, chunk: int = 1024,
                progress: bool = True) -> dict[str, list[tuple[int, int, float, float]]]:
    """Ranked changes of one path's bigram probabilities from model A to model B.

    Returns the ``top`` largest increases and decreases as (context row, next token, p_A, p_B).
    Both models must share a vocabulary."""
    term_a, term_b = path_term(prog_a, path), path_term(prog_b, path)
    va, vb = prog_a.decoder.unembedding, prog_b.decoder.unembedding
    if va is None or vb is None or va.shape[0] != vb.shape[0]:
        raise ValueError("diff_tables needs two models with the same vocabulary size "
                         f"({None if va is None else va.shape[0]} vs {None if vb is None else vb.shape[0]})")
    vocab = int(va.shape[0])
    contexts = all_contexts(vocab, context_length(term_a)) if contexts is None else torch.as_tensor(contexts)
    views = prog_a.at("sublayer"), prog_b.at("sublayer")
    schedules = [_schedule(v, t) for v, t in zip(views, (term_a, term_b), strict=True)]
    best = {"increase": (torch.empty(0), torch.empty(0, dtype=torch.long)),
            "decrease": (torch.empty(0), torch.empty(0, dtype=torch.long))}
    probs_at: dict[int, tuple[float, float]] = {}
    for start in tqdm(range(0, contexts.shape[0], chunk), desc="diff", disable=not progress, leave=False):
        ids = contexts[start:start + chunk]
        pa = _evaluate(schedules[0], ids).float().softmax(-1)
        pb = _evaluate(schedules[1], ids).float().softmax(-1)
        delta = (pb - pa).reshape(-1)
        for direction, sign in (("increase", 1.0), ("decrease", -1.0)):
            values, flat = (sign * delta).topk(min(top, delta.numel()))
            flat = flat + start * vocab
            for f in flat.tolist():
                r, c = divmod(f, vocab)
                probs_at[f] = (pa[r - start, c].item(), pb[r - start, c].item())
            merged_v = torch.cat([best[direction][0], values])
            merged_i = torch.cat([best[direction][1], flat])
            keep = merged_v.topk(min(top, merged_v.numel())).indices
            best[direction] = (merged_v[keep], merged_i[keep])
    result = {}
    for direction, (_, flat) in best.items():
        result[direction] = [(divmod(f, vocab)[0], divmod(f, vocab)[1], *probs_at[f]) for f in flat.tolist()]
    return result


def compare_to_reference(table_logits: torch.Tensor, reference: torch.Tensor,
                         k: int = 100) -> dict[str, float]:
    """A full jet bigram table against a reference (true chain rows or corpus counts), both
    [V, V] (rows: context token). Reports the top-1 hit ratio per row (rows with data), the mean
    KL(reference row ‖ jet row), the global top-k hit ratio |top-k jet ∩ top-k reference| / k and
    the total mass: the share of the reference's joint bigram mass that the jet's top-k covers."""
    reference = reference.double()
    counts = reference.sum(-1)
    rows = counts > 0
    ref_rows = reference[rows] / counts[rows, None]
    jet_log = table_logits[rows].double().log_softmax(-1)
    top1 = (jet_log.argmax(-1) == ref_rows.argmax(-1)).double().mean().item()
    kl = (ref_rows * (torch.log(ref_rows.clamp_min(1e-300)) - jet_log)).where(ref_rows > 0,
                                                                              torch.zeros(())).sum(-1)
    joint = reference / reference.sum()
    jet_joint = table_logits.double().log_softmax(-1)
    jet_top = set(jet_joint.where(rows[:, None], torch.tensor(-torch.inf, dtype=torch.double))
                  .flatten().topk(k).indices.tolist())
    ref_top = set(joint.flatten().topk(k).indices.tolist())
    mass = joint.flatten()[list(jet_top)].sum().item()
    return {"top1_hit_ratio": top1, "mean_kl": kl.mean().item(),
            f"top{k}_hit_ratio": len(jet_top & ref_top) / k, f"top{k}_mass": mass, "rows": int(rows.sum())}
