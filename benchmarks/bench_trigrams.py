"""Full-size pair (trigram) tables: TinyStories' V² contexts in one process and over gloo ranks,
a SmolLM2 subset, and the planner's cost of SmolLM2's full table on a GPU.

1. TinyStories-656K (V = 2048, d = 128): ``E→attn0→U`` and ``E→attn0→mlp0→U`` on all 4.2 M
   pairs (global top-100 by logit), time against the matmul floor (2·d·V FLOPs per context for
   the unembedding, at the rate measured in the same run on the table's own shape), peak RSS.
2. The same tables by probability with a per-last-token top-5, in one process and split over
   1, 2 and 4 gloo ranks started by torchrun on this machine: time, peak RSS per rank, and
   whether the merged table equals the single-process one exactly.
3. SmolLM2-135M (V = 49152): ``E→attn0→U`` over ``--smollm2-first`` first tokens × the whole
   vocabulary (the issue's 4096 first tokens is a GPU job: its plan is printed), and the plan
   of the full V² table at a stated GPU throughput.

    python benchmarks/bench_trigrams.py [--ranks 1 2 4] [--smollm2-first 8] [--first N]

Results: benchmarks/results/trigrams.json (quoted in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import PeakRSS
from bench_ngrams import readout_rate

RESULTS = Path(__file__).resolve().parent / "results" / "trigrams.json"
TINYSTORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "tinystories-656k"
PATHS = ("E→attn0→U", "E→attn0→mlp0→U")
GPU_FLOPS = 400e12  # sustained bf16 dense matmul of one H100/H200-class GPU (peak ≈ 990e12)
GPU_ELEMENTS = 1.0e12  # float32 elements per second through the top-k passes (≈ 4 TB/s of reads)
FIELDS = ("top_values", "top_logits", "top_index", "row_max", "log_sum", "last_values", "last_logits",
          "last_index")


def tinystories():
    from transformers import AutoModelForCausalLM

    import jetgraph

    model = AutoModelForCausalLM.from_pretrained(TINYSTORIES)
    return jetgraph.capture(model, granularity="block")


def timed_table(prog, path: str, **options):
    from jetgraph.applications import ngram_table

    with PeakRSS() as peak:
        start = time.perf_counter()
        table = ngram_table(prog, path, progress=False, max_seconds=None, **options)
        seconds = time.perf_counter() - start
    return table, seconds, peak


def worker(spec_file: str) -> None:
    """One torchrun rank: the table of the spec, its time and this rank's peak RSS."""
    spec = json.loads(Path(spec_file).read_text())
    torch.set_grad_enabled(False)
    prog = tinystories()
    table, seconds, peak = timed_table(prog, spec["path"], shard="auto", **spec["options"])
    rank = int(os.environ["RANK"])
    report = {"rank": rank, "seconds": seconds, "peak_rss_gb": peak.peak_gb,
              "rss_above_start_gb": peak.above_start_gb}
    Path(spec["out"]).with_suffix(f".rank{rank}.json").write_text(json.dumps(report))
    if rank == 0:
        torch.save({name: getattr(table, name) for name in FIELDS}, spec["out"])


def distributed(path: str, options: dict, ranks: int, folder: Path) -> dict:
    spec = folder / f"spec-{ranks}.json"
    out = folder / f"table-{ranks}.pt"
    spec.write_text(json.dumps({"path": path, "options": options, "out": str(out)}))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               __file__, "--worker", str(spec)]
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "LOGLEVEL": "ERROR"})
    wall = time.perf_counter() - start
    reports = [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(ranks)]
    return {"wall_s": wall, "table_s": max(r["seconds"] for r in reports),
            "peak_rss_per_rank_gb": [round(r["peak_rss_gb"], 3) for r in reports],
            "rss_above_start_per_rank_gb": [round(r["rss_above_start_gb"], 3) for r in reports],
            "tensors": torch.load(out)}


def same(saved: dict, table) -> bool:
    return all((saved[n] is None and getattr(table, n) is None) or torch.equal(saved[n], getattr(table, n))
               for n in FIELDS)


