"""What a roles study returns: each path's score, each intervention's effect, and the report
that prints, plots and writes them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from jetgraph.applications.ngrams.mixture import FirstTokens
from jetgraph.applications.targets import TargetSet, token_label
from jetgraph.files import atomic_write

METHODS = ("zero", "mean", "term")
METHOD_NAMES = {"zero": "zero-ablation", "mean": "mean-ablation", "term": "path terms removed"}
FOCUS = 16  # source tokens a path's score averages over: those it writes the targets after most


@dataclass
class PathScore:
    """One bigram path's score for the targets, and its best (source, target) entries."""

    path: str
    units: tuple[str, ...]
    score: float
    top: list[tuple[int, int, float]] = field(default_factory=list)  # (source, target, centred logit)
    joint: float | None = None  # pairs: the score of all paths inside the pair
    mean: float = 0.0  # the centred target logit averaged over every source token


@dataclass(frozen=True)
class Effect:
    """ΔLogit of the targets under one intervention on some units, over the target positions."""

    units: tuple[str, ...]
    method: str
    mean: float
    low: float
    high: float
    positions: int
    logprob: float  # mean change of the target's log-probability
    others: float | None = None  # mean ΔLogit of the next token at other positions (not followed by a target)


@dataclass
class RoleReport:
    """The ranking of units and pairs for one target set, and the interventions that check it."""

    targets: TargetSet
    rows: int
    singles: list[PathScore]
    pairs: list[PathScore]
    reference: PathScore  # E→U: the embedding decoded directly, for scale
    effects: list[Effect] = field(default_factory=list)
    positions: int = 0  # target positions in the verification text
    controls: int = 0  # other positions the interventions were measured at (Effect.others)
    start: str = "embedding"  # where the paths begin: the token embedding E, or the unit's own input state
    first_tokens: FirstTokens | None = None  # what the stream-start paths read before each source

    def paths_inside(self, units: Sequence[str]) -> list[str]:
        """The ranked paths inside a unit set: each unit's own, and for a pair the path through both."""
        by_units = {s.units: s.path for s in self.singles + self.pairs}
        wanted = [(u,) for u in units] + ([tuple(units)] if len(units) == 2 else [])
        missing = [w for w in wanted if w not in by_units]
        if missing:
            raise ValueError(f"no ranked path through {'+'.join(missing[0])}: rank it first (a pair needs "
                             "both units among unit_roles' pairs)")
        return [by_units[w] for w in wanted]

    def effect(self, units: Sequence[str], method: str) -> Effect | None:
        for effect in self.effects:
            if effect.units == tuple(units) and effect.method == method:
                return effect
        return None

    def best(self) -> PathScore:
        return self.singles[0]

    def rank_agreement(self, method: str = "zero") -> float | None:
        """Spearman correlation over the single units between the data-free score and the
        negated ΔLogit of ``method`` (1: the ranking predicts the interventions' order)."""
        pairs = [(s.score, -e.mean) for s in self.singles if (e := self.effect(s.units, method))]
        if len(pairs) < 3:
            return None
        a, b = (torch.tensor(v, dtype=torch.double) for v in zip(*pairs, strict=True))
        ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
        ra, rb = ra - ra.mean(), rb - rb.mean()
        denominator = float(ra.norm() * rb.norm())
        return float(ra @ rb) / denominator if denominator else None

    def unranked(self) -> list[tuple[str, ...]]:
        """The unit sets that were ablated but have no ranked path (attention units), in order."""
        ranked = {s.units for s in self.singles + self.pairs}
        return list(dict.fromkeys(e.units for e in self.effects if e.units not in ranked))

    def rows_out(self, tokenizer=None) -> list[dict]:
        """One row per ranked path (singles, then pairs), then one per unranked unit set that
        was ablated, with every intervention's ΔLogit."""
        out = []
        for kind, scores in (("unit", self.singles), ("pair", self.pairs)):
            for rank, s in enumerate(scores, 1):
                row: dict = {"kind": kind, "rank": rank, "units": "+".join(s.units), "path": s.path,
                             "score": round(s.score, 6), "mean": round(s.mean, 6)}
                if s.joint is not None:
                    row["joint"] = round(s.joint, 6)
                self._effect_cells(row, s.units)
                row["top_bigrams"] = " | ".join(_bigram(tokenizer, z, t) for z, t, _ in s.top[:3])
                out.append(row)
        for units in self.unranked():
            row = {"kind": "unranked", "rank": None, "units": "+".join(units), "path": None,
                   "score": None, "mean": None}
            out.append(self._effect_cells(row, units))
        return out

    def _effect_cells(self, row: dict, units: tuple[str, ...]) -> dict:
        for method in METHODS:
            e = self.effect(units, method)
            row[f"dlogit_{method}"] = None if e is None else round(e.mean, 6)
            row[f"dlogit_{method}_low"] = None if e is None else round(e.low, 6)
            row[f"dlogit_{method}_high"] = None if e is None else round(e.high, 6)
            row[f"dlogit_{method}_others"] = None if e is None or e.others is None else round(e.others, 6)
        return row

    def write_csv(self, path: str | Path, tokenizer=None) -> Path:
        import csv
        import io

        rows = self.rows_out(tokenizer)
        buffer = io.StringIO(newline="")
        fields: list[str] = []
        for row in rows:
            fields += [k for k in row if k not in fields]
        writer = csv.DictWriter(buffer, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        return atomic_write(path, buffer.getvalue())

    def table(self, tokenizer=None, shown: int = 10) -> str:
        """A text table: the top units and pairs, their scores and ΔLogits with intervals."""
        lines = [f"targets: {self.targets.describe(tokenizer)}",
                 f"score: a path's centred target logit, averaged over the {FOCUS} of {self.rows:,} source "
                 f"tokens it lifts the targets after most (E→U: {self.reference.score:+.2f}); ΔLogit: "
                 f"edited − clean centred target logit at {self.positions:,} target positions of the text, "
                 "95% bootstrap interval; in parentheses the same intervention's ΔLogit of the next token "
                 f"at {self.controls:,} other positions (what it costs every token)"]
        head = f"  {'path':24s} {'score':>8s}" + "".join(f" {METHOD_NAMES[m]:>31s}" for m in METHODS)
        for title, scores in (("units", self.singles[:shown]), ("pairs (E→i→j→U; joint = all paths inside)",
                                                                self.pairs[:shown])):
            if not scores:
                continue
            lines += ["", title, head]
            for s in scores:
                cells = ""
                for method in METHODS:
                    e = self.effect(s.units, method)
                    cells += f" {_interval(e):>31s}"
                joint = f" (joint {s.joint:+.2f})" if s.joint is not None else ""
                lines.append(f"  {s.path:24s} {s.score:+8.3f}{cells}{joint}  "
                             + ", ".join(_bigram(tokenizer, z, t) for z, t, _ in s.top[:2]))
        unranked = self.unranked()
        if unranked:
            lines += ["", "not ranked (no bigram path through attention), ablated", head]
            for units in unranked:
                cells = "".join(f" {_interval(self.effect(units, m)):>31s}" for m in METHODS)
                lines.append(f"  {'+'.join(units):24s} {'—':>8s}{cells}")
        agreement = self.rank_agreement()
        if agreement is not None:
            lines.append("\nrank agreement of score and zero-ablation ΔLogit (Spearman, units): "
                         f"{agreement:+.2f}")
        return "\n".join(lines)


def _interval(effect: Effect | None) -> str:
    """``−11.31 [−12.40, −10.24] (−9.53)``: ΔLogit, its interval, and ΔLogit at the other positions."""
    if effect is None:
        return "—"
    others = "" if effect.others is None else f" ({effect.others:+.2f})"
    return f"{effect.mean:+.2f} [{effect.low:+.2f}, {effect.high:+.2f}]{others}"


def _bigram(tokenizer, source: int, target: int) -> str:
    if tokenizer is None:
        return f"{source}→{target}"
    return f"{token_label(tokenizer, source)!r}→{token_label(tokenizer, target)!r}"
