"""Every causal-LM architecture in transformers, captured and expanded: which work, which refuse.

For each model type of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, a tiny random model is built from
the config's own defaults with one generic recipe (no per-model code): sizes shrunk (layers 2,
hidden 64, heads 4, key-value heads ≤ heads, feed-forward 128, vocab 256), eager attention. Each
model runs in its own subprocess with a timeout and is classified:

- ``not testable``: the config or the model cannot be built, or its forward fails on input_ids
  alone (nothing jetgraph could capture);
- ``refused``: a clean :class:`jetgraph.CaptureError` (the message is kept);
- ``wrong logits``: captured, but the program disagrees with the model on a second input (a
  longer batch of two; the unpadded row is compared) by more than 1e-4 relative;
- ``captured``: exact logits, but the order-1 expansion of the first unit failed or disagreed;
- ``expanded``: exact logits, and the order-1 jet of the first unit at a centre near h_0
  (coefficients 0 and 1) equals an independent oracle, ``torch.func.jvp`` of the unit's own
  graph, within 1e-4 relative (float32: graphs cast to float32 inside, as Llama's RMSNorm does);
- ``crash``: any other exception (the program failing on a second input shape included), a
  timeout or a dead process.

    python benchmarks/sweep_architectures.py                 # every model type, 2 workers
    python benchmarks/sweep_architectures.py --only llama gpt2 --workers 1
Writes benchmarks/results/sweep.json and prints a table (docs/architectures.md quotes it).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "sweep.json"
OUTCOMES = ("expanded", "captured", "refused", "wrong logits", "crash", "not testable")
SIZES = {  # config attribute -> tiny value, applied where the config has the attribute
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2,
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "dim": 64,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "n_heads": 4,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "ffn_hidden_size": 128,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "vocab_size": 256, "head_dim": 16, "kv_lora_rank": 16, "q_lora_rank": 16,
    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
}
TIMEOUT_S = 240


def tiny_config(model_type: str):
    """The config's defaults with the sizes of :data:`SIZES` where it has those attributes."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    for name, value in SIZES.items():
        if isinstance(getattr(config, name, None), int) and not isinstance(getattr(config, name), bool):
            setattr(config, name, value)
    for name in ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num"):
        current = getattr(config, name, None)
        if isinstance(current, int) and not isinstance(current, bool):
            setattr(config, name, min(current, 2))
    for name in ("layer_types", "block_types", "layers_block_type"):
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)) and len(value) > 2:
            setattr(config, name, list(value[:2]))
    config._attn_implementation = "eager"
    return config