def smollm2(first: int) -> dict:
    import jetgraph
    from jetgraph.applications import ngram_plan

    model, tokenizer = jetgraph.load_model("smollm2")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    prog = jetgraph.capture(model, ids, granularity="block")
    vocab, d = prog.decoder.unembedding.shape
    result = {"vocab": vocab, "d": d}
    issue = ngram_plan(prog, "E→attn0→U", sources=range(4096), rank="logit")
    full = ngram_plan(prog, "E→attn0→U", rank="logit")
    for name, plan in (("first_4096", issue), ("full", full)):
        gpu = plan.seconds_at(GPU_FLOPS, GPU_ELEMENTS)
        result[f"plan_{name}"] = {"contexts": plan.items, "tflop": round(plan.flops / 1e12, 1),
                                  "cpu_estimate_h": round(plan.seconds / 3600, 2),
                                  "gpu_estimate_h": round(gpu / 3600, 3)}
        print(f"plan {name}: {plan.describe()}; at {GPU_FLOPS / 1e12:.0f} TFLOP/s and "
              f"{GPU_ELEMENTS:.0e} elements/s: {gpu / 3600:.3g} GPU-hours")
    if first:
        rate = readout_rate(d, vocab, 1024, repeats=3)
        table, seconds, peak = timed_table(prog, "E→attn0→U", sources=range(first), rank="logit", top=100)
        floor = first * vocab * 2 * d * vocab / rate
        top = table.entries(tokenizer)[0]
        result["subset"] = {"first_tokens": first, "contexts": first * vocab, "seconds": round(seconds, 1),
                            "floor_s": round(floor, 1), "over_floor": round(seconds / floor, 2),
                            "matmul_gflops": round(rate / 1e9, 1),
                            "peak_rss_above_model_gb": round(peak.above_start_gb, 3),
                            "top1": f"{top['context']!r}→{top['next']!r}"}
        print(json.dumps(result["subset"], ensure_ascii=False))
    return result


def chunk_ratios(prog, path: str, chunk: int, count: int = 40) -> dict:
    """Split over whole per chunk of ``chunk`` pairs, alternated ``count`` times in one process
    (each chunk a different row block): the median ratio and its spread."""
    import statistics

    from jetgraph.applications.ngrams import NgramQuery

    job = NgramQuery(path).bind(prog, chunk)
    evaluator = job.evaluator()
    evaluator.verify(job.probe())
    split_modes, whole_modes = evaluator.modes, evaluator._choose_modes(split=False)
    times: dict[str, list[float]] = {"split": [], "whole": []}
    for index in range(count + 2):  # the first two: warm-up (tracing the replay)
        ids = job.contexts.rows(index * chunk, (index + 1) * chunk)
        for name, modes in (("split", split_modes), ("whole", whole_modes))[:: 1 if index % 2 else -1]:
            evaluator.modes = modes
            start = time.perf_counter()
            evaluator(ids)
            if index >= 2:
                times[name].append(time.perf_counter() - start)
    ratios = sorted(s / w for s, w in zip(times["split"], times["whole"], strict=True))
    quartiles = statistics.quantiles(ratios, n=4)
    return {"chunk": chunk, "split_ms": round(1e3 * statistics.median(times["split"]), 2),
            "whole_ms": round(1e3 * statistics.median(times["whole"]), 2),
            "ratio_median": round(statistics.median(ratios), 3),
            "ratio_quartiles": [round(quartiles[0], 3), round(quartiles[2], 3)], "chunks": count}


