"""What an n-gram table asks (:class:`NgramQuery`) and how it is run (:class:`RunOptions`).

A query is the path, its rows and what is kept of them; ``ngram_plan(prog, query)`` and
``ngram_table(prog, query, run)`` take the same value, so a plan and its table cannot disagree.
The run options change how the table is computed, never what it holds (``chunk`` changes the
rounding of a batched matmul only). Both are validated when made; :meth:`NgramQuery.bind`
checks the rest against a program, before any work.

Names, one per concept: ``sources`` restricts the first context token (the rows);
``first_tokens`` (:class:`FirstTokens`) is what each row of a path from the model's stream is
read after, the next-token probabilities mixed over it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from jetgraph.applications.ngrams.contexts import Contexts
from jetgraph.applications.ngrams.evaluator import PathEvaluator
from jetgraph.applications.ngrams.mixture import FirstTokens, MixtureEvaluator
from jetgraph.applications.ngrams.shard import DEFAULT_STALL_SECONDS, Shard
from jetgraph.applications.ngrams.state import CHECKPOINT_FORMAT
from jetgraph.applications.ngrams.table import Rank
from jetgraph.cost import DEFAULT_MAX_SECONDS
from jetgraph.ir import ResidualProgram
from jetgraph.passes.paths import context_tokens, path_term, starts_at_model_state, view_of_term
from jetgraph.passes.pathspec import PathSpec
from jetgraph.passes.terms import Term

DEFAULT_CHECKPOINT_SECONDS = 60.0
PROBE_ROWS = 8
RENAMED = {"first": "sources", "average": "first_tokens"}
"""0.7 keyword names that still work for one release, with a DeprecationWarning."""


@dataclass(frozen=True, eq=False)
class NgramQuery:
    """One table's question.

    ``path``: text in the path language (``"E→U"``, ``"E→attn0→U"``, ``"h_last→U"``), a
    :class:`~jetgraph.passes.pathspec.PathSpec` or a logit-space term; ``order``: the jets'
    order (default: the path's largest degree). Rows: every token (every pair for paths through
    attention), the first token restricted to ``sources`` (ids), or the rows of ``contexts``
    ([rows, length] ids). ``first_tokens``: for a path from the model's stream, what each row is
    read after (:class:`FirstTokens`; a row's distribution is the mixture over them).
    ``top``: global entries kept; ``row_top``: each row's best tokens; ``last_top``: for each last
    context token, its best entries; ``keywords``: ids whose probability mass each row puts on
    them (implies ``normalise``); ``normalise``: keep each row's normaliser; ``rank``: order the
    top by ``"logit"`` or by conditional probability ``"prob"`` (implies ``normalise``)."""

    path: str | PathSpec | Term
    order: int | None = None
    contexts: torch.Tensor | Contexts | None = None
    sources: Sequence[int] | None = None
    first_tokens: FirstTokens | None = None
    top: int = 100
    row_top: int = 0
    last_top: int = 0
    keywords: Sequence[int] | None = None
    normalise: bool = False
    rank: Rank = "logit"

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, PathSpec, Term)):
            raise TypeError(f"path must be text such as 'E→U', a PathSpec or a Term, "
                            f"got {type(self.path).__name__}")
        if not isinstance(self.top, int) or isinstance(self.top, bool) or self.top < 1:
            raise ValueError(f"top must be an int >= 1, got {self.top!r}")
        for name in ("row_top", "last_top"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.rank not in ("logit", "prob"):
            raise ValueError(f"rank must be 'logit' or 'prob', got {self.rank!r}")
        if self.contexts is not None and self.sources is not None:
            raise ValueError("give contexts or sources, not both")
        if self.first_tokens is not None and not isinstance(self.first_tokens, FirstTokens):
            raise TypeError("first_tokens must be a FirstTokens (FirstTokens.of(ids, weights), or "
                            f"FirstTokens.expected(prog, …)), got {type(self.first_tokens).__name__}")
        if self.keywords is not None:
            keywords = sorted({int(k) for k in self.keywords})
            if not keywords:
                raise ValueError("the keyword list is empty: give at least one token id")
            object.__setattr__(self, "keywords", tuple(keywords))

    def replace(self, **changes: object) -> NgramQuery:
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def bind(self, prog: ResidualProgram, chunk: int = 1024) -> TableJob:
        """The query checked against ``prog`` (cheap: no tensors of table size)."""
        term = path_term(prog, self.path, self.order)
        view = view_of_term(prog, term)
        if view.decoder.unembedding is None:
            raise ValueError("the decoder has no affine readout: cannot size the vocabulary")
        vocab = int(view.decoder.unembedding.shape[0])
        length = context_tokens(term)
        whole = starts_at_model_state(term)
        rows = (Contexts.grid(vocab, length, self.sources) if self.contexts is None
                else Contexts.of(self.contexts, length, vocab, whole))
        keywords = list(self.keywords) if self.keywords is not None else None
        if keywords is not None and (keywords[0] < 0 or keywords[-1] >= vocab):
            raise ValueError(f"keyword token ids must lie in [0, {vocab})")
        mixture = None
        if self.first_tokens is not None:
            if not whole:
                raise ValueError("first_tokens mixes contexts of a path from the model's stream (h_last→U); "
                                 f"{term.name} reads exactly its own tokens")
            mixture = self.first_tokens.check_vocabulary(vocab).tensors()
        normalise = self.normalise or keywords is not None or self.rank == "prob"
        return TableJob(term, view, vocab, rows, keywords, normalise, self.top, self.row_top, self.last_top,
                        self.rank, chunk, mixture)


@dataclass(frozen=True)
class RunOptions:
    """How a table is computed, not what it holds.

    ``chunk``: contexts per batched call; ``resume``: a checkpoint file, written at most every
    ``checkpoint_seconds``, when the run stops (an error or Ctrl-C) and at the end (a run of the
    same query continues from it); ``progress``: a tqdm bar; ``max_seconds``: a table planned
    to take longer is refused before any work (None: no limit); ``shard``: ``"auto"`` splits the
    table over the ranks of torch.distributed under ``torchrun``, a :class:`Shard`, or None for
    one process; ``stall_seconds``: how long a rank waits for a failed one at most."""

    chunk: int = 1024
    resume: str | Path | None = None
    progress: bool = True
    max_seconds: float | None = DEFAULT_MAX_SECONDS
    shard: Shard | str | None = "auto"
    checkpoint_seconds: float = DEFAULT_CHECKPOINT_SECONDS
    stall_seconds: float = DEFAULT_STALL_SECONDS

    def __post_init__(self) -> None:
        if not isinstance(self.chunk, int) or isinstance(self.chunk, bool) or self.chunk < 1:
            raise ValueError(f"chunk must be an int >= 1, got {self.chunk!r}")
        if not (self.shard is None or self.shard == "auto" or isinstance(self.shard, Shard)):
            raise ValueError(f"shard must be 'auto', a Shard or None, got {self.shard!r}")

    def replace(self, **changes: object) -> RunOptions:
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


QUERY_FIELDS = frozenset(f.name for f in dataclasses.fields(NgramQuery)) - {"path"}
RUN_FIELDS = frozenset(f.name for f in dataclasses.fields(RunOptions))


def renamed_options(options: dict[str, object], caller: str, stacklevel: int = 3) -> dict[str, object]:
    """``options`` with the 0.7 keywords (``first``, ``average``) moved to their names
    (``sources``, ``first_tokens``: an ``average=(prefixes, weights)`` becomes a
    :class:`FirstTokens`), each with a DeprecationWarning; both spellings at once are refused."""
    options = dict(options)
    for old, new in RENAMED.items():
        if old not in options:
            continue
        if options.get(new) is not None:
            raise TypeError(f"{caller}() got both {old}= and {new}=: give {new}= only")
        warnings.warn(f"{caller}({old}=…) is deprecated and goes in 0.9: use {new}=" +
                      (" (a FirstTokens value)" if new == "first_tokens" else ""),
                      DeprecationWarning, stacklevel=stacklevel + 1)
        value = options.pop(old)
        if old == "average" and value is not None and not isinstance(value, FirstTokens):
            value = FirstTokens.of(*value)  # type: ignore[misc]  # (prefixes, weights)
        options[new] = value
    return options


def split_options(path: str | PathSpec | Term, options: dict[str, object], caller: str
                  ) -> tuple[NgramQuery, RunOptions]:
    """A query and run options from 0.7-style keywords: unknown names refused by name, the
    renamed ones (``first``, ``average``) accepted with a DeprecationWarning."""
    options = renamed_options(options, caller, stacklevel=4)
    unknown = sorted(set(options) - QUERY_FIELDS - RUN_FIELDS - {"ranks"})
    if unknown:
        raise TypeError(f"{caller}() got unknown option(s) {unknown}; a query takes {sorted(QUERY_FIELDS)} "
                        f"and a run {sorted(RUN_FIELDS)}")
    query = NgramQuery(path, **{k: v for k, v in options.items() if k in QUERY_FIELDS})  # type: ignore[arg-type]
    run = RunOptions(**{k: v for k, v in options.items() if k in RUN_FIELDS})  # type: ignore[arg-type]
    return query, run


@dataclass
class TableJob:
    """A query bound to a program: the term, its rows and reductions (what the sweep runs)."""

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
    mixture: tuple[torch.Tensor, torch.Tensor] | None = None  # first tokens [n, length] and weights

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
        if self.mixture is None:
            return PathEvaluator(self.view, self.term, rows.length, tokens, self.vocab)
        first, weights = self.mixture
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
        if self.mixture is not None:
            digest.update(self.mixture[0].numpy().tobytes() + self.mixture[1].double().numpy().tobytes())
        self.contexts.fingerprint(digest)
        return digest.hexdigest()
