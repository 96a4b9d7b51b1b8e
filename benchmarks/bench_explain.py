"""Explaining one SmolLM2 prediction by its paths, against one forward of the model.

A 16-token prompt; the target is the model's own top token at the last position. Times, in one
process: one forward of the captured program (the baseline), the head view's first build (the
heads found from the graph, once per program), the first explanation (it also freezes every
unit's graph once per program), and then the explanation again (what each further target costs):
to 90% of the value or 2,000 expansions, whichever comes first. Memory: the peak RSS of an
explanation above the loaded model (the first call's: later calls reuse memory the process
already holds), against the peak of one forward with the autograd graph kept and its backward
(``--repeats`` runs, best time; the spread is printed).

    python benchmarks/bench_explain.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import jetgraph
from benchmarks._memory import PeakRSS
from jetgraph.applications.explain import explain_program

RESULTS = Path(__file__).resolve().parent / "results" / "explain.json"
TEXT = "The capital of France is Paris, and the capital of Germany is the city of"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=int, default=2000)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = jetgraph.load_model("smollm2")
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    prog = jetgraph.capture(model, ids)
    tokens = ids.shape[1]

    forwards = []
    for _ in range(args.repeats + 1):
        start = time.perf_counter()
        with torch.no_grad():
            prog(ids)
        forwards.append(time.perf_counter() - start)
    with PeakRSS() as forward_peak:
        logits = prog(ids)  # with the autograd graph kept, as a backward would need
        logits[0, -1].max().backward()
    model.zero_grad(set_to_none=True)
    del logits

    start = time.perf_counter()
    heads = len(prog.at("head").units)
    head_view = time.perf_counter() - start
    with PeakRSS() as first_peak:  # the first call's memory is new to the process
        start = time.perf_counter()
        first = explain_program(prog, ids, budget=args.budget)
        first_seconds = time.perf_counter() - start
    again, peaks = [], []
    for _ in range(args.repeats):
        with PeakRSS() as peak:
            start = time.perf_counter()
            result = explain_program(prog, ids, budget=args.budget)
            again.append(time.perf_counter() - start)
        peaks.append(peak.above_start_gb)
    rows = {
        "tokens": tokens, "units in the head view": heads, "budget": args.budget,
        "forward s (best)": min(forwards[1:]),
        "head view, first build s": head_view,
        "explain, first call s (freezes the graphs)": first_seconds,
        "explain s (best)": min(again), "explain s (median)": statistics.median(again),
        "explain s (max)": max(again),
        "expansions": result.expansions, "stopped": result.stopped,
        "completeness (listed / value)": result.completeness, "mass coverage": result.mass_coverage,
        "remainder": result.remainder, "value": result.value,
        "peak RSS above start, first explain GB": first_peak.above_start_gb,
        "peak RSS above start, later explains GB (max; memory reused)": max(peaks),
        "peak RSS above start, forward+backward GB": forward_peak.above_start_gb,
        "first call listed paths equal": [p.path for p in first.paths[:5]]
        == [p.path for p in result.paths[:5]],
    }
    width = max(map(len, rows))
    for name, value in rows.items():
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{name:<{width}}  {shown}")
    print(result.table(10))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": platform.platform(), "torch": torch.__version__,
                                   "threads": torch.get_num_threads(), "text": TEXT, **rows}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
