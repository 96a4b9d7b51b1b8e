"""The check on real text: zero- and mean-ablations and the removal of path terms at the
targets' positions and at other positions, streamed in batches."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from jetgraph.applications.roles.ranking import (
    CONTROLS,
    block_rows,
    forward_batch,
    path_logits,
)
from jetgraph.applications.roles.report import METHODS, Effect, RoleReport
from jetgraph.applications.statistics import bootstrap_mean
from jetgraph.applications.targets import TargetSet
from jetgraph.ir import ResidualProgram


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




def _effect(units: tuple[str, ...], method: str, delta: torch.Tensor, delta_lp: torch.Tensor, targets_at: int,
            samples: int) -> Effect:
    """The effect at the first ``targets_at`` positions (the targets); the rest are controls."""
    stats = bootstrap_mean(delta[:targets_at], samples)
    others = float(delta[targets_at:].mean()) if delta.numel() > targets_at else None
    return Effect(units, method, stats["mean"], stats["low"], stats["high"], targets_at,
                  float(delta_lp[:targets_at].mean()), others)
