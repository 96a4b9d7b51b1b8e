"""The GPU check: jetgraph on one CUDA device against its CPU results, in under 10 minutes.

Prepared for the day a device is lent (none is, on the project's CPU machine). Each check runs
the same computation on the device and on the CPU and records the time on each and the largest
difference, against the tolerance of its dtype (docs/precision.md):

1. capture + lens, float32: ``jetgraph.capture`` of the model on the device, its logits and the
   order-0/1 lens (cosine per state) against the CPU program's;
2. capture + lens, bf16: the same with the model loaded in bf16, against the CPU float32 result;
3. the full-vocabulary default bigram read-out (``jetgraph.ngrams``, every token as a row) on the
   device; its top entries against the CPU table over the rows they come from;
4. emitted code (``jetgraph.emit`` of E→U and E→MLP_last→U on the device), run eagerly and through
   ``torch.compile``, against the CPU reference evaluator (``Expansion.evaluate``);
5. with two or more devices: the ``E→U`` table split over two NCCL ranks (``jetgraph ngrams
   --nproc 2 --device cuda``) against one process.

    python benchmarks/gpu_check.py                       # SmolLM2-135M on cuda:0 -> results/gpu.json
    python benchmarks/gpu_check.py --device cpu --model ../shared/models/tinystories-656k --out /tmp/g.json
                                                          # a rehearsal of every step here (CPU vs CPU)

Writes ``benchmarks/results/gpu.json`` (or ``--out``): the device, torch version, and per check its
status, seconds on each side and the error.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

import jetgraph
from jetgraph.precision import capture_tolerance

ROOT = Path(__file__).resolve().parents[1]
TEXT = "The capital of France is Paris, and the capital of Italy is"


def timed(function: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """(result, seconds), synchronising the device so the time is the work's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max(1, max |b|), in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def check_capture_lens(name: str, dtype: torch.dtype, device: torch.device, reference: dict) -> dict:
    """Capture and lens on the device in ``dtype`` against the CPU float32 program."""
    model, tokenizer = jetgraph.load_model(name, dtype=dtype)
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    model.to(device)
    prog, capture_seconds = timed(lambda: jetgraph.capture(model, ids.to(device), granularity="block"),
                                  device)
    with torch.no_grad():
        logits, _ = timed(lambda: prog(ids.to(device)), device)
        lens, lens_seconds = timed(lambda: jetgraph.lens(prog, ids.to(device), orders=(0, 1)), device)
    cosine = torch.stack([lens[k].metrics["cosine"].mean(-1).flatten() for k in (0, 1)])
    tolerance = capture_tolerance(dtype)
    errors = {"logits": relative(logits, reference["logits"]),
              "lens_cosine": float((cosine.cpu() - reference["cosine"]).abs().max())}
    return {"status": "pass" if max(errors.values()) <= tolerance else "fail",  # capture's own bound
            "tolerance": tolerance, "errors": errors, "device_seconds":
            {"capture": round(capture_seconds, 2), "lens": round(lens_seconds, 2)},
            "cpu_seconds": reference["seconds"]}


def cpu_reference(name: str) -> dict:
    """The CPU float32 program's logits and lens cosines on TEXT, and their times."""
    model, tokenizer = jetgraph.load_model(name)
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    prog, capture_seconds = timed(lambda: jetgraph.capture(model, ids, granularity="block"),
                                  torch.device("cpu"))
    with torch.no_grad():
        logits = prog(ids)
        lens, lens_seconds = timed(lambda: jetgraph.lens(prog, ids, orders=(0, 1)), torch.device("cpu"))
    cosine = torch.stack([lens[k].metrics["cosine"].mean(-1).flatten() for k in (0, 1)])
    return {"prog": prog, "tokenizer": tokenizer, "ids": ids, "logits": logits, "cosine": cosine,
            "seconds": {"capture": round(capture_seconds, 2), "lens": round(lens_seconds, 2)}}


def check_bigram_table(reference: dict, device: torch.device, top: int) -> dict:
    """The full-vocabulary default read-out on the device; its top entries against the CPU table
    over the rows they come from (the global top of a superset of those rows is the same)."""
    prog, tokenizer = reference["prog"], reference["tokenizer"]
    on_device = prog.to(device)
    table, seconds = timed(lambda: jetgraph.ngrams(on_device, tokenizer=tokenizer, top=top, max_seconds=None,
                                                   progress=False), device)
    entries = table.entries()
    rows = sorted({int(e["context_ids"].split()[-1]) for e in entries})
    cpu_table, cpu_seconds = timed(lambda: jetgraph.ngrams(prog.to("cpu"), tokenizer=tokenizer, top=top,
                                                           sources=rows, max_seconds=None, progress=False),
                                   torch.device("cpu"))
    cpu_entries = cpu_table.entries()
    same = [(e["context_ids"], e["next_id"]) for e in entries] == \
        [(e["context_ids"], e["next_id"]) for e in cpu_entries]
    error = max(abs(a["prob"] - b["prob"]) for a, b in zip(entries, cpu_entries, strict=True))
    vocab = int(prog.decoder.unembedding.shape[0])
    return {"status": "pass" if same and error <= 1e-5 else "fail", "rows": vocab, "top": top,
            "same_entries": same, "errors": {"prob": error}, "tolerance": 1e-5,
            "device_seconds": {"full_table": round(seconds, 2)},
            "cpu_seconds": {f"table_over_{len(rows)}_rows": round(cpu_seconds, 2)}}


