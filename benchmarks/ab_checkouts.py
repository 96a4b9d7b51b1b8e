"""A/B of two jetgraph checkouts on the workloads a refactor must not slow down: capture, the
lens, a streamed n-gram table, and dense path reads (one, and four of the same path).

    git worktree add /tmp/base <commit>                  # the main the work started from
    python benchmarks/ab_checkouts.py --base /tmp/base   # this checkout is B

Each workload runs in a fresh process per side (``PYTHONPATH`` picks the checkout), the sides
alternating A B A B …, one thread each; the time is the workload's own (after loading the model
and, except for capture, capturing it). Prints a table of medians, min–max and the B/A ratio pair
by pair, and writes ``benchmarks/results/ab_checkouts.json`` (``--out``) — the stated output.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINYSTORIES = ROOT.parent / "shared" / "models" / "tinystories-656k"
WORKLOADS = ("capture", "lens", "table", "full", "full4")
TEXT = " ".join(["Once upon a time there was a little girl who liked to play in the park with her dog."] * 6)


def workload(name: str, model_path: str) -> float:
    """Seconds of one workload in this process (whichever jetgraph PYTHONPATH gives)."""
    import warnings

    import torch

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    import jetgraph
    from jetgraph.applications.ngrams import full_table, ngram_table

    model, tokenizer = jetgraph.load_model(model_path)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    start = time.perf_counter()
    if name == "capture":
        for _ in range(3):
            jetgraph.capture(model, ids, granularity="block")
        return time.perf_counter() - start
    prog = jetgraph.capture(model, ids, granularity="block")
    pairs = torch.stack(torch.meshgrid(torch.arange(11), torch.arange(2048), indexing="ij"), -1).view(-1, 2)
    start = time.perf_counter()
    if name == "lens":
        for _ in range(5):
            jetgraph.lens(prog, ids, orders=(0, 1, 2))
    elif name == "table":  # the 0.7 keyword form: both checkouts take it
        ngram_table(prog, "E→attn0→U", first=range(64), top=100, progress=False, shard=None, max_seconds=None)
    elif name in ("full", "full4"):
        for _ in range(4 if name == "full4" else 1):
            full_table(prog, "E→attn0→mlp0→U", contexts=pairs)
    return time.perf_counter() - start


def _spread(values: list[float], unit: str = " s") -> str:
    return f"{statistics.median(values):7.3f}{unit} [{min(values):.3f}–{max(values):.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, help="checkout A (the baseline)")
    parser.add_argument("--pairs", type=int, default=5, help="A/B pairs per workload")
    parser.add_argument("--model", default=str(TINYSTORIES))
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ab_checkouts.json")
    parser.add_argument("--run", choices=WORKLOADS, help=argparse.SUPPRESS)  # one workload, this process
    args = parser.parse_args()
    if args.run:
        print(f"{workload(args.run, args.model):.4f}")
        return
    if args.base is None or not (args.base / "jetgraph").is_dir():
        parser.error("--base must be a jetgraph checkout (git worktree add DIR COMMIT)")
    sides = {"A": args.base.resolve(), "B": ROOT}
    results: dict[str, dict[str, list[float]]] = {}
    for name in args.workloads:
        times: dict[str, list[float]] = {"A": [], "B": []}
        for _ in range(args.pairs):
            for side, checkout in sides.items():
                env = {**os.environ, "PYTHONPATH": str(checkout)}
                command = [sys.executable, __file__, "--run", name, "--model", args.model]
                out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
                times[side].append(float(out.stdout.strip().splitlines()[-1]))
        results[name] = times
        ratios = [b / a for a, b in zip(times["A"], times["B"], strict=True)]
        line = f"A {_spread(times['A'])}  B {_spread(times['B'])}  B/A {_spread(ratios, '')}"
        print(f"{name:8s} {line}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"base": str(sides["A"]), "pairs": args.pairs, "seconds": results}
    args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
