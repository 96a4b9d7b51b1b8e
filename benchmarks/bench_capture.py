"""Capture time and memory: SmolLM2-135M and random GPT-2-medium-size models of 12 and 48 layers.

Each model runs in its own subprocess so that its peak RSS is its own. Capture is timed both
ways, alternating: with shared block graphs (the default: one block exported per structure
group, :mod:`jetgraph.capture.shared`) and exporting the whole model (``share_blocks=False``).
Prints a table and writes benchmarks/results/capture.json, which docs/benchmarks.md quotes.

    python benchmarks/bench_capture.py            # every model, 3 repeats each
    python benchmarks/bench_capture.py --repeats 1
Targets (issue 12): SmolLM2 captures in <= 4 s; the 48-layer model in <= 2x the 12-layer one's
time; capture adds at most 10% of the parameters' bytes, measured as the growth of anonymous
resident memory over a first capture after one forward (the weights load lazily from
safetensors: a forward pages them in as file-backed memory, shared with the file, not a copy).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "capture.json"
MODELS = ("smollm2", "gpt2-medium-12-random", "gpt2-medium-48-random")


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def _status_gb() -> dict[str, float]:
    """Resident anonymous and file-backed memory of this process (``/proc/self/status``), in GB."""
    values = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) / 1e6
    return values


def measure(name: str, repeats: int) -> dict[str, object]:
    """Load ``name``, then time export, lowering and lift ``repeats`` times (in this process)."""
    import torch
    import transformers  # imported before timing: "load" is the model load, not the import

    import jetgraph
    from jetgraph.capture.shared import find_block_stack
    from jetgraph.capture.zoo import gpt2_small_config

    start = time.perf_counter()
    if name == "smollm2":
        model, tokenizer = jetgraph.load_model("smollm2")
        ids = tokenizer("The capital of France is", return_tensors="pt", add_special_tokens=False).input_ids
    else:
        torch.manual_seed(0)
        layers = int(name.split("-")[2])
        config = gpt2_small_config(layers, n_embd=1024, n_head=16)  # GPT-2 medium's width
        model = transformers.GPT2LMHeadModel(config).eval()
        ids = torch.randint(0, model.config.vocab_size, (1, 16))
    load_s = time.perf_counter() - start
    rss_loaded = _rss_gb()
    # Memory: the weights load lazily from safetensors (file-backed pages, paged in by the first
    # forward, shared with the file); what capture itself allocates is anonymous memory.
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    forward_mem = _status_gb()
    first = jetgraph.capture(model, ids, granularity="block")
    capture_mem = _status_gb()
    param_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    memory = {"param_gb": round(param_gb, 3), "anon_after_forward_gb": round(forward_mem["RssAnon"], 3),
              "file_after_forward_gb": round(forward_mem["RssFile"], 3),
              "anon_after_capture_gb": round(capture_mem["RssAnon"], 3),
              "capture_anon_over_params": round((capture_mem["RssAnon"] - forward_mem["RssAnon"]) / param_gb,
                                                3)}
    del first
    times: dict[str, list[float]] = {"shared": [], "full": []}
    for _ in range(repeats):  # alternate the two ways, so that machine noise hits both
        for way in ("shared", "full"):
            t0 = time.perf_counter()
            prog = jetgraph.capture(model, ids, share_blocks=way == "shared", granularity="block")
            times[way].append(time.perf_counter() - t0)
            del prog
    with torch.no_grad():
        prog = jetgraph.capture(model, ids, granularity="block")
        error = (prog(ids) - model(input_ids=ids, use_cache=False).logits).abs().max().item()
    stack = find_block_stack(model)  # the blocks capture exports; the others copy their graphs
    exported = len(stack.representatives) if stack is not None else len(prog.blocks)
    return {
        "model": name,
        "layers": len(prog.blocks),
        "sublayer_units": len(prog.sublayers),
        "parameters": sum(p.numel() for p in model.parameters()),
        "load_s": round(load_s, 2),
        "capture_s_best": round(min(times["shared"]), 2),
        "capture_s_all": [round(t, 2) for t in times["shared"]],
        "full_export_capture_s_best": round(min(times["full"]), 2),
        "full_export_capture_s_all": [round(t, 2) for t in times["full"]],
        "exported_blocks": exported,
        "rss_after_load_gb": round(rss_loaded, 2),
        "peak_rss_gb": round(_rss_gb(), 2),
        "max_abs_logit_error": error,
        "memory": memory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", choices=MODELS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.repeats)))
        return
    rows = []
    for name in MODELS:
        out = subprocess.run([sys.executable, __file__, "--one", name, "--repeats", str(args.repeats)],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    header = ("model", "layers", "load s", "capture s (shared blocks, best)", "all runs",
              "capture s (whole-model export, best)", "all runs", "RSS after load GB", "peak RSS GB",
              "max |Δlogit|")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join(str(x) for x in (r["model"], r["layers"], r["load_s"], r["capture_s_best"],
                                          r["capture_s_all"], r["full_export_capture_s_best"],
                                          r["full_export_capture_s_all"], r["rss_after_load_gb"],
                                          r["peak_rss_gb"], f"{r['max_abs_logit_error']:.2g}")))
    by_name = {r["model"]: r for r in rows}
    deep, shallow = by_name["gpt2-medium-48-random"], by_name["gpt2-medium-12-random"]
    print(f"\n48 layers / 12 layers: shared {deep['capture_s_best'] / shallow['capture_s_best']:.2f}x "
          f"(target <= 2), whole-model export "
          f"{deep['full_export_capture_s_best'] / shallow['full_export_capture_s_best']:.2f}x")
    print("\nmodel | parameters GB | anon after a forward GB | file-backed after a forward GB | anon after "
          "capture GB | capture's anon growth / parameters (target <= 0.10)")
    for r in rows:
        m = r["memory"]
        print(f"{r['model']} | {m['param_gb']} | {m['anon_after_forward_gb']} | "
              f"{m['file_after_forward_gb']} | {m['anon_after_capture_gb']} | "
              f"{m['capture_anon_over_params']}")
    import torch

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
                   f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "command": "python benchmarks/bench_capture.py --repeats " + str(args.repeats),
        "results": rows,
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
