"""Full-vocabulary bigram tables of SmolLM2 against the matmul floor.

E→U and E→MLP_last→U over all V = 49152 tokens (d = 576), global top-100, streamed in row chunks:
time against the floor (2·V²·d FLOPs for the unembedding, plus the MLP's FLOPs for the second
path, at the float32 matmul rate measured in the same run on the same shapes) and the peak RSS
above the loaded model (sampled every 5 ms).

    python benchmarks/bench_ngrams.py [--chunk 1024] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import PeakRSS

import jetgraph
from jetgraph.applications import ngram_table
from jetgraph.passes import path_term

RESULTS = Path(__file__).resolve().parent / "results" / "ngrams.json"


def readout_rate(d: int, vocab: int, chunk: int, repeats: int = 5) -> float:
    """FLOP/s of the unembedding matmul at the table's own shape ([chunk, d] × [d, V])."""
    x, u = torch.randn(chunk, d), torch.randn(vocab, d)
    x @ u.T
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x @ u.T
        best = min(best, time.perf_counter() - start)
    return 2 * chunk * d * vocab / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--top", type=int, default=100)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = jetgraph.load_model("smollm2")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    prog = jetgraph.capture(model, ids, granularity="block")
    vocab, d = prog.decoder.unembedding.shape
    rate = readout_rate(d, vocab, args.chunk)
    mlp = prog.at("sublayer").units[-1]
    with FlopCounterMode(display=False) as counter:
        mlp(torch.randn(args.chunk, 1, d))
    mlp_flops = counter.get_total_flops() * vocab / args.chunk
    rows = []
    for spec, extra in (("E→U", 0.0), ("E→MLP_last→U", mlp_flops)):
        floor = (2 * vocab * vocab * d + extra) / rate
        times, peaks = [], []
        for _ in range(args.repeats):
            with PeakRSS() as peak:
                start = time.perf_counter()
                table = ngram_table(prog, spec, top=args.top, chunk=args.chunk, progress=False)
                times.append(time.perf_counter() - start)
            peaks.append(peak.above_start_gb)
        best = min(times)
        first = table.entries(tokenizer)[0]
        rows.append({"path": path_term(prog, spec).name, "vocab": vocab, "d": d, "chunk": args.chunk,
                     "seconds": round(best, 2), "floor_s": round(floor, 2),
                     "over_floor": round(best / floor, 3),
                     "peak_rss_above_model_gb": round(max(peaks), 3),
                     "model_rss_gb": round(peak.start_gb, 2),
                     "top1": f"{first['context']!r}→{first['next']!r}"})
        print(json.dumps(rows[-1], ensure_ascii=False))
    print(f"\nmatmul rate {rate / 1e9:.1f} GFLOP/s ([{args.chunk}, {d}] x [{d}, {vocab}])")
    print("path | seconds | floor_s | over_floor | peak RSS above model (GB)")
    for row in rows:
        print(f"{row['path']} | {row['seconds']} | {row['floor_s']} | {row['over_floor']} | "
              f"{row['peak_rss_above_model_gb']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "command": f"python benchmarks/bench_ngrams.py --chunk {args.chunk} --repeats {args.repeats}",
        "matmul_gflops": round(rate / 1e9, 1), "results": rows}, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
