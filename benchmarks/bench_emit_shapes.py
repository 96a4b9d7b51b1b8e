"""Emitted code for any shape: what symbolic tracing costs against a fixed-shape trace.

Two expansions of SmolLM2-135M (float32): the order-1 iterative lens at every state, and an
order-2 jet of block 3 around an order-1 jet of block 2. Each is emitted both ways, alternating
(``emit(..., dynamic=True)``, the default: any [batch, seq]; ``dynamic=False``: the example's
shape only), and the emitted code is timed on the example's shape. The dynamic module is also
run on three other shapes and a padded batch against the interpreter (max relative error).
Prints a table and writes benchmarks/results/emit_shapes.json, which docs/benchmarks.md quotes.

    python benchmarks/bench_emit_shapes.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import jetgraph
from jetgraph.applications import pad_batch

RESULTS = Path(__file__).resolve().parent / "results" / "emit_shapes.json"


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _error(module, expansion, ids, mask=None) -> float:
    reference = expansion.evaluate(ids, attention_mask=mask)
    with torch.no_grad():
        out = module(ids) if mask is None else module(ids, mask)
    scale = max(v.abs().max().item() for v in reference.terms.values())
    real = reference.real
    return max((out[k][real] - v[real]).abs().max().item() for k, v in reference.terms.items()) / scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, tokenizer = jetgraph.load_model("smollm2")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    prog = jetgraph.capture(model, ids, granularity="block")
    states = [jetgraph.stream_term(prog, i) for i in range(len(prog.units) + 1)]
    lens = jetgraph.expand(prog, "decoder", states, order=1, weights="unit")
    inner = jetgraph.expand(prog, 2, [jetgraph.stream_term(prog, 2)], order=1)
    block = jetgraph.expand(prog, 3, inner, order=2)
    generator = torch.Generator().manual_seed(0)
    vocab = int(prog.decoder.unembedding.shape[0])
    shapes = [(1, 9), (3, 4), (2, 12)]
    texts = ("Paris is the capital of", "Hello", "A cat sat on the mat and")
    prompts = [tokenizer(t, return_tensors="pt").input_ids[0] for t in texts]
    padded, mask = pad_batch(prompts, "left")
    rows = []
    cases = (("lens order 1, 31 states", lens), ("block3 order 2 around block2 order 1", block))
    for name, expansion in cases:
        trace = {"dynamic": [], "fixed": []}
        modules = {}
        for _ in range(args.repeats):  # alternate the two ways
            for way in ("dynamic", "fixed"):
                start = time.perf_counter()
                modules[way] = jetgraph.emit(expansion, ids, dynamic=way == "dynamic")
                trace[way].append(time.perf_counter() - start)
        run = {}
        with torch.no_grad():
            for way in ("dynamic", "fixed", "dynamic", "fixed"):
                seconds = _best(lambda m=modules[way]: m(ids), args.repeats)
                run[way] = min(run.get(way, float("inf")), seconds)
        errors = [_error(modules["dynamic"], expansion, torch.randint(0, vocab, s, generator=generator))
                  for s in shapes]
        errors.append(_error(modules["dynamic"], expansion, padded, mask))
        rows.append({"expansion": name, "terms": len(expansion), "example_shape": list(ids.shape),
                     "trace_s_dynamic": round(min(trace["dynamic"]), 2),
                     "trace_s_fixed": round(min(trace["fixed"]), 2),
                     "trace_ratio": round(min(trace["dynamic"]) / min(trace["fixed"]), 2),
                     "run_s_dynamic": round(run["dynamic"], 4), "run_s_fixed": round(run["fixed"], 4),
                     "run_ratio": round(run["dynamic"] / run["fixed"], 2),
                     "max_relative_error_other_shapes": max(errors),
                     "other_shapes": [*[list(s) for s in shapes], [*padded.shape, "padded"]]})
    print("expansion | terms | trace s dynamic | trace s fixed | ratio | run s dynamic | run s fixed | "
          "ratio | max rel. error on 3 other shapes + padded")
    for r in rows:
        print(f"{r['expansion']} | {r['terms']} | {r['trace_s_dynamic']} | {r['trace_s_fixed']} | "
              f"{r['trace_ratio']} | {r['run_s_dynamic']} | {r['run_s_fixed']} | {r['run_ratio']} | "
              f"{r['max_relative_error_other_shapes']:.2g}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
                   f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "command": f"python benchmarks/bench_emit_shapes.py --repeats {args.repeats}",
        "results": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
