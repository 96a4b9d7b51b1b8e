"""Emitted code against term-by-term evaluation and the FLOP floor.

1. The order-0 exhaustive expansion (Algorithm 2 in stream space, one centre h_0, unit weights)
   of GPT-2-config models (random init, d=768, 12 heads) with 8 and 12 blocks, seq 32: 2^L terms
   from 2^L − 1 block applications. Compared in one run:
   - emitted: ``jetgraph.emit`` (one batched call per block), terms only like the baselines
     (``remainder=False``), and with the model's own forward and the remainder,
   - interpreter: ``Expansion.evaluate`` (2^L − 1 applications one at a time, shared prefixes once),
   - term by term: every path evaluated on its own from h_0, as the paper's code does
     (L·2^(L−1) applications; sampled and extrapolated where that takes minutes),
   - compiled: the same emitted GraphModule through ``torch.compile`` (inductor),
   - FLOP floor: (2^L − 1) × the block's FLOPs (torch's FlopCounterMode) at the matmul rate
     measured in the same run.
2. The order-1 iterative lens over all SmolLM2 layers (one decoder jet per stream state h_0..h_L,
   16 tokens): emitted against the interpreter.

    python benchmarks/bench_codegen.py [--layers 8 12] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import random
import resource
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import jetgraph
from jetgraph.capture.zoo import gpt2_small_config

RESULTS = Path(__file__).resolve().parent / "results" / "codegen.json"


def best_of(fn, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: str, repeats: int = 5) -> float:
    """FLOP/s of a GPT-2-MLP-shaped float32 matmul ([8192, 768] × [768, 3072])."""
    a = torch.randn(8192, 768, device=device)
    b = torch.randn(768, 3072, device=device)
    a @ b
    seconds = best_of(lambda: a @ b, repeats, device)
    return 2 * 8192 * 768 * 3072 / seconds


def emit_timed(expansion: jetgraph.Expansion, ids: torch.Tensor, device: str,
               **options: bool) -> tuple[torch.fx.GraphModule, float]:
    """The emitted module on ``device`` and the seconds its trace took."""
    start = time.perf_counter()
    module = jetgraph.emit(expansion, ids, **options)
    return module.to(device), time.perf_counter() - start


def relative_error(out: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """Largest term difference, relative to the largest reference term (as in the tests)."""
    scale = max(v.abs().max().item() for v in reference.values())
    return max((out[name] - value).abs().max().item() for name, value in reference.items()) / scale


def exhaustive(layers: int, seq: int, repeats: int, sample: int, device: str, rate: float,
               interpreter: bool, compile_too: bool) -> dict:
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(gpt2_small_config(layers)).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    prog = jetgraph.capture(model, ids, granularity="block")
    expansion = jetgraph.expand_stream(prog, centers=[jetgraph.stream_term(prog, 0)], weights="unit")
    module, emit_s = emit_timed(expansion, ids, device)
    terms_only, _ = emit_timed(expansion, ids, device, remainder=False)  # what the baselines compute
    prog.to(device)
    ids_d = ids.to(device)
    with torch.no_grad():
        out = module(ids_d)
        with_remainder_s = best_of(lambda: module(ids_d), repeats, device)
        emitted_s = best_of(lambda: terms_only(ids_d), repeats, device)
        h0 = prog.stream(ids_d)[0]
        with FlopCounterMode(display=False) as counter:
            prog.units[0](h0)
        flops = counter.get_total_flops()
        applications = 2**layers - 1
        floor_s = applications * flops / rate  # rate: the best of the run's measurements
        row = {"layers": layers, "terms": len(expansion), "applications": applications,
               "block_gflop": round(flops / 1e9, 4), "emit_trace_s": round(emit_s, 2),
               "emitted_s": round(emitted_s, 4), "with_remainder_s": round(with_remainder_s, 4),
               "floor_s": round(floor_s, 4),
               "emitted_over_floor": round(emitted_s / floor_s, 2)}
        # term by term: each path from h_0 through its blocks, nothing shared (the paper's code)
        subsets = [s for n in range(layers + 1) for s in itertools.combinations(range(layers), n)]
        chosen = subsets if len(subsets) <= sample else random.Random(0).sample(subsets, sample)
        units = prog.units

        def one_by_one() -> None:
            for subset in chosen:
                h = h0
                for i in subset:
                    h = units[i](h)

        measured = best_of(one_by_one, 1, device)
        term_s = measured * len(subsets) / len(chosen)
        # time the emitted code again after the baselines, against drift on shared machines
        emitted_s = min(emitted_s, best_of(lambda: terms_only(ids_d), repeats, device))
        row["emitted_s"] = round(emitted_s, 4)
        row["emitted_over_floor"] = round(emitted_s / floor_s, 2)
        if compile_too:  # the same emitted GraphModule through torch.compile (inductor)
            compiled = torch.compile(terms_only)
            start = time.perf_counter()
            compiled(ids_d)
            row["compile_s"] = round(time.perf_counter() - start, 1)
            compiled_s = best_of(lambda: compiled(ids_d), repeats, device)
            row.update({"compiled_s": round(compiled_s, 4),
                        "compiled_over_floor": round(compiled_s / floor_s, 2),
                        "compiled_speedup_vs_term_by_term": round(term_s / compiled_s, 1)})
        row.update({"term_by_term_s": round(term_s, 3),
                    "term_by_term_sampled": f"{len(chosen)}/{len(subsets)} paths",
                    "speedup_vs_term_by_term": round(term_s / emitted_s, 1)})
        if interpreter:
            start = time.perf_counter()
            reference = expansion.evaluate(ids_d)
            row["interpreter_s"] = round(time.perf_counter() - start, 3)
            row["speedup_vs_interpreter"] = round(row["interpreter_s"] / emitted_s, 1)
            row["max_error_vs_interpreter"] = relative_error(out, reference.terms)
    return row


def lens(order: int, tokens: int, repeats: int, device: str) -> dict:
    model, tokenizer = jetgraph.load_model("smollm2")
    text = ("The quick brown fox jumps over the lazy dog, and then it runs back into the forest to find "
            "its friends")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :tokens]
    prog = jetgraph.capture(model, ids, granularity="block")
    states = [jetgraph.stream_term(prog, i) for i in range(len(prog.units) + 1)]
    expansion = jetgraph.expand(prog, "decoder", states, order=order, weights="unit")
    module, emit_s = emit_timed(expansion, ids, device)
    prog.to(device)
    ids_d = ids.to(device)
    with torch.no_grad():
        out = module(ids_d)
        emitted_s = best_of(lambda: module(ids_d), repeats, device)
        interpreter_s = best_of(lambda: expansion.evaluate(ids_d), repeats, device)
        forward_s = best_of(lambda: prog(ids_d), repeats, device)
        reference = expansion.evaluate(ids_d)
    error = relative_error(out, reference.terms)
    return {"model": "SmolLM2-135M", "order": order, "tokens": int(ids.shape[1]),
            "centres": len(states), "terms": len(expansion), "emit_trace_s": round(emit_s, 2),
            "emitted_s": round(emitted_s, 4), "interpreter_s": round(interpreter_s, 4),
            "speedup": round(interpreter_s / emitted_s, 2), "forward_s": round(forward_s, 4),
            "max_error_vs_interpreter": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 12])
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sample", type=int, default=256,
                        help="paths timed one by one before extrapolating (default 256)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-interpreter-above", type=int, default=12,
                        help="skip the interpreter baseline above this many layers")
    parser.add_argument("--skip-lens", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    rate = max(matmul_rate(args.device), matmul_rate(args.device))  # best of two 5-run measurements
    print(f"matmul rate: {rate / 1e9:.1f} GFLOP/s ({args.device}, {torch.get_num_threads()} threads)")
    rows = []
    for layers in args.layers:
        row = exhaustive(layers, args.seq, args.repeats, args.sample, args.device, rate,
                         layers <= args.no_interpreter_above, not args.no_compile)
        rows.append(row)
        print(json.dumps(row))
    lens_rows = []
    if not args.skip_lens:
        for order in (0, 1):
            lens_rows.append(lens(order, 16, args.repeats, args.device))
            print(json.dumps(lens_rows[-1]))
    header = ("layers", "terms", "emitted_s", "with_remainder_s", "compiled_s", "floor_s",
              "emitted_over_floor", "term_by_term_s", "speedup_vs_term_by_term",
              "compiled_speedup_vs_term_by_term", "interpreter_s", "speedup_vs_interpreter")
    print("\n" + " | ".join(header))
    for row in rows:
        print(" | ".join(str(row.get(key, "-")) for key in header))
    for row in lens_rows:
        print(f"lens order {row['order']}: emitted {row['emitted_s']} s, interpreter "
              f"{row['interpreter_s']} s ({row['speedup']}x), forward {row['forward_s']} s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                   f"device {args.device}",
        "command": "python benchmarks/bench_codegen.py " + " ".join(
            f"--layers {' '.join(map(str, args.layers))}".split()),
        "matmul_gflops": round(rate / 1e9, 1), "peak_rss_gb": round(peak, 2),
        "exhaustive": rows, "lens": lens_rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
