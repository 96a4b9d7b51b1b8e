"""Component roles: which units write a set of target tokens, read from the bigram paths and
checked by interventions on real text.

**Ranking (data-free).** Every MLP unit u has the order-0 bigram path ``E→u→U``: the token's
embedding through u alone, decoded. For a target set T its centred target logit after a source
token z is

    c(z) = mean_{t∈T} [ℓ(z, t) − mean_v ℓ(z, v)],

how far the path lifts the targets above the average token (softmax ignores a shift shared by
all tokens). A path's **score** is c averaged over the 16 source tokens it lifts the targets
after most: a role is "writes the target after these tokens", and averaging over every token
would bury a rule with few triggers under the path's token-independent bias (``mean`` keeps
that average too). A pair of units (i before j) has the path ``E→i→j→U``, which exists only
when both do: its score is the pair's cooperation; ``joint`` adds the two single paths' scores.
``start="stream"`` reads each unit at its own input state on a one-token context instead
(``h_k→u→U``), which sees what earlier units wrote.

**Verification (on real text).** At every position whose next token is a target, the target's
centred logit is measured on the model and again with the unit (or both units of a pair)

- zero-ablated: its update γ(h) replaced by 0;
- mean-ablated: replaced by its mean over every real position of the text;
- with its path terms removed from the expansion: logits minus the unit's bigram path terms at
  that position's token (for a pair, the three paths inside it), the data-free prediction.

Each is reported as ΔLogit (edited minus clean, centred logits) with a bootstrap interval over
the positions, and beside it the same intervention's ΔLogit of the next token at other
positions of the text (``Effect.others``): an early unit that every token needs costs the
targets many logits when removed and every other token almost as many, which is damage, not a
role. Bigram paths are the paths through no attention unit (the paper's definition:
attention is the only unit that mixes positions, so a path that avoids it reads one token), so
attention units are not ranked; ``verify_roles(..., attention=True)`` ablates them too (zero and
mean), to show what the ranking cannot see.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from jetgraph.applications.ngrams.convention import InputConvention, input_convention
from jetgraph.applications.ngrams.mixture import FirstTokens
from jetgraph.applications.ngrams.reader import path_reader
from jetgraph.applications.ngrams.readout import readout_prefixes
from jetgraph.applications.ngrams.sources import common_tokens
from jetgraph.applications.statistics import bootstrap_mean
from jetgraph.applications.targets import TargetSet, token_label
from jetgraph.cost import Plan, estimate_seconds, gemm_rate
from jetgraph.files import atomic_write
from jetgraph.ir import ResidualProgram
from jetgraph.passes.pathspec import format_path, parse_path

METHODS = ("zero", "mean", "term")
METHOD_NAMES = {"zero": "zero-ablation", "mean": "mean-ablation", "term": "path terms removed"}
STARTS = ("embedding", "stream")
FOCUS = 16  # source tokens a path's score averages over: those it writes the targets after most
SAMPLED_ROWS = 4096  # source tokens scored when the vocabulary is larger than FULL_ROWS
FULL_ROWS = 8192
CONTROLS = 1024  # other positions of the text where each intervention is measured too
LOGITS_PER_CALL = 1 << 24  # [rows, V] logits one path call (and one block of positions) holds at most
LOGITS_PER_BATCH = 1 << 26  # [batch, length, V] logits one forward of the interventions returns at most


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


# ------------------------------------------------------------------ data-free ranking
def mlp_units(prog: ResidualProgram) -> list[str]:
    """The units with a bigram path: every MLP unit of the sublayer view, in execution order."""
    units = [u.name for u in prog.at("sublayer").units if u.kind == "mlp"]
    if not units:
        raise ValueError("this model has no MLP unit, so no bigram path through a unit: nothing to rank")
    return units


def default_rows(vocab: int) -> int:
    """How many source tokens scores average over by default: every token up to 8192, else 4096."""
    return vocab if vocab <= FULL_ROWS else SAMPLED_ROWS


def source_rows(prog: ResidualProgram, rows: int | Sequence[int] | None = None, *,
                convention: InputConvention | Sequence[int] | None = None, tokenizer: object = None,
                chunk: int = 1024) -> torch.Tensor:
    """The source tokens scores average over: every token (vocabularies up to 8192), else the 4096
    the model itself predicts most (:func:`~jetgraph.applications.ngrams.common_tokens`: its mean
    next-token prediction under the input convention, without special, unused and byte tokens);
    an int asks for that many, a sequence for those ids."""
    vocab = int(prog.decoder.unembedding.shape[0])
    if rows is None:
        rows = default_rows(vocab)
    if isinstance(rows, int):
        if rows < 1:
            raise ValueError(f"rows must be at least 1, got {rows}")
        if rows >= vocab:
            return torch.arange(vocab)
        resolved = input_convention(convention, tokenizer, vocab)
        return torch.tensor(common_tokens(prog, rows, resolved, tokenizer, chunk), dtype=torch.long)
    ids = torch.as_tensor(list(rows), dtype=torch.long)
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"source rows must be token ids in [0, {vocab}), at least one")
    return ids


def role_plan(prog: ResidualProgram, rows: int, pairs: int = 6, windows: int = 0, length: int = 0, *,
              targets_at: int | None = None, attention: bool = False, methods: Sequence[str] = METHODS,
              batch: int = 8, chunk: int = 1024, start: str = "embedding", prefixes: int = 1,
              prefix_length: int = 1, samples: int = 1000, sampling: float | None = None) -> list[Plan]:
    """The phases of :func:`unit_roles` and :func:`verify_roles` with these arguments, each an
    upper bound of its time and of its peak memory above the loaded model (print them with
    :func:`jetgraph.cost.format_plan`):

    - sampling the text, when ``sampling`` (seconds per sampled token, measured) is given:
      ``windows`` texts of ``length`` tokens, 64 at a time (a key-value cache and [64, V] logits);
    - ranking the paths over ``rows`` source tokens, [block, V] float64 logits at a time (a
      stream-start path reads ``prefixes`` sequences of ``prefix_length`` tokens before each);
    - the interventions on ``windows`` sequences of ``length`` tokens: one forward per unit
      set and method (and a clean one, and one for the means), each holding a batch's
      [batch, length, V] logits and one block of positions' float64 logits (for "term", the
      block's path logits too), then the bootstrap's [samples, targets] draws. ``targets_at``:
      the text's target positions when known (else every position may be one).
    """
    view = prog.at("sublayer")
    vocab, d = (int(n) for n in prog.decoder.unembedding.shape)
    units = mlp_units(prog)
    mlp = max(u.num_parameters for u in view.units if u.kind == "mlp")
    attn = [u for u in view.units if u.kind == "attn"]
    attn_width = max((u.num_parameters for u in attn), default=0) / d  # ≥ heads × head size
    width = max(mlp / d, attn_width, d)  # the widest activation per token
    decode = 2.0 * vocab * d
    mixing = 4.0 * length * attn_width * len(attn)  # attention scores and their weighted sum
    per_token = 2.0 * sum(u.num_parameters for u in view.units) + decode + mixing
    dtype, device = prog.decoder.unembedding.dtype, prog.decoder.unembedding.device
    rate = gemm_rate(dtype, device)
    step = block_rows(vocab, chunk)
    stream = start == "stream"
    context = prefix_length + 1 if stream else 1
    # one path row: its units (at most two) and the decoder; from a stream state, the whole
    # model on the context first, for every prefix
    path_row = (max(1, prefixes) * (context * (per_token - decode) + decode) if stream
                else decode + 2 * 2.0 * mlp)
    # small ops dispatched (what a tiny model's time is made of): a forward runs every unit's
    # graph and the decoder's; a path call a schedule and its units (from a stream state, the
    # model before them) and the decoder
    forward_ops = sum(u.op_count for u in view.units) + prog.decoder.op_count + 10
    mlp_ops = max(u.op_count for u in view.units if u.kind == "mlp")
    path_ops = 50 + prog.decoder.op_count + (2 * forward_ops if stream else 2 * mlp_ops)
    phases = []

    if sampling is not None and windows:
        at_once = min(windows, 64)
        cache = at_once * length * len(attn) * 2 * attn_width * 4
        peak = cache + at_once * vocab * 4 * 8 + at_once * width * 4 * 8
        phases.append(Plan("sampling the text", windows * length, "sampled tokens",
                           windows * length * per_token, peak, windows * length * sampling, rate))

    paths = len(units) + 1 + math.comb(min(pairs, len(units)), 2)
    blocks = paths * math.ceil(rows / step) * max(1, prefixes if stream else 1)
    held = min(step, rows)  # source rows whose logits are held at once
    ranking_peak = held * vocab * (48 if stream else 24) + held * context * width * 4 * 4
    phases.append(Plan(f"ranking {paths} paths", paths * rows, "path rows", paths * rows * path_row,
                       ranking_peak, estimate_seconds(paths * rows * path_row, paths * rows * vocab * 6.0,
                                                      dtype=dtype, device=device, ops=blocks * path_ops),
                       rate, paths * rows * vocab * 6.0))

    if windows and length >= 2:
        every = windows * (length - 1)
        targets = every if targets_at is None else min(targets_at, every)
        measured = min(every, targets + CONTROLS)
        pair_sets = min(3, math.comb(min(pairs, len(units)), 2))
        sets = len(units) + pair_sets + (len(attn) if attention else 0)
        ablations = [m for m in methods if m != "term"]
        term = "term" in methods
        forwards = 1 + ("mean" in methods) + sets * len(ablations)
        with_terms = (len(units) + pair_sets) if term else 0
        term_paths = (len(units) + 3 * pair_sets) if term else 0
        tokens = windows * length
        flops = forwards * tokens * per_token + measured * term_paths * path_row
        effects = sets * len(ablations) + with_terms
        elements = (forwards * tokens * vocab * 2.0 + forwards * measured * vocab * 8.0
                    + measured * (term_paths * 4.0 + with_terms * 8.0) * vocab
                    + effects * samples * targets * 4.0)
        fitting = forward_batch(batch, length, vocab)
        batches = math.ceil(windows / fitting)
        blocks = batches * math.ceil(measured / batches / step + 1)  # of positions, per forward
        ops = (forwards * (batches * forward_ops + blocks * 10) + blocks * term_paths * path_ops
               + effects * 20)
        logits = fitting * length * vocab * 4.0
        activations = fitting * length * (width * 4 * 8 + length * attn_width / 8 * 4 * 3)
        block = min(step, fitting * (length - 1), measured) * vocab * (40 if term else 16)
        peak = max(2 * logits + activations, logits + block, 16.0 * samples * targets)
        phases.append(Plan(f"interventions ({forwards} forward passes)", forwards * tokens, "token passes",
                           flops, peak, estimate_seconds(flops, elements, 0.0, dtype, device, ops), rate,
                           elements))
    return phases


def block_rows(vocab: int, chunk: int = 1024) -> int:
    """Rows of a path's [rows, V] logits computed (and reduced) at once: at most ``chunk`` and
    at most 16M logits."""
    return max(1, min(chunk, LOGITS_PER_CALL // vocab))


@torch.no_grad()
def path_logits(prog: ResidualProgram, path: str, sources: torch.Tensor,
                first_tokens: FirstTokens | None = None, chunk: int = 1024) -> torch.Tensor:
    """A path's logits [n, V] (float64) on each source token: read alone, or (``first_tokens``,
    for a path from a stream state) read after each sequence, the *logits* averaged with the
    weights (:meth:`~jetgraph.applications.ngrams.reader.PathReader.mean_logits`)."""
    sources = sources.view(-1, 1)
    reader = path_reader(prog, path, first_tokens)
    step = block_rows(reader.vocab, chunk)  # at most 16M logits per call
    return torch.cat([reader.mean_logits(sources[i:i + step]) for i in range(0, len(sources), step)])


def path_target_scores(prog: ResidualProgram, path: str, targets: Sequence[int], rows: torch.Tensor,
                       chunk: int = 1024, top: int = 5, first_tokens: FirstTokens | None = None,
                       focus: int = FOCUS) -> PathScore:
    """One path's score (its centred target logit averaged over the ``focus`` source tokens it
    writes the targets after most; ``mean``: over all ``rows``) and its best entries."""
    target_index = torch.as_tensor(list(targets), dtype=torch.long)
    per_row, best_v, best_i = [], torch.empty(0), torch.empty(0, dtype=torch.long)
    step = block_rows(int(prog.decoder.unembedding.shape[0]), chunk)  # [step, V] float64 at a time
    for start in range(0, len(rows), step):
        part = rows[start:start + step]
        logits = path_logits(prog, path, part, first_tokens, chunk)
        centred = logits[:, target_index] - logits.mean(-1, keepdim=True)
        per_row.append(centred.mean(-1))
        values, flat = centred.flatten().topk(min(top, centred.numel()))
        best_v, best_i = torch.cat([best_v, values]), torch.cat([best_i, flat + start * len(target_index)])
        keep = best_v.topk(min(top, best_v.numel())).indices
        best_v, best_i = best_v[keep], best_i[keep]
    entries = [(int(rows[f // len(target_index)]), int(target_index[f % len(target_index)]), float(v))
               for v, f in zip(best_v.tolist(), best_i.tolist(), strict=True)]
    units = parse_path(path).units
    rows_score = torch.cat(per_row)
    focused = rows_score.topk(min(focus, len(rows_score))).values.mean()
    return PathScore(path, units, float(focused), entries, mean=float(rows_score.mean()))


def unit_roles(prog: ResidualProgram, targets: TargetSet | Sequence[int],
               rows: int | Sequence[int] | None = None, pairs: int = 6,
               chunk: int = 1024, progress: bool = True, start: str = "embedding",
               first_tokens: int = 0,
               convention: InputConvention | Sequence[int] | None = None,
               tokenizer: object = None) -> RoleReport:
    """Rank every MLP unit (and every pair among the ``pairs`` best) by its bigram path's score
    for ``targets`` (module docstring). Data-free: reads the weights only.

    ``start="embedding"``: the paper's bigram paths E→u→U. ``start="stream"``: each unit read at
    its own input state on a one-token context, h_k→u→U (k: the state u reads), which sees what
    the units before u wrote, read after the input ``convention``'s prefix (its BOS; required for
    this start, :mod:`jetgraph.applications.ngrams.convention`); with ``first_tokens`` M > 0 also
    after each of the M first tokens a the model expects most, the logits averaged.

    ``rows``: the source tokens (:func:`source_rows`); a count below the vocabulary means the
    tokens the model predicts most, read under ``convention`` (or ``tokenizer``'s)."""
    if start not in STARTS:
        raise ValueError(f"unknown start {start!r}; choose from {', '.join(STARTS)}")
    if not isinstance(targets, TargetSet):
        targets = TargetSet(", ".join(map(str, targets)), tuple(sorted(set(int(t) for t in targets))))
    if not targets.ids:
        raise ValueError("the target set is empty")
    vocab = int(prog.decoder.unembedding.shape[0])
    if max(targets.ids) >= vocab or min(targets.ids) < 0:
        raise ValueError(f"target ids must lie in [0, {vocab})")
    units = mlp_units(prog)
    sources = source_rows(prog, rows, convention=convention, tokenizer=tokenizer, chunk=chunk)
    bar = tqdm(total=len(units) + 1 + math.comb(min(pairs, len(units)), 2), desc="roles: paths",
               disable=not progress, leave=False)

    prefix: FirstTokens | None = None
    if start == "stream":
        prefix = readout_prefixes(prog, input_convention(convention, tokenizer, vocab), first_tokens, chunk)
    reads = {u.name: u.reads for u in prog.at("sublayer").units}

    def begin(unit: str) -> str:
        return "E" if start == "embedding" else f"h{reads[unit]}"

    def score(path: str) -> PathScore:
        result = path_target_scores(prog, path, targets.ids, sources, chunk,
                                    first_tokens=None if path.startswith("E") else prefix)
        bar.update()
        return result

    reference = score("E→U")
    singles = sorted((score(format_path([begin(u), u, "U"])) for u in units), key=lambda s: -s.score)
    by_unit = {s.units[0]: s for s in singles}
    paired = sorted((s.units[0] for s in singles[:pairs]), key=units.index)
    pair_scores = []
    for first, second in itertools.combinations(paired, 2):
        s = score(format_path([begin(first), first, second, "U"]))
        s.joint = s.score + by_unit[first].score + by_unit[second].score
        pair_scores.append(s)
    bar.close()
    pair_scores.sort(key=lambda s: -s.score)
    return RoleReport(targets, len(sources), singles, pair_scores, reference, start=start,
                      first_tokens=prefix)


# ------------------------------------------------------------------ interventions on real text
def target_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     targets: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) of every real token whose next real token is a target."""
    ids = torch.as_tensor(input_ids)
    mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    is_target = torch.isin(ids[:, 1:], torch.as_tensor(list(targets)))
    hit = is_target & mask[:, 1:] & mask[:, :-1]
    return hit.nonzero(as_tuple=True)


def check_text(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               targets: TargetSet | Sequence[int]) -> int:
    """The number of positions of the text followed by a target; a one-line ValueError when
    there is none. Cheap: call it right after tokenizing, before :func:`unit_roles` (the CLI
    does; :func:`verify_roles` checks it again before any forward)."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    ids = ids.view(1, -1) if ids.dim() == 1 else ids
    spec = targets.spec if isinstance(targets, TargetSet) else ", ".join(map(str, targets))
    ids_of = targets.ids if isinstance(targets, TargetSet) else list(targets)
    if ids.shape[1] < 2:
        raise ValueError(f"the text is {ids.shape[1]} token long: it needs a position followed by a target "
                         f"({spec})")
    count = int(target_positions(ids, attention_mask, ids_of)[0].numel())
    if count == 0:
        raise ValueError(f"the text has no position followed by a target ({spec}): give text in which the "
                         "targets occur")
    return count


