"""Jet bigrams against ground truth: train tiny GPT-2s and read their bigram tables off the weights.

Jet n-grams (paper §4) claim that attention-free paths such as ``E→U`` (embedding decoded directly)
or ``E→MLP_last→U`` are bigram tables the model has written into its weights. This script checks the
claim where the truth is known, on one CPU thread in about a minute:

(a) a synthetic first-order Markov chain over V=48 tokens (rows drawn from a Dirichlet(0.1), fixed
    seed): a tiny GPT-2 is trained on sequences sampled from it, and at each checkpoint the jet
    bigram tables are compared with the true transition matrix (reference: the joint mass
    π_i·P_ij, π the stationary distribution); once with GPT-2's tied embedding/decoder and once
    untied, since tying constrains what ``E→U`` alone can express;
(b) real text: the help topics of the stdlib module ``pydoc_data.topics`` tokenised with a
    byte-level BPE (vocabulary 512) trained on that text; the reference is the corpus's bigram
    counts;
(c) the agreement across the checkpoint series, drawn as curves.

Agreement is ``jetgraph.applications.compare_to_reference``: top-1 hit ratio per row, mean
KL(reference row ‖ jet row), global top-k hit ratio and the reference mass covered by the jet's
top-k. Baselines: a random table (chance), the unigram table (every row = the token frequencies),
the reference's own rows (the ceiling of the metrics) and the model itself run on one token.
Tables: every attention-free path E→{mlp subset}→U, their sum, and ``E→MLP_last→U``.

    python examples/train_tiny.py                 # full run: JSON under benchmarks/results, PNGs in docs/img
    python examples/train_tiny.py --quick         # a few seconds' smoke run
    python examples/train_tiny.py --out /tmp/tt   # write the JSON and PNGs under /tmp/tt instead
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel
from transformers.utils import logging as hf_logging

import jetgraph
from jetgraph.applications import compare_to_reference, full_table
from jetgraph.applications.groundtruth import MarkovChain, TinyConfig, bigram_counts, bpe_corpus, mean_loss
from jetgraph.applications.groundtruth import pydoc_text as topics_text
from jetgraph.applications.groundtruth import tiny_gpt2 as library_gpt2
from jetgraph.applications.groundtruth import train as train_model
from jetgraph.applications.groundtruth.corpora import stationary_distribution
from jetgraph.applications.groundtruth.readouts import attention_free_paths
from jetgraph.applications.groundtruth.training import row_batches, window_batches
from jetgraph.applications.plots import plot_curves

ROOT = Path(__file__).resolve().parent.parent
ATTN_FREE_SUM = "sum of attention-free paths"
MODEL_1TOK = "model, 1-token input"


@dataclass(frozen=True)
class RunConfig(TinyConfig):
    """The library's tiny GPT-2 settings with this script's defaults, and the k of the top-k scores."""

    vocab: int = 48
    steps: int = 400
    k: int = 100


def checkpoint_steps(steps: int) -> list[int]:
    """Step 0 and steps/16, /8, /4, /2, steps (deduplicated): e.g. 0, 25, 50, 100, 200, 400."""
    return sorted({0, *(max(1, steps // d) for d in (16, 8, 4, 2)), steps})


# ----------------------------------------------------------------- data
def markov_chain(vocab: int, alpha: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense random transition matrix P (every row a Dirichlet(alpha) over all tokens) and its
    stationary distribution π. (The library's ``markov_chain`` draws sparse rows instead.)"""
    with torch.random.fork_rng():  # Dirichlet sampling uses the global generator
        torch.manual_seed(seed)
        rows = torch.distributions.Dirichlet(torch.full((vocab, vocab), alpha, dtype=torch.double)).sample()
    transition = rows.clamp_min(1e-12)
    transition = transition / transition.sum(-1, keepdim=True)
    return transition, stationary_distribution(transition)


def sample_markov(transition: torch.Tensor, stationary: torch.Tensor, count: int, length: int,
                  seed: int = 0) -> torch.Tensor:
    """``count`` sequences of ``length`` tokens, started from π (so the chain is stationary)."""
    return MarkovChain(transition, stationary).sample(count, length, seed)


