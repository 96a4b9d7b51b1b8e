"""Model diffs: how one bigram read-out changes from model A to model B (same vocabulary), and
a count-based diff of two corpora to score it against.

Both models are read with the same read-out (default: each model's own next-token distribution
after each token, averaged over the first tokens *that model* expects), row by row over the
same source tokens. Entries are ranked by the change of probability p_B − p_A, or by the
log-ratio log p_B − log p_A among entries where either model gives at least ``min_prob``
(without that floor the log-ratio ranks noise between tiny probabilities first).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from jetgraph.applications.ngrams.convention import InputConvention
from jetgraph.applications.ngrams.readout import DEFAULT_READOUT, RowReader
from jetgraph.applications.targets import token_label
from jetgraph.files import atomic_write
from jetgraph.ir import ResidualProgram

RANKS = ("prob", "log_ratio")


@dataclass
class ModelDiff:
    """The ``top`` largest increases and decreases of one read-out, as (context, next, p_A, p_B)."""

    name_a: str
    name_b: str
    readout: str
    rank: str
    rows: int
    increase: list[tuple[int, int, float, float]]
    decrease: list[tuple[int, int, float, float]]

    def entries(self, direction: str = "increase", tokenizer=None) -> list[dict]:
        if direction not in ("increase", "decrease"):
            raise ValueError(f"direction is 'increase' or 'decrease', got {direction!r}")
        out = []
        for rank, (context, token, pa, pb) in enumerate(getattr(self, direction), 1):
            row: dict = {"direction": direction, "rank": rank, "context": context, "next": token}
            if tokenizer is not None:
                row["context_text"] = token_label(tokenizer, context)
                row["next_text"] = token_label(tokenizer, token)
            row |= {"p_a": pa, "p_b": pb, "delta": pb - pa,
                    "log_ratio": math.log(max(pb, 1e-300)) - math.log(max(pa, 1e-300))}
            out.append(row)
        return out

    def pairs(self, direction: str = "increase") -> list[tuple[int, int]]:
        return [(c, t) for c, t, _, _ in getattr(self, direction)]

    def write_csv(self, path: str | Path, tokenizer=None) -> Path:
        rows = self.entries("increase", tokenizer) + self.entries("decrease", tokenizer)
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["direction"])
        writer.writeheader()
        writer.writerows(rows)
        return atomic_write(path, buffer.getvalue())

    def table(self, tokenizer=None, shown: int = 10) -> str:
        lines = [f"{self.readout}, {self.rows:,} source tokens, ranked by {self.rank}: "
                 f"{self.name_a} → {self.name_b}"]
        for direction in ("increase", "decrease"):
            head = f"  {'bigram':34s} {'p_A':>8s} {'p_B':>8s} {'log-ratio':>10s}"
            lines += ["", f"largest {direction}s", head]
            for e in self.entries(direction, tokenizer)[:shown]:
                name = (f"{e['context_text']!r}→{e['next_text']!r}" if tokenizer is not None
                        else f"{e['context']}→{e['next']}")
                lines.append(f"  {name:34s} {e['p_a']:8.4f} {e['p_b']:8.4f} {e['log_ratio']:+10.2f}")
        return "\n".join(lines)


def model_diff(prog_a: ResidualProgram, prog_b: ResidualProgram, path: str = DEFAULT_READOUT,
               top: int = 50, rows: Sequence[int] | None = None,
               first_tokens: int | None = None, rank: str = "prob",
               min_prob: float = 1e-3, chunk: int = 1024, names: tuple[str, str] = ("A", "B"),
               progress: bool = True, *,
               convention: InputConvention | Sequence[int] | None = None) -> ModelDiff:
    """The ranked changes of one read-out from model A to model B (module docstring); ``rows``:
    the source tokens (default every token)."""
    if rank not in RANKS:
        raise ValueError(f"unknown rank {rank!r}; choose from {', '.join(RANKS)}")
    vocab_a, vocab_b = (int(p.decoder.unembedding.shape[0]) for p in (prog_a, prog_b))
    if vocab_a != vocab_b:
        raise ValueError(f"the models' vocabularies differ ({vocab_a:,} vs {vocab_b:,} tokens): a diff needs "
                         "the same vocabulary")
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    sources = torch.arange(vocab_a) if rows is None else torch.as_tensor(list(rows), dtype=torch.long)
    readers = [RowReader(p, path, first_tokens, convention=convention, chunk=chunk) for p in (prog_a, prog_b)]
    if readers[0].length != 1:
        raise ValueError(f"the path {path!r} reads {readers[0].length} tokens: a diff reads bigram rows "
                         "(one context token)")
    step = readers[0].chunk
    best = {d: (torch.empty(0, dtype=torch.double), torch.empty(0, dtype=torch.long), torch.empty(0, 2))
            for d in ("increase", "decrease")}
    for start in tqdm(range(0, len(sources), step), desc="diff", disable=not progress, leave=False):
        part = sources[start:start + step]
        la, lb = (reader(part) for reader in readers)
        pa, pb = la.exp(), lb.exp()
        if rank == "prob":
            change = pb - pa
        else:
            change = (lb - la).masked_fill(torch.maximum(pa, pb) < min_prob, 0.0)
        for direction, sign in (("increase", 1.0), ("decrease", -1.0)):
            values, flat = (sign * change).flatten().topk(min(top, change.numel()))
            probs = torch.stack([pa.flatten()[flat], pb.flatten()[flat]], 1).float()
            merged = [torch.cat([old, new]) for old, new in
                      zip(best[direction], (values, flat + start * vocab_a, probs), strict=True)]
            keep = merged[0].topk(min(top, merged[0].numel())).indices
            best[direction] = tuple(m[keep] for m in merged)
    result = {}
    for direction, (_, flat, probs) in best.items():
        result[direction] = [(int(sources[f // vocab_a]), f % vocab_a, float(p[0]), float(p[1]))
                             for f, p in zip(flat.tolist(), probs, strict=True)]
    return ModelDiff(names[0], names[1], readers[0].describe(), rank, len(sources),
                     result["increase"], result["decrease"])


def corpus_diff(base_ids: torch.Tensor, tuned_ids: torch.Tensor, vocab: int, top: int = 500,
                min_count: int = 5, alpha: float = 0.5) -> list[tuple[int, int]]:
    """The bigrams most over-represented in the second corpus: ranked by the log-ratio of their
    smoothed joint frequencies, log((c₂ + α)/N₂) − log((c₁ + α)/N₁), among bigrams seen at
    least ``min_count`` times in the second corpus."""
    counts = []
    for ids in (base_ids, tuned_ids):
        ids = torch.as_tensor(ids).reshape(-1).long()
        counts.append(torch.bincount(ids[:-1] * vocab + ids[1:], minlength=vocab * vocab).double())
    base, tuned = counts
    score = ((tuned + alpha) / tuned.sum()).log() - ((base + alpha) / base.sum()).log()
    score = score.masked_fill(tuned < min_count, -math.inf)
    count = min(top, int((tuned >= min_count).sum()))
    flat = score.topk(count).indices.tolist()
    return [divmod(f, vocab) for f in flat]


def precision_at(found: Sequence[tuple[int, int]], reference: Sequence[tuple[int, int]],
                 k: int = 50) -> float:
    """The share of the first ``k`` found bigrams that are in the reference set."""
    if not found:
        raise ValueError("no bigrams to score")
    wanted = set(map(tuple, reference))
    head = list(found)[:k]
    return sum(tuple(pair) in wanted for pair in head) / len(head)
