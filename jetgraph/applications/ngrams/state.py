"""The reductions of a streamed n-gram table, kept per chunk of contexts, and their checkpoints.

A table's contexts are cut into fixed chunks: chunk c is rows ``[c·chunk, (c+1)·chunk)``,
whatever processes them. One process or the ranks of a distributed run compute each chunk the
same way, and every reduction here merges exactly: the global top-k and the per-last-token
top-m are cut by one total order (ranking value, then logit, both descending, then flat index
ascending) with duplicates dropped, and per-row results are stored by chunk. So the union of
any partial states, in any grouping, is the single-process table, and merging a state twice
changes nothing (a resumed run may meet the same chunk in two checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from jetgraph.files import atomic_write

CHECKPOINT_FORMAT = 3
ROW_FIELDS = ("row_values", "row_index", "row_max", "log_sum", "keyword_logits")


def ranking(values: torch.Tensor, logits: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """The permutation ordering entries by value, then logit (both descending), then flat index
    (context row, then next token id, ascending): deterministic under ties."""
    order = torch.argsort(flat)
    order = order[torch.argsort(logits[order], descending=True, stable=True)]
    return order[torch.argsort(values[order], descending=True, stable=True)]


@dataclass
class TopEntries:
    """The best entries seen so far: ranking value, logit and flat index ``row · vocab + token``."""

    values: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    logits: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    index: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    def __len__(self) -> int:
        return int(self.index.numel())

    def merged(self, others: list[TopEntries], top: int) -> TopEntries:
        """The ``top`` best of the union (an entry present twice counts once)."""
        parts = [self, *others]
        values = torch.cat([p.values for p in parts])
        logits = torch.cat([p.logits for p in parts])
        index = torch.cat([p.index for p in parts])
        order = ranking(values, logits, index)
        index_sorted = index[order]
        # equal flat indices have equal values and logits, so duplicates sit next to each other
        fresh = torch.ones_like(index_sorted, dtype=torch.bool)
        fresh[1:] = index_sorted[1:] != index_sorted[:-1]
        keep = order[fresh][:top]
        return TopEntries(values[keep], logits[keep], index[keep])


@dataclass
class LastTokenTop:
    """For each last context token t: the best ``m`` entries of rows ending in t.

    For a pair table (z1, z2 → z3) this is the summary per z2: which earlier tokens z1 and next
    tokens z3 the path ranks highest when the current token is z2. Slots not yet filled hold
    value −inf and index −1. [vocab, m] tensors, so the summary of a V² table costs V·m entries.
    """

    values: torch.Tensor
    logits: torch.Tensor
    index: torch.Tensor

    @classmethod
    def empty(cls, vocab: int, m: int) -> LastTokenTop:
        return cls(torch.full((vocab, m), -torch.inf), torch.full((vocab, m), -torch.inf),
                   torch.full((vocab, m), -1, dtype=torch.long))

    @property
    def m(self) -> int:
        return int(self.values.shape[1])

    def add(self, last: torch.Tensor, values: torch.Tensor, logits: torch.Tensor,
            index: torch.Tensor) -> None:
        """Merge each row's candidates ([rows, m]) into the summary of its last token ``last``
        [rows]; rows sharing a last token are merged in rounds of distinct tokens."""
        order = torch.argsort(last, stable=True)
        tokens = last[order]
        occurrence = torch.arange(len(tokens)) - torch.searchsorted(tokens, tokens)
        for round_ in range(int(occurrence.max()) + 1 if len(tokens) else 0):
            rows = order[occurrence == round_]
            token = last[rows]
            merged = best_per_row(torch.cat([self.values[token], values[rows]], 1),
                                  torch.cat([self.logits[token], logits[rows]], 1),
                                  torch.cat([self.index[token], index[rows]], 1), self.m)
            self.values[token], self.logits[token], self.index[token] = merged

    def merged(self, others: list[LastTokenTop]) -> LastTokenTop:
        parts = [self, *others]
        return LastTokenTop(*best_per_row(torch.cat([p.values for p in parts], 1),
                                          torch.cat([p.logits for p in parts], 1),
                                          torch.cat([p.index for p in parts], 1), self.m))


def best_per_row(values: torch.Tensor, logits: torch.Tensor, index: torch.Tensor, m: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first ``m`` entries of each row in the table order, duplicates (same flat index)
    dropped; empty slots (index −1) sort last."""

    def ordered(v, lg, ix):
        order = torch.argsort(torch.where(ix < 0, torch.iinfo(torch.long).max, ix), dim=1)
        for key in (lg, v):
            order = order.gather(1, torch.argsort(key.gather(1, order), dim=1, descending=True, stable=True))
        return v.gather(1, order), lg.gather(1, order), ix.gather(1, order)

    values, logits, index = ordered(values, logits, index)
    repeated = torch.zeros_like(index, dtype=torch.bool)
    repeated[:, 1:] = (index[:, 1:] == index[:, :-1]) & (index[:, 1:] >= 0)
    if repeated.any():
        values = values.masked_fill(repeated, -torch.inf)
        logits = logits.masked_fill(repeated, -torch.inf)
        index = index.masked_fill(repeated, -1)
        values, logits, index = ordered(values, logits, index)
    return values[:, :m].contiguous(), logits[:, :m].contiguous(), index[:, :m].contiguous()