def train(model, batches, cfg: RunConfig, at: list[int]):
    """AdamW for ``cfg.steps`` steps; frozen copies of the model at the steps in ``at``."""
    return train_model(model, batches, cfg.steps, cfg.lr, tuple(at))


# ----------------------------------------------------------------- jet tables and scores
@torch.no_grad()
def bigram_tables(prog, model: GPT2LMHeadModel) -> dict[str, torch.Tensor]:
    """The [V, V] jet bigram tables of a captured ``model`` (and the model's own 1-token output)."""
    paths = attention_free_paths(prog)
    tables = {path: full_table(prog, path).float() for path in paths}
    tables["E→MLP_last→U"] = full_table(prog, "E→MLP_last→U").float()
    tables[ATTN_FREE_SUM] = sum(tables[p] for p in paths)
    vocab = model.config.vocab_size
    tables[MODEL_1TOK] = model(input_ids=torch.arange(vocab).view(-1, 1)).logits[:, 0].float()
    return tables


def baselines(reference: torch.Tensor, k: int, seeds: int = 5) -> dict[str, dict[str, float]]:
    """Scores of tables that know nothing about the rows: random logits (mean of ``seeds`` draws) and
    the unigram table (every row = the reference's next-token frequencies); and the ceiling: the
    reference's own conditional rows as the table."""
    vocab = reference.shape[1]
    draws = [compare_to_reference(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(s)),
                                  reference, k) for s in range(seeds)]
    random = {key: sum(d[key] for d in draws) / seeds for key in draws[0]}
    unigram = reference.sum(0).clamp_min(0.5).log().expand(vocab, vocab).float()
    ceiling = (reference / reference.sum(-1, keepdim=True).clamp_min(1e-300)).clamp_min(1e-30).log()
    return {"random table (chance)": random, "unigram table": compare_to_reference(unigram, reference, k),
            "reference rows (ceiling)": compare_to_reference(ceiling.float(), reference, k)}


def checkpoint_tables(snapshots: dict[int, GPT2LMHeadModel],
                      example: torch.Tensor) -> tuple[dict[int, dict[str, torch.Tensor]], float]:
    """Jet tables of every checkpoint, capturing once: the captured program reads the parameters of
    the model it was captured from, so each checkpoint's weights are loaded into that model in place.
    A fresh capture of the last checkpoint checks this; if its tables differ (gap > 1e-4), every
    checkpoint is captured afresh. Returns the tables and that gap."""
    template = copy.deepcopy(snapshots[min(snapshots)]).eval()
    prog = jetgraph.capture(template, example)
    tables = {}
    for step, model in snapshots.items():
        template.load_state_dict(model.state_dict())
        tables[step] = bigram_tables(prog, template)
    last = max(snapshots)
    fresh = bigram_tables(jetgraph.capture(snapshots[last], example), snapshots[last])
    gap = max((fresh[name] - tables[last][name]).abs().max().item() for name in fresh)
    if gap > 1e-4:
        tables = {step: bigram_tables(jetgraph.capture(m, example), m) for step, m in snapshots.items()}
    return tables, gap


def score_checkpoints(snapshots: dict[int, GPT2LMHeadModel], reference: torch.Tensor, example: torch.Tensor,
                      k: int) -> tuple[dict[int, dict[str, dict[str, float]]], float]:
    """compare_to_reference for every table of every checkpoint (and the capture-reuse gap)."""
    tables, gap = checkpoint_tables(snapshots, example)
    return {step: {name: compare_to_reference(table, reference, k) for name, table in by_name.items()}
            for step, by_name in tables.items()}, gap


