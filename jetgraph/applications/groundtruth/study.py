"""The ground-truth study: train tiny GPT-2s on data with known bigram statistics and score
every read-out against the truth, seed by seed.

A chain run draws a fresh chain and a fresh initialisation per seed; a text run keeps the corpus
and varies the initialisation and batch order. Each run returns the scores of every read-out,
the chance level and the training diagnostics (final loss against the entropy rate)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import torch

from jetgraph.applications.groundtruth.corpora import TextCorpus, bigram_counts, markov_chain
from jetgraph.applications.groundtruth.readouts import bigram_readouts
from jetgraph.applications.groundtruth.scores import BigramTruth, chance_scores, score_readout, spread
from jetgraph.applications.groundtruth.training import (
    TinyConfig,
    mean_loss,
    row_batches,
    tiny_gpt2,
    train,
    window_batches,
)
from jetgraph.capture import capture


@dataclass(frozen=True)
class ChainSpec:
    """A Markov chain family: ``vocab`` tokens, each with ``successors`` possible next tokens
    weighted by a Dirichlet(``alpha``)."""

    vocab: int = 80
    successors: int | None = 12
    alpha: float = 0.2
    sequences: int = 4000


@dataclass
class RunResult:
    """One trained model's scores: ``scores[read-out] = {top1, kl, topk}``, plus what the truth
    and the training were. ``floor``: the chain's entropy rate (the loss a perfect model reaches)
    for a chain run; for a text run the count bigram model's conditional entropy, which a model
    using more context can go below."""

    kind: str
    seed: int
    tie: bool
    scores: dict[str, dict[str, float]]
    chance: dict[str, float]
    unigram: dict[str, float]
    loss: float
    held_out_loss: float
    floor: float
    seconds: float
    model: object = None
    prog: object = None

    def summary(self) -> dict:
        """The run as plain data, without the model and program."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("model", "prog")}


def score_model(prog, truth: BigramTruth, unigram: torch.Tensor, k: int) -> tuple[dict, dict, dict]:
    """Every read-out of ``prog`` scored against ``truth``; the chance level; the unigram table."""
    tables = bigram_readouts(prog)
    scores = {name: score_readout(table, truth, k) for name, table in tables.items()}
    unigram_table = unigram.clamp_min(1e-12).log().expand(truth.vocab, truth.vocab).float()
    return scores, chance_scores(truth, k), score_readout(unigram_table, truth, k)


def run_chain(seed: int, tie: bool, chain: ChainSpec = ChainSpec(), cfg: TinyConfig | None = None,
              k: int = 5, keep_model: bool = False) -> RunResult:
    """Train one tiny GPT-2 on a fresh chain (seed ``seed``) and score every read-out."""
    start = time.perf_counter()
    cfg = replace(cfg or TinyConfig(), vocab=chain.vocab, seed=seed, tie=tie)
    truth_chain = markov_chain(chain.vocab, chain.successors, chain.alpha, seed)
    data = truth_chain.sample(chain.sequences, cfg.seq, seed + 1)
    held_out = truth_chain.sample(256, cfg.seq, seed + 2)
    model = tiny_gpt2(cfg)
    _, losses = train(model, row_batches(data, cfg.batch, seed), cfg.steps, cfg.lr)
    prog = capture(model, data[:1, :16])
    truth = BigramTruth.from_transition(truth_chain.transition, truth_chain.stationary)
    scores, chance, unigram = score_model(prog, truth, truth_chain.stationary, k)
    return RunResult("chain", seed, tie, scores, chance, unigram, _tail(losses), mean_loss(model, held_out),
                     truth_chain.entropy_rate, time.perf_counter() - start,
                     model if keep_model else None, prog if keep_model else None)


def run_text(corpus: TextCorpus, seed: int, tie: bool = True, cfg: TinyConfig | None = None, k: int = 5,
             min_count: int = 20, keep_model: bool = False) -> RunResult:
    """Train one tiny GPT-2 on the corpus's training split and score every read-out against its
    bigram counts (contexts seen ``min_count`` times or more)."""
    start = time.perf_counter()
    cfg = replace(cfg or TinyConfig(), vocab=corpus.vocab, seed=seed, tie=tie)
    model = tiny_gpt2(cfg)
    _, losses = train(model, window_batches(corpus.train_ids, cfg.batch, cfg.seq, seed), cfg.steps, cfg.lr)
    held = corpus.held_out_ids[: corpus.held_out_ids.numel() // cfg.seq * cfg.seq].view(-1, cfg.seq)
    prog = capture(model, corpus.train_ids[:16].view(1, -1))
    counts = corpus.bigram_counts()
    truth = BigramTruth.from_counts(counts, min_count)
    scores, chance, unigram = score_model(prog, truth, corpus.unigram_counts(), k)
    return RunResult("text", seed, tie, scores, chance, unigram, _tail(losses), mean_loss(model, held),
                     bigram_entropy(counts), time.perf_counter() - start,
                     model if keep_model else None, prog if keep_model else None)


def bigram_entropy(counts: torch.Tensor) -> float:
    """Conditional entropy (nats/token) of the count-based bigram model on its own text."""
    joint = counts / counts.sum()
    rows = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    return float(torch.where(joint > 0, -joint * rows.clamp_min(1e-300).log(), 0.0).sum())


def over_seeds(run: Callable[[int], RunResult], seeds: Sequence[int],
               progress: Callable[[RunResult], None] | None = None) -> dict:
    """Run ``run(seed)`` for every seed; returns every run's summary and the spread of each
    read-out's scores over the seeds."""
    runs = []
    for seed in seeds:
        result = run(seed)
        if progress:
            progress(result)
        runs.append(result)
    names = list(runs[0].scores)
    return {"runs": [r.summary() for r in runs],
            "spread": {name: spread([r.scores[name] for r in runs]) for name in names},
            "chance": spread([r.chance for r in runs]), "unigram": spread([r.unigram for r in runs])}


def _tail(losses: list[float], count: int = 20) -> float:
    tail = losses[-count:]
    return sum(tail) / max(1, len(tail))


__all__ = ["ChainSpec", "RunResult", "bigram_counts", "bigram_entropy", "over_seeds", "run_chain", "run_text",
           "score_model"]
