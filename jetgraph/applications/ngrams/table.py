"""An n-gram table's result: the global and per-row top entries, normalisers, keyword logits, and
its export as CSV or JSON."""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from jetgraph.applications.ngrams.contexts import Contexts
from jetgraph.applications.ngrams.mixture import FirstTokens
from jetgraph.applications.statistics import bootstrap_mean
from jetgraph.files import atomic_write

Rank = Literal["logit", "prob"]
"""What a table's top entries are ordered by: raw logits, or conditional probabilities."""


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
    ``last_values``/``last_logits``/``last_index`` [vocab, m] hold, for each last context token
    (z2 of a pair table), the best ``m`` entries of the rows ending in it (:meth:`last_entries`).
    ``first_tokens``: what each row's distribution was read after (token sequences and weights,
    :class:`~.mixture.FirstTokens`), for the default read-out (:mod:`.readout`).
    In a distributed run only rank 0 holds the per-row results (``row_*``, ``log_sum``,
    ``keyword_logits``); every rank holds the top entries.
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
    rank: Rank = "logit"  # what top_values hold: logits, or log-probabilities ("prob")
    last_values: torch.Tensor | None = None  # [vocab, m]: per last context token, best entries
    last_logits: torch.Tensor | None = None
    last_index: torch.Tensor | None = None  # flat row * vocab + next token; -1: empty slot
    first_tokens: FirstTokens | None = None  # what each row was read after

    @property
    def average(self) -> tuple[list[list[int]], list[float]] | None:
        """Deprecated (goes in 0.9): ``first_tokens.as_lists()``."""
        warnings.warn("NgramTable.average is deprecated and goes in 0.9: use NgramTable.first_tokens",
                      DeprecationWarning, stacklevel=2)
        return None if self.first_tokens is None else self.first_tokens.as_lists()

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

    def _repr_html_(self) -> str:
        from jetgraph.applications.report.inline import ngram_html

        return ngram_html(self)

    def show(self, tokenizer: object = None):
        """The table sortable, searchable and paged, inline in a notebook."""
        from jetgraph.applications.report import explorer

        return explorer(self, tokenizer=tokenizer)

    def to_html(self, path, tokenizer: object = None):
        """The table as a self-contained HTML explorer (:func:`jetgraph.report`)."""
        from jetgraph.applications.report import report

        return report(self, path=path, title=f"n-grams of {self.path}", tokenizer=tokenizer)

    def entries(self, tokenizer=None) -> list[dict]:
        """The global top-k as rows: rank, context, next token, logit and, when the row
        normalisers were kept, the log-probability and probability of the next token."""
        logits = self.top_logits if self.top_logits is not None else self.top_values
        return self._entries(self.top_values.tolist(), logits.tolist(), self.top_index.tolist(), tokenizer)

    def last_entries(self, token: int, tokenizer=None) -> list[dict]:
        """The best entries among the contexts that end in ``token`` (a table built with
        ``last_top``), as :meth:`entries` writes them."""
        if self.last_index is None:
            raise ValueError("this table was built without per-last-token summaries (last_top=0)")
        if not 0 <= int(token) < self.vocab:
            raise ValueError(f"token ids lie in [0, {self.vocab}), got {token}")
        filled = self.last_index[int(token)] >= 0
        return self._entries(self.last_values[int(token)][filled].tolist(),
                             self.last_logits[int(token)][filled].tolist(),
                             self.last_index[int(token)][filled].tolist(), tokenizer)

    def _entries(self, values: list[float], logits: list[float], flats: list[int], tokenizer) -> list[dict]:
        rows = []
        for rank, (value, logit, flat) in enumerate(zip(values, logits, flats, strict=True), start=1):
            row, token = divmod(int(flat), self.vocab)
            context = self.contexts[row].tolist()
            entry = {"rank": rank, "context_ids": " ".join(map(str, context)), "next_id": token,
                     "logit": float(f"{logit:.7g}")}
            log_p = None
            if self.row_max is not None:
                log_p = self.log_prob(row, logit)
            elif self.rank == "prob":  # the ranking value is log p (rank > 0 of a distributed run)
                log_p = value
            if log_p is not None:
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
            payload = {"path": self.path, "weights": "unit", "rank": self.rank, "averaged_over":
                       None if self.first_tokens is None else self.first_tokens.as_lists(),
                       "top": rows}
            text = json.dumps(payload, indent=1, ensure_ascii=False) + "\n"
        else:
            buffer = io.StringIO(newline="")
            writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["rank"])
            writer.writeheader()
            writer.writerows(rows)
            text = buffer.getvalue()
        return atomic_write(path, text)

    def export_last(self, path: str | Path, tokenizer=None) -> Path:
        """The per-last-token summary as CSV: for each last context token, its best entries
        (``last_id`` and ``last`` lead each row); written whole or not at all."""
        path = Path(path)
        if path.suffix != ".csv":
            raise ValueError(f"export_last writes .csv, not {path.suffix!r}")
        rows = []
        for token in range(self.vocab):
            for entry in self.last_entries(token, tokenizer):
                head = {"last_id": token}
                if tokenizer is not None:
                    head["last"] = tokenizer.decode([token])
                rows.append({**head, **entry})
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["last_id"])
        writer.writeheader()
        writer.writerows(rows)
        return atomic_write(path, buffer.getvalue())

    def mass(self, subset: Sequence[int] | None = None, samples: int = 1000, confidence: float = 0.95,
             seed: int = 0) -> dict[str, float]:
        """Mean probability mass on the keyword set (or a subset) over contexts, with a bootstrap
        confidence interval."""
        return bootstrap_mean(self.keyword_mass(subset), samples, confidence, seed)
