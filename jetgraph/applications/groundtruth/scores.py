"""Scoring a bigram read-out against the truth: top-1 agreement, KL and top-k overlap per
context row, and their spread over seeds."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BigramTruth:
    """True next-token distributions: ``rows`` [V, V] float64 (each scored row sums to 1) and the
    mask of rows that are scored (contexts with data)."""

    rows: torch.Tensor
    scored: torch.Tensor

    @classmethod
    def from_transition(cls, transition: torch.Tensor, stationary: torch.Tensor | None = None,
                        min_mass: float = 1e-9) -> BigramTruth:
        """A Markov chain's rows; with its ``stationary`` distribution, only the tokens the chain
        visits (π_i > ``min_mass``) are scored: a transient token never occurs in the training
        data, so no model can have learnt its row."""
        rows = transition.double()
        scored = torch.ones(rows.shape[0], dtype=torch.bool) if stationary is None else stationary > min_mass
        return cls(rows / rows.sum(-1, keepdim=True), scored)

    @classmethod
    def from_counts(cls, counts: torch.Tensor, min_count: int = 20) -> BigramTruth:
        """Corpus bigram counts: rows seen at least ``min_count`` times, normalised (rarer contexts
        have too few successors to say what the truth is)."""
        totals = counts.double().sum(-1)
        scored = totals >= min_count
        if not scored.any():
            raise ValueError(f"no context occurs {min_count} times or more: lower min_count or use more text")
        return cls(counts.double() / totals.clamp_min(1)[:, None], scored)

    @property
    def vocab(self) -> int:
        return int(self.rows.shape[1])


def score_readout(logits: torch.Tensor, truth: BigramTruth, k: int = 5) -> dict[str, float]:
    """How well a [V, V] table of next-token logits (rows: context token) matches the truth, over
    the scored rows, each row weighted equally:

    - ``top1``: the share of rows whose most likely next token is the truth's most likely one;
    - ``kl``: mean KL(truth row ‖ softmax(logits row)) in nats;
    - ``topk``: mean |top-k of the row ∩ top-k of the truth row| / k.
    """
    if logits.shape != truth.rows.shape:
        raise ValueError(f"a read-out of shape {tuple(logits.shape)} cannot be scored against a truth of "
                         f"shape {tuple(truth.rows.shape)}")
    if not 1 <= k <= truth.vocab:
        raise ValueError(f"k must be between 1 and the vocabulary size {truth.vocab}, got {k}")
    ref = truth.rows[truth.scored]
    log_q = logits[truth.scored].double().log_softmax(-1)
    top1 = (log_q.argmax(-1) == ref.argmax(-1)).double().mean()
    kl = torch.where(ref > 0, ref * (ref.clamp_min(1e-300).log() - log_q), 0.0).sum(-1).mean()
    ours, theirs = log_q.topk(k, -1).indices, ref.topk(k, -1).indices
    overlap = (ours[:, :, None] == theirs[:, None, :]).any(-1).double().sum(-1).div(k).mean()
    return {"top1": float(top1), "kl": float(kl), f"top{k}": float(overlap)}


def chance_scores(truth: BigramTruth, k: int = 5) -> dict[str, float]:
    """What a table that knows nothing scores: top-1 and top-k overlap of a random ranking
    (1/V and k/V in expectation) and the KL of the uniform distribution."""
    ref = truth.rows[truth.scored]
    entropy = torch.where(ref > 0, -ref * ref.clamp_min(1e-300).log(), 0.0).sum(-1)
    return {"top1": 1.0 / truth.vocab, "kl": float((math.log(truth.vocab) - entropy).mean()),
            f"top{k}": k / truth.vocab}


def spread(runs: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Per metric over runs (seeds): mean, sample standard deviation (0 for one run), min and max."""
    if not runs:
        raise ValueError("spread needs at least one run")
    out = {}
    for metric in runs[0]:
        values = [float(run[metric]) for run in runs]
        out[metric] = {"mean": statistics.fmean(values),
                       "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                       "min": min(values), "max": max(values)}
    return out