def control_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, targets: Sequence[int],
                      count: int = CONTROLS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) of up to ``count`` real tokens (a seeded sample) whose next real token is
    not a target: where an intervention's ΔLogit shows how much it hurts every token, not only
    the targets."""
    ids = torch.as_tensor(input_ids)
    mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    other = ~torch.isin(ids[:, 1:], torch.as_tensor(list(targets))) & mask[:, 1:] & mask[:, :-1]
    rows, positions = other.nonzero(as_tuple=True)
    if rows.numel() > count:
        generator = torch.Generator().manual_seed(seed)
        keep = torch.randperm(rows.numel(), generator=generator)[:count].sort().values
        rows, positions = rows[keep], positions[keep]
    return rows, positions


def unit_means(prog: ResidualProgram, units: Sequence[str], input_ids: torch.Tensor,
               attention_mask: torch.Tensor | None, batch: int = 8) -> dict[str, torch.Tensor]:
    """Each unit's update γ(h) averaged over every real position of the text (mean-ablation's
    replacement), from clean runs."""
    sums = {u: torch.zeros((), dtype=torch.double) for u in units}
    count = 0

    def recorder(name: str, mask: torch.Tensor):
        def record(update: torch.Tensor) -> torch.Tensor:
            sums[name] = sums[name] + (update.double() * mask[..., None]).sum((0, 1))
            return update
        return record

    with torch.no_grad():
        for start in range(0, input_ids.shape[0], batch):
            ids = input_ids[start:start + batch]
            mask = (torch.ones_like(ids) if attention_mask is None else attention_mask[start:start + batch])
            prog.intervene(ids, {u: recorder(u, mask.double()) for u in units}, mask)
            count += int(mask.sum())
    return {u: (s / count).to(prog.decoder.unembedding.dtype) for u, s in sums.items()}


def attention_units(prog: ResidualProgram) -> list[str]:
    """The units bigram paths avoid: every unit of the sublayer view whose update mixes positions
    (attention), in execution order."""
    return [u.name for u in prog.at("sublayer").units if u.kind == "attn"]


@torch.no_grad()
def verify_roles(prog: ResidualProgram, report: RoleReport, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, units: Sequence[Sequence[str]] | None = None,
                 methods: Sequence[str] = METHODS, batch: int = 8, samples: int = 1000,
                 progress: bool = True, attention: bool = False) -> RoleReport:
    """ΔLogit of the targets on real text when each unit set is ablated (``methods``: zero,
    mean, term). ``units``: the unit sets to check (default: every ranked unit and the three best
    pairs; with ``attention``, every attention unit too). A set with an attention unit has no
    bigram path, so it gets no "term" effect. Each intervention is measured at the target
    positions and at up to 1,024 other positions (``Effect.others``: what it costs every token).
    Fills ``report.effects`` and returns the report. The text is checked first
    (:func:`check_text`). Memory stays O(batch × V): ``batch`` sequences per forward (fewer when
    their logits would pass 256 MB, :func:`forward_batch`) and one block of positions' float64
    logits at a time (:func:`block_rows`); its cost is :func:`role_plan`'s last phase."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown intervention {unknown[0]!r}; choose from {', '.join(METHODS)}")
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    ids = ids.view(1, -1) if ids.dim() == 1 else ids
    mask = attention_mask
    check_text(ids, mask, report.targets)
    rows, positions = target_positions(ids, mask, report.targets.ids)
    targets_at = rows.numel()
    other_rows, other_positions = control_positions(ids, mask, report.targets.ids)
    rows, positions = torch.cat([rows, other_rows]), torch.cat([positions, other_positions])
    next_ids = ids[rows, positions + 1]
    attending = attention_units(prog)
    view = prog.at("sublayer")
    sets = [tuple(u) for u in units] if units is not None else (
        [s.units for s in report.singles] + [s.units for s in report.pairs[:3]]
        + ([(u,) for u in attending] if attention else []))
    ranked = {u for s in report.singles for u in s.units}
    allowed = ranked | set(attending)
    for unit_set in sets:
        if not 1 <= len(unit_set) <= 2 or not set(unit_set) <= allowed:
            raise ValueError(f"cannot intervene on {unit_set}: give one or two of the ranked or attention "
                             f"units ({', '.join(u.name for u in view.units if u.name in allowed)})")
        if "term" in methods and set(unit_set) <= ranked:
            report.paths_inside(unit_set)  # refuses a pair whose path was not ranked
    with_terms = [s for s in sets if set(s) <= ranked]
    ablated = sorted({u for s in sets for u in s})
    vocab = int(prog.decoder.unembedding.shape[0])
    batch = forward_batch(batch, ids.shape[1], vocab)
    step = block_rows(vocab)  # positions whose [step, V] float64 logits are reduced at once
    means = unit_means(prog, ablated, ids, mask, batch) if "mean" in methods else {}

    def measured(edits_of, terms: bool = False):
        """Centred logits and log-probs of the next token at the target positions, then at the
        control positions, batch by batch; with ``terms``, also those with each unit set's bigram
        path terms removed. Streams: a batch's logits and one block of positions' float64
        logits (one unit set's at a time) are all it holds, never a [positions, V] tensor."""
        out: dict = {"run": ([], []), **{s: ([], []) for s in (with_terms if terms else [])}}
        visited = []  # indices into rows, in the order the batches reach them
        for start in range(0, ids.shape[0], batch):
            chosen = (rows >= start) & (rows < start + batch)
            if not chosen.any():
                continue
            visited.append(chosen.nonzero()[:, 0])
            part = ids[start:start + batch]
            part_mask = None if mask is None else mask[start:start + batch]
            logits = prog.intervene(part, edits_of(), part_mask)
            at_rows, at_positions = rows[chosen] - start, positions[chosen]
            targets = next_ids[chosen][:, None]
            for begin in range(0, len(at_rows), step):
                block = slice(begin, begin + step)
                picked = logits[at_rows[block], at_positions[block]].double()
                _reduce(out["run"], picked, targets[block])
                if terms:
                    sources = part[at_rows[block], at_positions[block]].view(-1, 1)
                    for unit_set in with_terms:
                        removed = sum(path_logits(prog, path, sources,
                                                  None if path.startswith("E") else report.first_tokens)
                                      for path in report.paths_inside(unit_set))
                        _reduce(out[unit_set], picked - removed, targets[block])
                        del removed
                del picked
            del logits
        order = torch.cat(visited).argsort()  # back to the order of rows: targets first, then controls
        return {key: (torch.cat(c)[order], torch.cat(lp)[order]) for key, (c, lp) in out.items()}

    work = [(s, m) for s in sets for m in methods if m != "term"]
    bar = tqdm(total=1 + len(work), desc="roles: interventions", disable=not progress, leave=False)
    first = measured(dict, terms="term" in methods)
    clean, clean_lp = first["run"]
    bar.update()
    effects = []
    for unit_set, method in work:
        if method == "zero":
            def edits_of(unit_set=unit_set):
                return {u: torch.zeros_like for u in unit_set}
        else:
            def edits_of(unit_set=unit_set):
                return {u: (lambda update, m=means[u]: m.expand_as(update)) for u in unit_set}
        edited, edited_lp = measured(edits_of)["run"]
        effects.append(_effect(unit_set, method, edited - clean, edited_lp - clean_lp, targets_at, samples))
        bar.update()
    bar.close()
    if "term" in methods:
        for unit_set in with_terms:
            edited, edited_lp = first[unit_set]
            delta, delta_lp = edited - clean, edited_lp - clean_lp
            effects.append(_effect(unit_set, "term", delta, delta_lp, targets_at, samples))
    replaced = {(e.units, e.method) for e in effects}
    report.effects = [e for e in report.effects if (e.units, e.method) not in replaced] + effects
    report.positions = targets_at
    report.controls = int(rows.numel()) - targets_at
    return report


def _reduce(into: tuple[list, list], values: torch.Tensor, targets: torch.Tensor) -> None:
    """Append the centred logit and the log-probability of ``targets`` [n, 1] under ``values``
    [n, V] to ``into`` (the two lists)."""
    into[0].append(values.gather(-1, targets)[:, 0] - values.mean(-1))
    into[1].append(values.log_softmax(-1).gather(-1, targets)[:, 0])


def forward_batch(batch: int, length: int, vocab: int) -> int:
    """Sequences per forward of the interventions: at most ``batch``, and few enough that their
    [batch, length, V] float32 logits stay within 64M entries (256 MB)."""
    return max(1, min(batch, LOGITS_PER_BATCH // max(1, length * vocab)))


def _effect(units: tuple[str, ...], method: str, delta: torch.Tensor, delta_lp: torch.Tensor, targets_at: int,
            samples: int) -> Effect:
    """The effect at the first ``targets_at`` positions (the targets); the rest are controls."""
    stats = bootstrap_mean(delta[:targets_at], samples)
    others = float(delta[targets_at:].mean()) if delta.numel() > targets_at else None
    return Effect(units, method, stats["mean"], stats["low"], stats["high"], targets_at,
                  float(delta_lp[:targets_at].mean()), others)
