"""The data-free ranking: every MLP unit (and the best pairs) by its bigram path's centred
target logit, planned first."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from jetgraph.applications.ngrams.convention import InputConvention, input_convention
from jetgraph.applications.ngrams.mixture import FirstTokens
from jetgraph.applications.ngrams.reader import path_reader
from jetgraph.applications.ngrams.readout import readout_prefixes
from jetgraph.applications.ngrams.sources import common_tokens
from jetgraph.applications.roles.report import FOCUS, METHODS, PathScore, RoleReport
from jetgraph.applications.targets import TargetSet
from jetgraph.cost import Plan, estimate_seconds, gemm_rate
from jetgraph.ir import ResidualProgram
from jetgraph.passes.pathspec import format_path, parse_path

STARTS = ("embedding", "stream")
SAMPLED_ROWS = 4096  # source tokens scored when the vocabulary is larger than FULL_ROWS
FULL_ROWS = 8192
CONTROLS = 1024  # other positions of the text where each intervention is measured too
LOGITS_PER_CALL = 1 << 24  # [rows, V] logits one path call (and one block of positions) holds at most
LOGITS_PER_BATCH = 1 << 26  # [batch, length, V] logits one forward of the interventions returns at most


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

def forward_batch(batch: int, length: int, vocab: int) -> int:
    """Sequences per forward of the interventions: at most ``batch``, and few enough that their
    [batch, length, V] float32 logits stay within 64M entries (256 MB)."""
    return max(1, min(batch, LOGITS_PER_BATCH // max(1, length * vocab)))
