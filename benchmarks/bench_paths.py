"""SmolLM2 bigram paths: the attention-free order-0 paths of length ≤ 2 over 60 sublayer units.

Enumerates and evaluates the 466 paths (embed→unembed, embed→mlp_i→unembed,
embed→mlp_i→mlp_j→unembed) of a 4^30-path expansion without materialising it; prints time and
peak RSS and writes benchmarks/results/paths.json.

    python benchmarks/bench_paths.py [--text "..."]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

import jetgraph
from jetgraph.passes.paths import count_paths, expand_paths

RESULTS = Path(__file__).resolve().parent / "results" / "paths.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", default="The capital of France is")
    args = parser.parse_args()
    model, tokenizer = jetgraph.load_model("smollm2")
    ids = tokenizer(args.text, return_tensors="pt", add_special_tokens=False).input_ids
    prog = jetgraph.capture(model, ids, granularity="block")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    start = time.perf_counter()
    paths = expand_paths(prog, granularity="sublayer", exclude={"attn"}, max_length=2)
    count = paths.count()
    enumerated = time.perf_counter()
    with torch.no_grad():
        values = paths.expansion().evaluate(ids)
    evaluated = time.perf_counter()
    with torch.no_grad():
        forward = time.perf_counter()
        prog(ids)
        forward = time.perf_counter() - forward
    row = {
        "total_paths_sublayer": str(count_paths(prog, "sublayer")),
        "selected_paths": count,
        "enumerate_s": round(enumerated - start, 4),
        "evaluate_s": round(evaluated - enumerated, 3),
        "forward_s": round(forward, 4),
        "tokens": int(ids.shape[1]),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "rss_before_gb": round(rss_before, 2),
        "relative_remainder": (values.remainder.norm() / values.target.norm()).item(),
    }
    for key, value in row.items():
        print(f"{key:22s} {value}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "command": "python benchmarks/bench_paths.py", "results": row}, indent=2) + "\n")


if __name__ == "__main__":
    main()