def split_comparison(prog, first_tokens: int | None, chunk: int, repeats: int = 1) -> list[dict]:
    """The full tables with the attention unit split by position (the first token's work once
    per row block) and whole, alternated in one process: times, FLOPs and whether they agree;
    and the per-chunk ratio over many alternated chunks (the full tables vary by ±20% here)."""
    from jetgraph.applications.ngrams import NgramQuery, sweep
    from jetgraph.applications.ngrams.evaluator import PathEvaluator

    vocab = prog.decoder.unembedding.shape[0]
    first = None if first_tokens is None else list(range(first_tokens))
    rows = []
    for path in PATHS:
        per_chunk = [chunk_ratios(prog, path, size) for size in sorted({chunk, 8192})]
        print(path, json.dumps(per_chunk), flush=True)
        times: dict[bool, list[float]] = {True: [], False: []}
        tables, flops = {}, {}
        for _ in range(repeats):
            for split in (False, True):
                PathEvaluator.split_positions = split
                job = NgramQuery(path, sources=first).bind(prog, chunk)
                flops[split] = sweep._plan(job, job.evaluator()).flops
                tables[split], seconds, _ = timed_table(prog, path, sources=first, chunk=chunk, top=100,
                                                        rank="logit")
                times[split].append(seconds)
                print(f"{path} split={split}: {seconds:.1f} s", flush=True)
        PathEvaluator.split_positions = True
        whole, split = tables[False], tables[True]
        rows.append({"path": path, "contexts": (first_tokens or vocab) * vocab, "chunk": chunk,
                     "whole_s": [round(t, 1) for t in times[False]],
                     "split_s": [round(t, 1) for t in times[True]],
                     "whole_tflop": round(flops[False] / 1e12, 2),
                     "split_tflop": round(flops[True] / 1e12, 2),
                     "same_top_indices": bool(torch.equal(whole.top_index, split.top_index)),
                     "top_value_max_abs_diff": float((whole.top_values - split.top_values).abs().max()),
                     "per_chunk": per_chunk})
        print(json.dumps(rows[-1], ensure_ascii=False), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--ranks", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--first", type=int, default=None, help="first tokens (default: all 2048)")
    parser.add_argument("--smollm2-first", type=int, default=8, help="SmolLM2 subset (0: plans only)")
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--split-only", action="store_true",
                        help="only compare split and whole position-mixing units (issue 14's last item)")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    torch.set_grad_enabled(False)
    prog = tinystories()
    if args.split_only:
        previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        previous["position_split"] = split_comparison(prog, args.first, args.chunk)
        previous["position_split_command"] = "python benchmarks/bench_trigrams.py " + " ".join(sys.argv[1:])
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(previous, indent=2, ensure_ascii=False) + "\n")
        return
    vocab, d = prog.decoder.unembedding.shape
    first = None if args.first is None else list(range(args.first))
    contexts = (args.first or vocab) * vocab
    rate_before = readout_rate(d, vocab, args.chunk)
    rows = []
    for path in PATHS:
        _, seconds, peak = timed_table(prog, path, sources=first, chunk=args.chunk, top=100, rank="logit")
        rows.append({"path": path, "contexts": contexts, "options": "top 100 by logit", "ranks": "-",
                     "seconds": round(seconds, 1), "peak_rss_above_model_gb": round(peak.above_start_gb, 3)})
        print(json.dumps(rows[-1], ensure_ascii=False))
    rate = max(rate_before, readout_rate(d, vocab, args.chunk))
    floor = contexts * 2 * d * vocab / rate
    for row in rows:
        row["floor_s"], row["over_floor"] = round(floor, 1), round(row["seconds"] / floor, 2)
    options = {"first": first, "chunk": args.chunk, "top": 100, "rank": "prob", "last_top": 5}
    with tempfile.TemporaryDirectory() as folder:
        for path in PATHS:
            single, seconds, peak = timed_table(prog, path, shard=None, **options)
            rows.append({"path": path, "contexts": contexts, "options": "top 100 by prob, last_top 5",
                         "ranks": "1 (no torch.distributed)", "seconds": round(seconds, 1),
                         "peak_rss_above_model_gb": round(peak.above_start_gb, 3)})
            print(json.dumps(rows[-1], ensure_ascii=False))
            for ranks in args.ranks:
                run = distributed(path, options, ranks, Path(folder))
                rows.append({"path": path, "contexts": contexts, "options": "top 100 by prob, last_top 5",
                             "ranks": ranks, "seconds": round(run["table_s"], 1),
                             "wall_s": round(run["wall_s"], 1),
                             "peak_rss_per_rank_gb": run["peak_rss_per_rank_gb"],
                             "rss_above_start_per_rank_gb": run["rss_above_start_per_rank_gb"],
                             "equal_to_single_process": same(run["tensors"], single)})
                print(json.dumps(rows[-1], ensure_ascii=False))
    print(f"\nTinyStories: matmul {rate / 1e9:.1f} GFLOP/s on [{args.chunk}, {d}] x [{d}, {vocab}]; "
          f"floor {floor:.1f} s for {contexts:,} contexts")
    print("path | options | ranks | seconds | × floor | peak RSS (GB) | equal")
    for row in rows:
        memory = row.get("peak_rss_above_model_gb", row.get("rss_above_start_per_rank_gb"))
        print(f"{row['path']} | {row['options']} | {row['ranks']} | {row['seconds']} | "
              f"{row.get('over_floor', '-')} | {memory} | {row.get('equal_to_single_process', '-')}")
    small = smollm2(args.smollm2_first)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_trigrams.py " + " ".join(sys.argv[1:])
    RESULTS.write_text(json.dumps({
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
                   f"torch {torch.__version__}",
        "command": command.strip(), "tinystories_matmul_gflops": round(rate / 1e9, 1),
        "tinystories": rows, "smollm2": small,
        "gpu_rates": {"flops": GPU_FLOPS, "elements": GPU_ELEMENTS}}, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
