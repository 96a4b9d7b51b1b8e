"""Several n-gram tables of one program, read the same way: the orchestration that
``jetgraph.ngrams`` and ``jetgraph ngrams`` share.

A table's rows and what is read before them depend on two passes of the model that cost time
of their own: the tokens it predicts most (``sources=N``) and the first tokens it expects (the
default read-out's mixture when the tokenizer adds no BOS). A :class:`TableSet` plans every
table before either pass (:meth:`TableSet.plans`: a mixture's cost does not depend on which
tokens it mixes, so the plan uses placeholders of the right size), then runs the passes once
(:meth:`TableSet.prepare`) and reads each table with the same rows and prefixes
(:meth:`TableSet.table`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from jetgraph.applications.ngrams.convention import InputConvention, input_convention
from jetgraph.applications.ngrams.mixture import FirstTokens
from jetgraph.applications.ngrams.query import RUN_FIELDS, NgramQuery, RunOptions
from jetgraph.applications.ngrams.readout import (
    describe_prefixes,
    placeholder_prefixes,
    prediction_plan,
    readout_prefixes,
)
from jetgraph.applications.ngrams.sources import common_tokens
from jetgraph.applications.ngrams.sweep import ngram_plan, ngram_table
from jetgraph.applications.ngrams.table import NgramTable
from jetgraph.cost import Plan
from jetgraph.ir import ResidualProgram
from jetgraph.passes.paths import path_term, starts_at_model_state

PLAN_OPTIONS = frozenset({"order", "top", "row_top", "last_top", "keywords", "normalise", "rank", "chunk"})
RUN_OPTIONS = RUN_FIELDS - {"chunk"}


class TableSet:
    """The tables of ``paths`` on ``prog``, with one set of rows and one input convention.

    ``sources``: the rows (first context tokens): an int N means the N tokens the model predicts
    most (:func:`~jetgraph.applications.ngrams.sources.common_tokens`), a sequence gives ids;
    ``contexts``: explicit rows instead. A path from the model's stream (``h_last→U``) is read
    after the ``convention``'s prefix (default: the ``tokenizer``'s), mixed over
    ``first_tokens`` expected first tokens when there is no BOS (an int: how many, default 16),
    or after the given :class:`FirstTokens`. ``options``: the tables' reductions (``top``,
    ``rank``, ``keywords``, ``row_top``, ``last_top``, ``normalise``, ``chunk``, ``order``).
    ``ranks``: processes a table is split over (the plan's time is one rank's share).
    """

    def __init__(self, prog: ResidualProgram, paths: Sequence[str], *, tokenizer: object = None,
                 convention: InputConvention | Sequence[int] | None = None,
                 sources: int | Sequence[int] | None = None, contexts: torch.Tensor | None = None,
                 first_tokens: int | FirstTokens | None = None, ranks: int = 1,
                 **options: object) -> None:
        unknown = sorted(set(options) - PLAN_OPTIONS)
        if unknown:
            raise TypeError(f"unknown table option(s) {unknown}; the options are {sorted(PLAN_OPTIONS)}")
        self.prog, self.paths, self.tokenizer = prog, list(paths), tokenizer
        self.vocab = int(prog.decoder.unembedding.shape[0])
        self.from_stream = [starts_at_model_state(path_term(prog, spec)) for spec in self.paths]
        counted = isinstance(sources, int) and not isinstance(sources, bool)
        if first_tokens and not any(self.from_stream):
            raise ValueError(f"first_tokens applies to read-outs of the model's stream (h_last→U, hN→U); "
                             f"{', '.join(map(str, self.paths))} read exactly their own tokens")
        given = first_tokens if isinstance(first_tokens, FirstTokens) else None
        self.first_count = None if given is not None else first_tokens
        self.convention = (input_convention(convention, tokenizer, self.vocab)
                           if any(self.from_stream) or counted else None)
        self.requested, self.contexts, self.ranks = sources, contexts, ranks
        self.chunk = int(options.pop("chunk", 1024))  # type: ignore[call-overload]
        self.options = options
        self.first_tokens: FirstTokens | None = given
        self._given_first = given is not None
        self.sources: Sequence[int] | None = None if counted else sources  # type: ignore[assignment]
        self._prepared = not counted and (self._given_first or not any(self.from_stream))

    # ------------------------------------------------------------------ before the model passes
    def placeholder_first_tokens(self) -> FirstTokens | None:
        """First tokens of the size the read-out will use, for plans (None: no path needs any)."""
        if not any(self.from_stream):
            return None
        if self._given_first:
            return self.first_tokens
        return placeholder_prefixes(self.vocab, self.convention, self.first_count)  # type: ignore[arg-type]

    def query(self, index: int, sources: Sequence[int] | None,
              first_tokens: FirstTokens | None) -> NgramQuery:
        """Table ``index``'s query with these rows and first tokens."""
        return NgramQuery(self.paths[index], contexts=self.contexts, sources=sources,
                          first_tokens=first_tokens if self.from_stream[index] else None,
                          **self.options)  # type: ignore[arg-type]

    @property
    def ready(self) -> bool:
        """Whether the rows and prefixes are known without a model pass."""
        return self._prepared

    @property
    def mixture_size(self) -> int:
        """How many times the model runs per row of a path from the stream (1: no mixture)."""
        placeholder = self.placeholder_first_tokens()
        return len(placeholder) if placeholder is not None else 1

    def plans(self) -> list[Plan]:
        """One plan per table, after the model pass that finds the rows or the first tokens when
        one is needed; all computed before any pass over the vocabulary."""
        placeholder = self.placeholder_first_tokens()
        counted = isinstance(self.requested, int) and not isinstance(self.requested, bool)
        rows = range(min(self.requested, self.vocab)) if counted else self.requested  # type: ignore[arg-type]
        run = RunOptions(chunk=self.chunk)
        plans = [ngram_plan(self.prog, self.query(i, rows, placeholder), run, ranks=self.ranks)
                 for i in range(len(self.paths))]
        mixture_pass = (placeholder is not None and not self._given_first and self.convention is not None
                        and not self.convention.prefix and len(placeholder) > 1)
        if counted or mixture_pass:  # the model's mean prediction: the sources, the expected first tokens
            plans.insert(0, prediction_plan(self.prog, self.convention, self.chunk))  # type: ignore[arg-type]
        return plans

    # ------------------------------------------------------------------ the model passes
    def prepare(self) -> TableSet:
        """Run the model passes the rows and prefixes need (each once per model: cached)."""
        if self._prepared:
            return self
        if isinstance(self.requested, int) and not isinstance(self.requested, bool):
            self.sources = common_tokens(self.prog, self.requested, self.convention, self.tokenizer,  # type: ignore[arg-type]
                                         self.chunk)
        if any(self.from_stream) and not self._given_first:
            self.first_tokens = readout_prefixes(self.prog, self.convention, self.first_count,  # type: ignore[arg-type]
                                                 self.chunk)
        self._prepared = True
        return self

    def describe(self) -> str:
        """The input convention and what each row is read after, in words."""
        if self.convention is None:
            return "each token alone at position 0"
        return (f"input convention: {self.convention.describe(self.tokenizer)}; "
                f"{describe_prefixes(self.first_tokens, self.tokenizer)}")

    def table(self, index: int = 0, **run: object) -> NgramTable:
        """The table of ``paths[index]``; ``run``: ``resume``, ``progress``, ``max_seconds``,
        ``shard``, ``checkpoint_seconds``, ``stall_seconds`` (:class:`RunOptions`)."""
        unknown = sorted(set(run) - RUN_OPTIONS)
        if unknown:
            raise TypeError(f"unknown run option(s) {unknown}; the options are {sorted(RUN_OPTIONS)}")
        self.prepare()
        return ngram_table(self.prog, self.query(index, self.sources, self.first_tokens),
                           RunOptions(chunk=self.chunk, **run))  # type: ignore[arg-type]