def check_emitted_code(reference: dict, device: torch.device) -> dict:
    """Emitted code of two bigram paths, eager and compiled, against the CPU reference evaluator."""
    prog, ids = reference["prog"].to("cpu"), reference["ids"]
    sub = prog.at("sublayer")
    paths = ["E→U", "E→MLP_last→U"]
    with torch.no_grad():
        expected = jetgraph.expand_paths(sub, paths=paths).expansion().evaluate(ids).terms
    on_device = reference["prog"].to(device).at("sublayer")
    expansion = jetgraph.expand_paths(on_device, paths=paths).expansion()
    module, emit_seconds = timed(lambda: jetgraph.emit(expansion, ids.to(device)), device)
    with torch.no_grad():
        eager, eager_seconds = timed(lambda: module(ids.to(device)), device)
        compiled_module = torch.compile(module)
        compiled, first_call = timed(lambda: compiled_module(ids.to(device)), device)
        _, compiled_seconds = timed(lambda: compiled_module(ids.to(device)), device)
    errors = {f"eager {n}": relative(eager[n], expected[n]) for n in expected}
    errors |= {f"compiled {n}": relative(compiled[n], expected[n]) for n in expected}
    return {"status": "pass" if max(errors.values()) <= 1e-4 else "fail", "tolerance": 1e-4, "errors": errors,
            "device_seconds": {"emit": round(emit_seconds, 2), "eager_call": round(eager_seconds, 4),
                               "compile_and_first_call": round(first_call, 2),
                               "compiled_call": round(compiled_seconds, 4)}}


def check_nccl_table(name: str, folder: Path) -> dict:
    """``jetgraph ngrams --paths E→U`` over two NCCL ranks against one process (same CSV)."""
    if torch.cuda.device_count() < 2:
        return {"status": "skipped", "reason": f"{torch.cuda.device_count()} CUDA device(s); two are needed"}
    outputs = {}
    seconds = {}
    for label, extra in (("one process", []), ("two ranks", ["--nproc", "2"])):
        out = folder / f"{label.replace(' ', '_')}.csv"
        command = [sys.executable, "-m", "jetgraph", "ngrams", name, "--paths", "E→U", "--device", "cuda",
                   "--top", "200", "--max-time", "none", "--out", str(out), *extra]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        seconds[label] = round(time.perf_counter() - start, 2)
        if done.returncode != 0:
            return {"status": "fail",
                    "reason": f"{label}: exit {done.returncode}: {done.stderr.strip()[-500:]}"}
        with out.open() as handle:
            outputs[label] = [(r["context_ids"], r["next_id"], float(r["prob"]))
                              for r in csv.DictReader(handle)]
    a, b = outputs["one process"], outputs["two ranks"]
    same = [x[:2] for x in a] == [x[:2] for x in b]
    error = max(abs(x[2] - y[2]) for x, y in zip(a, b, strict=True))
    return {"status": "pass" if same and error <= 1e-6 else "fail", "same_entries": same,
            "errors": {"prob": error}, "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="a model name jetgraph.load_model accepts")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (a rehearsal of the steps)")
    parser.add_argument("--top", type=int, default=50, help="entries of the bigram table compared")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run this on a GPU machine, or --device cpu to rehearse the steps",
              file=sys.stderr)
        return 1
    results: dict[str, object] = {
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else platform.processor() or "cpu"),
        "torch": torch.__version__, "model": args.model, "command": " ".join(sys.argv), "checks": {}}
    start = time.perf_counter()
    reference = cpu_reference(args.model)
    checks: dict[str, Callable[[], dict]] = {
        "capture_lens_float32": lambda: check_capture_lens(args.model, torch.float32, device, reference),
        "capture_lens_bf16": lambda: check_capture_lens(args.model, torch.bfloat16, device, reference),
        "bigram_table_full_vocabulary": lambda: check_bigram_table(reference, device, args.top),
        "emitted_code_eager_and_compiled": lambda: check_emitted_code(reference, device),
    }
    with tempfile.TemporaryDirectory() as folder:
        if device.type == "cuda":
            checks["nccl_two_rank_table"] = lambda: check_nccl_table(args.model, Path(folder))
        for name, check in checks.items():
            try:
                outcome = check()
            except Exception as exc:  # record and go on: one failing check must not hide the others
                outcome = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                           "traceback": traceback.format_exc()[-2000:]}
            results["checks"][name] = outcome  # type: ignore[index]
            shown = json.dumps(outcome.get("errors", outcome.get("reason", outcome.get("error", ""))))
            print(f"{name:34s} {outcome['status']:8s} {shown}")
    results["seconds"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out} ({results['seconds']} s)")
    statuses = [c["status"] for c in results["checks"].values()]  # type: ignore[union-attr]
    return 0 if all(s in ("pass", "skipped") for s in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