class RowPool:
    """One preallocated buffer per per-row field for the chunks a run will compute; each chunk's
    results are views into it.

    Thousands of small tensors kept per chunk, allocated between the chunk's large transient
    buffers, fragment the heap: RSS grew by a chunk's logits (8 MB) per chunk on TinyStories'
    pair table, 24 GB before it was stopped. Views share their buffer's storage, so
    ``torch.save`` writes each buffer once.
    """

    def __init__(self, rows: int, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        self.buffers = {name: torch.empty((rows, *trailing), dtype=dtype)
                        for name, (trailing, dtype) in shapes.items()}
        self.used = 0

    def put(self, results: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copy one chunk's per-row ``results`` into the buffers; their views."""
        if not results:
            return {}
        count = len(next(iter(results.values())))
        views = {}
        for name, value in results.items():
            view = self.buffers[name][self.used:self.used + count]
            view.copy_(value)
            views[name] = view
        self.used += count
        return views


@dataclass
class TableState:
    """What a run (or one rank of it) has reduced: the chunks done, the global top entries,
    per-row results by chunk and the per-last-token summary."""

    key: str
    top: TopEntries = field(default_factory=TopEntries)
    rows: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    last: LastTokenTop | None = None
    done: set[int] = field(default_factory=set)

    def absorb(self, others: list[TableState], top: int) -> None:
        """Take the union with ``others`` (states of the same table)."""
        for other in others:
            if other.key != self.key:
                raise ValueError("cannot merge the states of two different tables")
            self.done |= other.done
            self.rows.update(other.rows)
        self.top = self.top.merged([o.top for o in others], top)
        if self.last is not None:
            self.last = self.last.merged([o.last for o in others if o.last is not None])

    def payload(self) -> dict:
        last = None if self.last is None else (self.last.values, self.last.logits, self.last.index)
        return {"format": CHECKPOINT_FORMAT, "key": self.key, "done": sorted(self.done), "rows": self.rows,
                "top": (self.top.values, self.top.logits, self.top.index), "last": last}

    def save(self, path: Path) -> None:
        """Written whole or not at all (a killed process leaves the previous checkpoint)."""
        payload = self.payload()
        atomic_write(path, lambda name: torch.save(payload, name))

    @classmethod
    def load(cls, path: Path, key: str) -> TableState:
        """A checkpoint of the table with this ``key``; any other file is refused in one line."""
        try:
            saved = torch.load(path, weights_only=True)  # tensors and plain containers: no code runs
        except Exception as exc:  # a truncated or foreign file
            raise ValueError(f"checkpoint {path} cannot be read ({type(exc).__name__}): "
                             "delete it to start again") from exc
        if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint {path} was written by another version of jetgraph's n-gram "
                             "sweep: delete it to start again")
        if saved.get("key") != key:
            raise ValueError(f"checkpoint {path} belongs to another table (different path, contexts or "
                             "options): delete it or choose another file")
        last = None if saved["last"] is None else LastTokenTop(*saved["last"])
        return cls(key, TopEntries(*saved["top"]), saved["rows"], last, set(saved["done"]))

    def packed_rows(self) -> tuple[list[int], list[int], dict[str, torch.Tensor]]:
        """(chunks, their row counts, each field's rows concatenated in that order): what a
        collective sends. Pickling the per-chunk views themselves would send their whole pool
        buffer once per view (pickle does not share storages between tensors as torch.save
        does): 32 GB for TinyStories' pair table."""
        chunks = sorted(c for c, fields in self.rows.items() if fields)
        if not chunks:
            return [], [], {}
        names = list(self.rows[chunks[0]])
        sizes = [len(self.rows[c][names[0]]) for c in chunks]
        return chunks, sizes, {n: torch.cat([self.rows[c][n] for c in chunks]) for n in names}

    @staticmethod
    def unpacked_rows(chunks: list[int], sizes: list[int], fields: dict[str, torch.Tensor]
                      ) -> dict[int, dict[str, torch.Tensor]]:
        """The inverse of :meth:`packed_rows`: per-chunk views of the concatenated fields."""
        rows: dict[int, dict[str, torch.Tensor]] = {}
        start = 0
        for chunk, size in zip(chunks, sizes, strict=True):
            rows[chunk] = {name: value[start:start + size] for name, value in fields.items()}
            start += size
        return rows

    def joined_rows(self, chunks: int) -> dict[str, torch.Tensor | None]:
        """Per-row results of every chunk, concatenated in row order (all chunks must be done)."""
        missing = sorted(set(range(chunks)) - self.done)
        if missing:
            raise ValueError(f"{len(missing)} chunk(s) of the table are not done (first: {missing[0]})")
        result: dict[str, torch.Tensor | None] = {}
        for name in ROW_FIELDS:
            parts = [self.rows[c][name] for c in range(chunks) if name in self.rows.get(c, {})]
            result[name] = torch.cat(parts) if parts else None
        return result