def run_one(model_type: str) -> dict[str, object]:
    """Build, capture and expand one architecture (in this process)."""
    import torch

    import jetgraph

    row: dict[str, object] = {"model_type": model_type}
    try:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        config = tiny_config(model_type)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        vocab = int(getattr(config, "vocab_size", 256) or 256)
        ids = torch.randint(0, min(vocab, 256), (1, 8), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except Exception as exc:  # a model we cannot even run is not testable
        return {**row, "outcome": "not testable", "detail": _first_line(exc)}
    start = time.perf_counter()
    try:
        prog = jetgraph.capture(model, ids)
    except jetgraph.CaptureError as exc:
        return {**row, "outcome": "refused", "detail": _first_line(exc)}
    except Exception as exc:
        return {**row, "outcome": "crash", "detail": f"capture: {_first_line(exc)}"}
    row.update({"capture_s": round(time.perf_counter() - start, 2), "blocks": len(prog.blocks),
                "sublayers": len(prog.sublayers)})
    other = torch.randint(0, min(vocab, 256), (2, 11), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(other)
    mask[0, :3] = 0  # left padding in the first row
    try:
        with torch.no_grad():
            kwargs = {"attention_mask": mask} if prog.reads_mask else {}
            reference = model(input_ids=other, use_cache=False, **kwargs).logits
            logits = prog(other, attention_mask=mask if prog.reads_mask else None)
        real = mask.bool() if prog.reads_mask else torch.ones_like(mask, dtype=torch.bool)
        # the model uses positions 0..seq-1 whatever the padding; compare the unpadded row exactly
        error = (logits[1] - reference[1]).abs().max().item()
        scale = max(1.0, reference[1].abs().max().item())
        row["logit_error"] = error
        if not error <= 1e-4 * scale or not torch.isfinite(logits[real]).all():
            return {**row, "outcome": "wrong logits", "detail": f"max |Δlogit| {error:.3g} on a second input"}
    except Exception as exc:
        return {**row, "outcome": "crash", "detail": f"second input [2, 11]: {_first_line(exc)}"}
    try:
        row["jet_error"] = _order_one_error(prog, ids)
    except Exception as exc:
        return {**row, "outcome": "captured", "detail": f"order-1 expansion: {_first_line(exc)}"}
    if not row["jet_error"] <= 1e-4:
        detail = f"order-1 terms off the oracle by {row['jet_error']:.3g}"
        return {**row, "outcome": "captured", "detail": detail}
    return {**row, "outcome": "expanded", "detail": ""}


def _order_one_error(prog, ids) -> float:
    """Relative error of the order-1 jet of unit 0 at h_0 + δ along h_0 − centre (coefficients 0
    and 1) against ``torch.func.jvp`` of the unit's own graph."""
    import torch

    import jetgraph

    view = prog.at("sublayer")
    unit = view.units[0]
    states, side = view.stream_with_side_inputs(ids)
    h = states[0]
    center = h + 0.1 * h.std() * torch.randn(h.shape, generator=torch.Generator().manual_seed(3))
    jet = jetgraph.jet(unit, center, h, order=1, side=side)
    args = [side[name] for name in unit.side_inputs]
    with torch.no_grad():
        value, tangent = torch.func.jvp(lambda x: unit.graph_module(x, *args), (center,), (h - center,))
    coefficients = jet.coefficients
    scale = max(value.abs().max().item(), tangent.abs().max().item(), 1e-12)
    return max((coefficients[0] - value).abs().max().item(),
               (coefficients[1] - tangent).abs().max().item()) / scale


def markdown(results: dict) -> str:
    """The counts, then one row per model type (outcome, capture time, detail)."""
    counts = results["counts"]
    lines = [" | ".join(f"{o}: **{counts[o]}**" for o in OUTCOMES) + f" | total: {len(results['results'])}",
             "", "| model type | outcome | blocks | capture s | detail |", "|---|---|---|---|---|"]
    for row in results["results"]:
        detail = str(row.get("detail", "")).replace("|", "\\|")[:160]
        lines.append(f"| {row['model_type']} | {row['outcome']} | {row.get('blocks', '')} | "
                     f"{row.get('capture_s', '')} | {detail} |")
    return "\n".join(lines)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300]


def _subprocess(model_type: str, timeout: float) -> dict[str, object]:
    try:
        done = subprocess.run([sys.executable, __file__, "--one", model_type], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model_type": model_type, "outcome": "crash", "detail": f"timeout after {timeout:.0f} s"}
    for line in reversed(done.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"model_type": model_type, "outcome": "crash", "detail": f"exit {done.returncode}: {tail[:300]}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="+", help="these model types only")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per model")
    parser.add_argument("--markdown", action="store_true",
                        help="print benchmarks/results/sweep.json as the markdown table docs quote")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    if args.markdown:
        print(markdown(json.loads(RESULTS.read_text())))
        return
    from tqdm import tqdm
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = args.only or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    rows = []
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        futures = [pool.submit(_subprocess, t, args.timeout) for t in types]
        for future in tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc="sweep"):
            rows.append(future.result())
    rows.sort(key=lambda r: r["model_type"])
    counts = {o: sum(r["outcome"] == o for r in rows) for o in OUTCOMES}
    print(" | ".join(f"{o}: {n}" for o, n in counts.items()), f"| total: {len(rows)}")
    for row in rows:
        print(f"{row['model_type']:<28} {row['outcome']:<13} {row.get('detail', '')[:100]}")
    if args.only is None:  # a partial run does not overwrite the full table
        import torch
        import transformers

        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({
            "command": "python benchmarks/sweep_architectures.py",
            "versions": f"torch {torch.__version__}, transformers {transformers.__version__}",
            "counts": counts, "results": rows}, indent=1) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
