"""Keyword masses of bigram read-outs across models: the paper's mean mass and a calibrated lift.

- **Mass** (the paper's toxic mass): the mean over source tokens z of Σ_{t∈K} p(t | z), the
  probability the read-out puts on the keyword set K after a source token.
- **Lift** (calibrated): the mass on K divided by the mass on control sets C of the same size,
  whose tokens are matched one to one with the keywords on the reference model's unigram
  read-out (the mean of its bigram rows: how often the model predicts each token overall), the
  ratio averaged over ``controls`` control sets. A lift of 1 says the keywords get what
  equally frequent tokens get; a rise in lift from one model to another is a change about the
  keywords, not about how peaked the model is overall or how common the keywords are.

Both come with 95% bootstrap intervals over the source tokens (resampled together for the
keyword and control masses).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from jetgraph.applications.ngrams.convention import InputConvention
from jetgraph.applications.ngrams.readout import DEFAULT_READOUT, RowReader
from jetgraph.ir import ResidualProgram


def unigram_readout(reader: RowReader, sources: torch.Tensor) -> torch.Tensor:
    """The mean of the read-out's rows over ``sources`` (float64 [V])."""
    total = torch.zeros(reader.vocab, dtype=torch.double)
    for start in range(0, len(sources), reader.chunk):
        total += reader(sources[start:start + reader.chunk]).exp().sum(0)
    return total / len(sources)


def matched_controls(unigram: torch.Tensor, keywords: Sequence[int], count: int, seed: int = 0,
                     pool: int = 10) -> torch.Tensor:
    """``count`` control sets [count, |K|]: for each keyword, one of the ``pool`` non-keyword
    tokens nearest to it in the unigram ranking, drawn at random (distinct within a set)."""
    keywords = list(keywords)
    order = unigram.argsort(descending=True)
    rank_of = torch.empty_like(order)
    rank_of[order] = torch.arange(len(order))
    is_keyword = torch.zeros(len(order), dtype=torch.bool)
    is_keyword[keywords] = True
    candidates = order[~is_keyword[order]]
    if len(candidates) < len(keywords) * 2:
        raise ValueError(f"{len(keywords)} keywords leave too few other tokens ({len(candidates)}) to match")
    position = torch.searchsorted(rank_of[candidates].contiguous(), rank_of[keywords].contiguous())
    generator = torch.Generator().manual_seed(seed)
    sets = torch.empty(count, len(keywords), dtype=torch.long)
    for c in range(count):
        used: set[int] = set()
        for k, centre in enumerate(position.tolist()):
            low = max(0, min(centre - pool // 2, len(candidates) - pool))
            choices = [int(t) for t in candidates[low:low + pool + len(keywords)] if int(t) not in used]
            pick = choices[int(torch.randint(0, min(pool, len(choices)), (1,), generator=generator))]
            used.add(pick)
            sets[c, k] = pick
    return sets


@torch.no_grad()
def keyword_masses(programs: Mapping[str, ResidualProgram], keywords: Sequence[int],
                   path: str = DEFAULT_READOUT, rows: Sequence[int] | None = None,
                   first_tokens: int | None = None, controls: int = 20, samples: int = 1000,
                   seed: int = 0, chunk: int = 1024, label: str = "", *,
                   convention: InputConvention | Sequence[int] | None = None) -> list[dict]:
    """Mass and lift of ``keywords`` for every model (module docstring). The first model is the
    reference the controls are matched on. Returns one row per model."""
    if not programs:
        raise ValueError("give at least one model")
    keywords = sorted(set(int(k) for k in keywords))
    if not keywords:
        raise ValueError("the keyword set is empty")
    vocabs = {int(p.decoder.unembedding.shape[0]) for p in programs.values()}
    if len(vocabs) != 1:
        raise ValueError(f"the models' vocabularies differ ({sorted(vocabs)}): masses compare one token set")
    vocab = vocabs.pop()
    if keywords[-1] >= vocab or keywords[0] < 0:
        raise ValueError(f"keyword ids must lie in [0, {vocab})")
    sources = torch.arange(vocab) if rows is None else torch.as_tensor(list(rows), dtype=torch.long)
    readers = {name: RowReader(p, path, first_tokens, convention=convention, chunk=chunk)
               for name, p in programs.items()}
    reference = next(iter(readers.values()))
    control_sets = matched_controls(unigram_readout(reference, sources), keywords, controls, seed)
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, len(sources), (samples, len(sources)), generator=generator)
    out = []
    for name, reader in readers.items():
        key_mass = torch.empty(len(sources), dtype=torch.double)
        control_mass = torch.empty(controls, len(sources), dtype=torch.double)
        for start in range(0, len(sources), reader.chunk):
            probs = reader(sources[start:start + reader.chunk]).exp()
            stop = start + len(probs)
            key_mass[start:stop] = probs[:, keywords].sum(-1)
            control_mass[:, start:stop] = probs[:, control_sets].sum(-1).T
        boot_key = key_mass[draws].mean(1)
        boot_control = torch.cat([control_mass[:, part].mean(-1).T for part in draws.split(50)])
        boot_lift = (boot_key[:, None] / boot_control).mean(1)
        lift = float((key_mass.mean() / control_mass.mean(1)).mean())
        out.append({"model": name, "keywords": label or f"{len(keywords)} tokens",
                    "readout": reader.describe(), "sources": len(sources), "mass": float(key_mass.mean()),
                    "mass_low": float(boot_key.quantile(0.025)),
                    "mass_high": float(boot_key.quantile(0.975)),
                    "control_mass": float(control_mass.mean()), "lift": lift,
                    "lift_low": float(boot_lift.quantile(0.025)),
                    "lift_high": float(boot_lift.quantile(0.975))})
    return out


def masses_table(rows: Sequence[dict]) -> str:
    head = rows[0]
    lines = [f"keywords: {head['keywords']}; read-out: {head['readout']}; {head['sources']:,} source "
             "tokens; 95% bootstrap intervals",
             f"  {'model':28s} {'mass':>8s} {'interval':>20s} {'control':>8s} {'lift':>7s} {'interval':>16s}"]
    for r in rows:
        lines.append(f"  {r['model']:28s} {r['mass']:8.4f} [{r['mass_low']:.4f}, {r['mass_high']:.4f}]"
                     f" {r['control_mass']:8.4f} {r['lift']:7.2f}"
                     f" [{r['lift_low']:.2f}, {r['lift_high']:.2f}]")
    return "\n".join(lines)
