"""Making an exported graph functional: jetgraph's one-walk pass against run_decompositions({}).

For tiny random models (the sweep's minimal recipe) whose exports keep in-place ops (MLA's
``copy_`` into a ``new_empty`` buffer, linear attention's chunk loops, MoE dispatch), the time of
``jetgraph.taylor.functional.functionalize`` on the exported module against
``ExportedProgram.run_decompositions({})`` (the retrace torch offers), alternating the two and
keeping the best of ``--repeats``; both graphs are checked to give the model's logits.

    python benchmarks/bench_functional.py [--models deepseek_v3 minicpm3 qwen3_next] [--repeats 2]

Writes benchmarks/results/functional.json; docs/benchmarks.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.export import Dim

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results" / "functional.json"


def measure(model_type: str, repeats: int) -> dict:
    import sweep_architectures

    from jetgraph.capture.export import LogitsWrapper
    from jetgraph.padding import full_mask
    from jetgraph.taylor.functional import functionalize

    _, _, model, ids = sweep_architectures.build_model(model_type)
    wrapper = LogitsWrapper(model)
    ids = ids.expand(2, -1).contiguous()
    mask = full_mask(ids)
    exported = torch.export.export(wrapper, (ids, mask), dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},) * 2,
                                   strict=False)
    with torch.no_grad():
        reference = wrapper(ids, mask)
    ours, theirs, writes = float("inf"), float("inf"), 0
    for _ in range(repeats):
        module = exported.module(check_guards=False)
        start = time.perf_counter()
        writes = functionalize(module)
        ours = min(ours, time.perf_counter() - start)
        with torch.no_grad():
            torch.testing.assert_close(module(ids, mask), reference, rtol=1e-4, atol=1e-4)
        start = time.perf_counter()
        retraced = exported.run_decompositions({}).module(check_guards=False)
        theirs = min(theirs, time.perf_counter() - start)
        with torch.no_grad():
            torch.testing.assert_close(retraced(ids, mask), reference, rtol=1e-4, atol=1e-4)
    return {"model_type": model_type, "nodes": len(exported.graph.nodes), "in_place_ops": writes,
            "functionalize_s": round(ours, 3), "run_decompositions_s": round(theirs, 2),
            "ratio": round(theirs / ours, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["deepseek_v3", "minicpm3", "qwen3_next"])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for model_type in args.models:
        rows.append(measure(model_type, args.repeats))
        print(json.dumps(rows[-1]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"command": "python benchmarks/bench_functional.py",
                                   "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
