"""Half precision against float32 on real models: capture error, lens agreement, bigram overlap.

For each model the float32 and the 16-bit copy (``load_model(..., dtype=...)``, weights left in
their dtype) are captured on the same input; the iterative lens at orders 0–2 (one Taylor pass)
and global top-100 bigram tables (by probability) of E→U and E→MLP_last→U are computed from both.
Reported: the capture's max |logit error| against the model in its own dtype and its tolerance,
the lens cosine between the 16-bit and float32 lens logits (mean over states and positions, and
the worst state), top-1 agreement of the lens predictions, and |top-100 ∩ top-100| / 100.

    python benchmarks/bench_precision.py [--models tinystories smollm2] [--dtypes bfloat16 float16]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import jetgraph
from jetgraph.applications import iterative_lenses, ngram_table
from jetgraph.precision import capture_tolerance

RESULTS = Path(__file__).resolve().parent / "results" / "precision.json"
MODELS = {"tinystories": Path(__file__).resolve().parents[2] / "shared" / "models" / "tinystories-656k",
          "smollm2": "smollm2"}
TEXT = "The quick brown fox jumps over the lazy dog, and then it runs back into the forest"
PATHS = ("E→U", "E→MLP_last→U")


def measure(name: str, dtype: torch.dtype, top: int) -> dict:
    source = MODELS[name]
    reference, tokenizer = jetgraph.load_model(source)
    half, _ = jetgraph.load_model(source, dtype=dtype)
    ids = tokenizer(TEXT, return_tensors="pt", add_special_tokens=False).input_ids[:, :16]
    start = time.perf_counter()
    prog32 = jetgraph.capture(reference, ids, granularity="block")
    prog16 = jetgraph.capture(half, ids, granularity="block")
    capture_s = time.perf_counter() - start
    with torch.no_grad():
        own = half(input_ids=ids, use_cache=False).logits
        error = (prog16(ids).float() - own.float()).abs().max().item()
    row = {"model": name, "dtype": str(dtype).removeprefix("torch."), "tokens": int(ids.shape[1]),
           "capture_error": error,
           "capture_tolerance": capture_tolerance(dtype) * max(1.0, own.float().abs().max().item()),
           "capture_both_s": round(capture_s, 2), "lens": {}, "bigrams": {}}
    lens32, lens16 = iterative_lenses(prog32, ids, (0, 1, 2)), iterative_lenses(prog16, ids, (0, 1, 2))
    for order in (0, 1, 2):
        a, b = lens16[order].logits.float(), lens32[order].logits
        cosine = F.cosine_similarity(a, b, dim=-1)  # [states, batch, seq]
        row["lens"][order] = {"cosine_mean": round(cosine.mean().item(), 6),
                              "cosine_worst_state": round(cosine.mean((1, 2)).min().item(), 6),
                              "top1_agreement": round((a.argmax(-1) == b.argmax(-1)).float().mean().item(),
                                                      4)}
    for spec in PATHS:
        start = time.perf_counter()
        t32 = ngram_table(prog32, spec, top=top, rank="prob", progress=False, max_seconds=None)
        t16 = ngram_table(prog16, spec, top=top, rank="prob", progress=False, max_seconds=None)
        overlap = len(set(t32.top_index.tolist()) & set(t16.top_index.tolist())) / top
        seconds = round(time.perf_counter() - start, 1)
        row["bigrams"][t32.path] = {"top_overlap": overlap, "seconds_both": seconds}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tinystories", "smollm2"], choices=sorted(MODELS))
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    parser.add_argument("--top", type=int, default=100)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    rows = [measure(m, getattr(torch, d), args.top) for m in args.models for d in args.dtypes]
    print("\nmodel | dtype | capture error (tol) | lens cos 0/1/2 (worst state) | lens top-1 0/1/2 | "
          "bigram top-100 overlap")
    for r in rows:
        lens = r["lens"]
        print(f"{r['model']} | {r['dtype']} | {r['capture_error']:.3g} ({r['capture_tolerance']:.3g}) | "
              + " / ".join(f"{lens[k]['cosine_mean']:.5f} ({lens[k]['cosine_worst_state']:.4f})"
                           for k in (0, 1, 2))
              + " | " + " / ".join(f"{lens[k]['top1_agreement']:.3f}" for k in (0, 1, 2)) + " | "
              + ", ".join(f"{p}: {v['top_overlap']:.2f}" for p, v in r["bigrams"].items()))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_precision.py " + " ".join(
        ["--models", *args.models, "--dtypes", *args.dtypes])
    for row in rows:
        row["command"] = command
    kept = []  # rows of other (model, dtype) pairs from earlier runs stay
    if RESULTS.is_file():
        done = {(r["model"], r["dtype"]) for r in rows}
        kept = [r for r in json.loads(RESULTS.read_text())["results"] if (r["model"], r["dtype"]) not in done]
    RESULTS.write_text(json.dumps({
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "results": kept + rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