# ----------------------------------------------------------------- the two experiments
def run_markov(cfg: RunConfig, sequences: int = 2000, alpha: float = 0.1,
               at: list[int] | None = None) -> dict:
    """Part (a): train on a synthetic Markov chain, score the jet tables against the true chain."""
    start = time.perf_counter()
    transition, stationary = markov_chain(cfg.vocab, alpha, cfg.seed)
    data = sample_markov(transition, stationary, sequences, cfg.seq, cfg.seed + 1)
    held_out = sample_markov(transition, stationary, 128, cfg.seq, cfg.seed + 2)
    reference = stationary[:, None] * transition  # joint mass of (token, next token)
    at = at if at is not None else checkpoint_steps(cfg.steps)
    snapshots, losses = train(library_gpt2(cfg), row_batches(data, cfg.batch, cfg.seed), cfg, at)
    entropy_rate = float(-(reference * transition.log()).sum())
    scores, gap = score_checkpoints(snapshots, reference, data[:1, :16], cfg.k)
    result = {
        "config": asdict(cfg) | {"sequences": sequences, "dirichlet_alpha": alpha},
        "reference": "true joint mass pi_i * P_ij of the chain (KL and top-1 against the rows P_i)",
        "entropy_rate_nats": entropy_rate,
        "final_train_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "held_out_loss": mean_loss(snapshots[max(snapshots)], held_out),
        "checkpoints": scores,
        "capture_reuse_gap": gap,
        "baselines": baselines(reference, cfg.k),
        "empirical_vs_true": compare_to_reference(bigram_counts(data, cfg.vocab).clamp_min(1e-3).log(),
                                                  reference, cfg.k),
    }
    result["seconds"] = time.perf_counter() - start
    return result


