"""The ground-truth study of bigram read-outs: tiny GPT-2s trained on random sparse Markov chains
(tied and untied embeddings) and on real text, every read-out scored against the truth over seeds.

    python benchmarks/ground_truth.py                  # 5 seeds each; ~15 min on one thread
    python benchmarks/ground_truth.py --seeds 2 --out /tmp/gt.json

Prints one table per setting (mean and min–max over seeds of top-1, KL and top-5 overlap) and
writes every run's scores to benchmarks/results/ground_truth.json (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from jetgraph.applications.groundtruth import (
    ChainSpec,
    TinyConfig,
    bpe_corpus,
    over_seeds,
    pydoc_text,
    run_chain,
    run_text,
)

ROOT = Path(__file__).resolve().parent.parent


def table(title: str, study: dict, k: int = 5) -> str:
    """A markdown table: every read-out's mean (min–max) over seeds, best top-1 first."""
    lines = [f"\n{title}\n", f"| read-out | top-1 | KL (nats) | top-{k} overlap |", "|---|---|---|---|"]
    rows = sorted(study["spread"].items(), key=lambda item: -item[1]["top1"]["mean"])
    for name, s in [*rows, ("chance", study["chance"]), ("unigram table", study["unigram"])]:
        metrics = ("top1", "kl", f"top{k}")
        cells = [f"{s[m]['mean']:.3f} ({s[m]['min']:.3f}–{s[m]['max']:.3f})" for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=600, help="training steps per model (default 600)")
    parser.add_argument("--text-steps", type=int, default=1500, help="training steps of the text models")
    parser.add_argument("--save-text-model", type=Path, default=None, metavar="DIR",
                        help="also save the seed-0 text model, its tokenizer and the corpus text here "
                             "(the input of `jetgraph sketch DIR --text DIR/corpus.txt`)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ground_truth.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    start = time.perf_counter()
    seeds = list(range(args.seeds))
    chain, cfg = ChainSpec(), TinyConfig(steps=args.steps)
    bar = tqdm(total=3 * len(seeds), desc="models")

    def tick(result):
        bar.update(1)
        reference = "entropy rate" if result.kind == "chain" else "count-bigram entropy"
        bar.set_postfix_str(f"{result.kind} seed {result.seed}: loss {result.loss:.3f} "
                            f"({reference} {result.floor:.3f})")

    studies = {
        "untied chains": over_seeds(lambda s: run_chain(s, False, chain, cfg), seeds, tick),
        "tied chains": over_seeds(lambda s: run_chain(s, True, chain, cfg), seeds, tick),
    }
    text, source = pydoc_text()
    corpus = bpe_corpus(text, 512, source)
    text_cfg = TinyConfig(steps=args.text_steps, n_embd=96)

    def text_run(seed: int):
        keep = seed == 0 and args.save_text_model is not None
        result = run_text(corpus, seed, True, text_cfg, keep_model=keep)
        if result.model is not None:
            args.save_text_model.mkdir(parents=True, exist_ok=True)
            result.model.save_pretrained(args.save_text_model)
            corpus.tokenizer.save_pretrained(args.save_text_model)
            (args.save_text_model / "corpus.txt").write_text(text)
        return result

    studies["text (pydoc topics, BPE 512, tied)"] = over_seeds(text_run, seeds, tick)
    bar.close()
    for title, study in studies.items():
        print(table(title, study))
    payload = {"machine": f"{platform.machine()}, 1 thread, torch {torch.__version__}, "
                          f"python {platform.python_version()}",
               "command": "python benchmarks/ground_truth.py "
                          + " ".join(sys.argv[1:] if argv is None else argv),
               "seconds": round(time.perf_counter() - start, 1), "chain": asdict(chain),
               "model": asdict(cfg), "text_model": asdict(text_cfg), "studies": studies}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    print(f"\nwrote {args.out} in {payload['seconds']} s")
    return payload


if __name__ == "__main__":
    main()
