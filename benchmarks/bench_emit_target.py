"""Time ``jetgraph.emit`` of SmolLM2's two order-0 paths with target and remainder (the default).

Prints one JSON line: the best of ``--repeats`` emits after a warm-up, the jetgraph it ran (so an
A/B against older code is two runs, one with ``PYTHONPATH`` pointing at an older checkout), and
the emitted target's largest difference to the Hugging Face logits. Writes nothing.

    python benchmarks/bench_emit_target.py --label new
    PYTHONPATH=/path/to/old/checkout python benchmarks/bench_emit_target.py --label old
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import jetgraph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, tokenizer = jetgraph.load_model("smollm2")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    prog = jetgraph.capture(model, ids)
    expansion = jetgraph.expand_paths(prog, paths=["E→U", "E→MLP_last→U"]).expansion()
    jetgraph.emit(expansion, ids)
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        module = jetgraph.emit(expansion, ids)
        times.append(time.perf_counter() - started)
    with torch.no_grad():
        difference = (module(ids)["target"] - model(ids).logits).abs().max().item()
    print(json.dumps({"label": args.label, "jetgraph": jetgraph.__file__, "emit_seconds": min(times),
                      "target_vs_hf_logits": difference}))


if __name__ == "__main__":
    main()