def run_topics(cfg: RunConfig, max_chars: int | None = None) -> dict:
    """Part (b): train on pydoc help text (byte-level BPE), score the jet tables against corpus bigrams."""
    start = time.perf_counter()
    text, source = topics_text()
    text = text[:max_chars] if max_chars else text
    corpus = bpe_corpus(text, cfg.vocab, source)
    tokenizer, cfg = corpus.tokenizer, replace(cfg, vocab=corpus.vocab)
    train_ids, val_ids = corpus.train_ids, corpus.held_out_ids
    split = train_ids.numel()
    reference = bigram_counts(train_ids, cfg.vocab)
    at = checkpoint_steps(cfg.steps)
    batches = window_batches(train_ids, cfg.batch, cfg.seq, cfg.seed)
    snapshots, losses = train(library_gpt2(cfg), batches, cfg, at)
    val_rows = val_ids[: val_ids.numel() // cfg.seq * cfg.seq].view(-1, cfg.seq)
    unigram = reference.sum(0) / reference.sum()
    conditional = (reference / reference.sum(-1, keepdim=True).clamp_min(1)).clamp_min(1e-300)
    scores, gap = score_checkpoints(snapshots, reference, train_ids[:16].view(1, -1), cfg.k)
    result = {
        "config": asdict(cfg) | {"chars": len(text), "tokens": split + val_ids.numel(), "train_tokens": split,
                                 "source": source},
        "reference": "bigram counts of the training split (90%)",
        "train_bigram_entropy_nats": float(-(reference / reference.sum() * conditional.log()).sum()),
        "train_unigram_entropy_nats": float(-(unigram * unigram.clamp_min(1e-300).log()).sum()),
        "final_train_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "held_out_loss": mean_loss(snapshots[max(snapshots)], val_rows),
        "checkpoints": scores,
        "capture_reuse_gap": gap,
        "baselines": baselines(reference, cfg.k),
        "example_bigrams": top_bigrams(reference, tokenizer, 8),
    }
    result["seconds"] = time.perf_counter() - start
    return result


def top_bigrams(reference: torch.Tensor, tokenizer, count: int) -> list[str]:
    """The most frequent bigrams of the corpus, decoded (for the write-up)."""
    vocab = reference.shape[1]
    return [repr(tokenizer.decode([i // vocab]) + "|" + tokenizer.decode([i % vocab]))
            for i in reference.flatten().topk(count).indices.tolist()]


# ----------------------------------------------------------------- report
SHOWN = ("E→U", "E→mlp0→U", "E→MLP_last→U", ATTN_FREE_SUM, MODEL_1TOK)


def print_table(title: str, result: dict) -> None:
    """A short text table: final checkpoint's scores for the main tables and the baselines."""
    k = result["config"]["k"]
    final = result["checkpoints"][max(result["checkpoints"])]
    rows = {name: final[name] for name in SHOWN} | result["baselines"]
    print(f"\n{title}  (final step {max(result['checkpoints'])}, k={k}, {result['seconds']:.1f} s)")
    print(f"  {'table':34s} {'top1':>6s} {'KL':>7s} {'topk hit':>9s} {'topk mass':>10s}")
    for name, s in rows.items():
        print(f"  {name:34s} {s['top1_hit_ratio']:6.3f} {s['mean_kl']:7.3f} {s[f'top{k}_hit_ratio']:9.3f} "
              f"{s[f'top{k}_mass']:10.3f}")


def plot_result(result: dict, path: Path, title: str) -> Path:
    """Top-1 hit ratio and top-k mass across checkpoints, for the main tables and the chance level."""
    k = result["config"]["k"]
    steps = sorted(result["checkpoints"])
    series = {}
    for name in SHOWN:
        series[f"top-1 hit, {name}"] = [result["checkpoints"][s][name]["top1_hit_ratio"] for s in steps]
    for name in ("E→mlp0→U", ATTN_FREE_SUM):
        series[f"top-{k} mass, {name}"] = [result["checkpoints"][s][name][f"top{k}_mass"] for s in steps]
    chance = result["baselines"]["random table (chance)"]
    series["top-1 hit, random table"] = [chance["top1_hit_ratio"]] * len(steps)
    series[f"top-{k} mass, random table"] = [chance[f"top{k}_mass"]] * len(steps)
    ceiling = result["baselines"]["reference rows (ceiling)"]
    series[f"top-{k} mass, ceiling (reference rows)"] = [ceiling[f"top{k}_mass"]] * len(steps)
    return plot_curves(steps, series, path, "training step", "hit ratio / mass", title)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="write train_tiny.json and the PNGs here (default: benchmarks/results/ "
                             "and docs/img/)")
    parser.add_argument("--steps", type=int, default=400, help="training steps per model (default 400)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: tiny models run fastest and are not slowed "
                             "down by other processes' load)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (20 steps, little data)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    steps = 20 if args.quick else args.steps
    sequences, chars = (100, 20_000) if args.quick else (2000, None)
    start = time.perf_counter()
    markov = run_markov(RunConfig(vocab=48, steps=steps, k=100), sequences=sequences)
    print_table("(a) Markov chain, V=48: jet bigram tables vs the true transition matrix", markov)
    untied = run_markov(RunConfig(vocab=48, steps=steps, k=100, tie=False), sequences=sequences)
    print_table("(a') the same, untied embedding and decoder", untied)
    topics = run_topics(RunConfig(vocab=512, steps=steps, k=1000), max_chars=chars)
    vocab = topics["config"]["vocab"]
    print_table(f"(b) pydoc topics, BPE V={vocab}: jet bigram tables vs corpus bigrams", topics)
    json_dir = args.out or ROOT / "benchmarks" / "results"
    img_dir = args.out or ROOT / "docs" / "img"
    pngs = [plot_result(markov, img_dir / "train_tiny_markov.png",
                        "Markov chain (V=48), tied GPT-2: jet bigram tables vs the true chain"),
            plot_result(untied, img_dir / "train_tiny_markov_untied.png",
                        "Markov chain (V=48), untied GPT-2: jet bigram tables vs the true chain"),
            plot_result(topics, img_dir / "train_tiny_topics.png",
                        f"pydoc topics (BPE V={vocab}): jet bigram tables vs corpus bigrams")]
    payload = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                   f"python {platform.python_version()}",
        "command": "python examples/train_tiny.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "seconds": round(time.perf_counter() - start, 1),
        "markov": markov, "markov_untied": untied, "topics": topics,
        "pngs": [str(p) for p in pngs],
    }
    json_dir.mkdir(parents=True, exist_ok=True)
    (json_dir / "train_tiny.json").write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    print(f"\nwrote {json_dir / 'train_tiny.json'} and {', '.join(map(str, pngs))} "
          f"in {payload['seconds']} s")
    return payload


if __name__ == "__main__":
    main()
