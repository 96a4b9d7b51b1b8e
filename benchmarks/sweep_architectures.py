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
- ``captured``: exact logits, but the order-1 expansion of some unit failed or disagreed;
- ``expanded``: exact logits, and the order-1 jet of every sublayer unit at a centre near its input
  (coefficients 0 and 1) equals an independent oracle, ``torch.func.jvp`` of the unit's own
  graph (Richardson-extrapolated central differences where it holds another library's op,
  whose forward-mode AD may be silently zero), within 1e-4 relative (1e-3 against the
  differences, their own float32 accuracy);
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
MINIMAL = {  # issue 13's recipe: depth, width, heads and vocabulary; the config's defaults otherwise
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2, "decoder_layers": 2,
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "dim": 64,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "n_heads": 4, "decoder_attention_heads": 4,
    "vocab_size": 256,
}
SMALL = {  # the fallback where the minimal recipe leaves a model too big: inner sizes too
    **MINIMAL,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "ffn_hidden_size": 128,
    "decoder_ffn_dim": 128, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "head_dim": 16, "kv_lora_rank": 16, "q_lora_rank": 16,
    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "num_experts": 8, "n_routed_experts": 8, "num_local_experts": 8, "rotary_dim": 8,
}
RECIPES = (("minimal", MINIMAL, False), ("small", SMALL, False), ("small, rebuilt", SMALL, True))
MAX_PARAMETERS = 120_000_000  # a recipe whose model is larger is skipped (2 workers, 24 GB here)
TIMEOUT_S = 240


def tiny_config(model_type: str, sizes: dict[str, int] | None = None, rebuild: bool = False):
    """The config's defaults with ``sizes`` (default :data:`MINIMAL`) where it has those integer
    attributes, in nested sub-configs (a text config inside a multimodal one) too. ``rebuild``:
    construct the config again from its shrunk constructor arguments, so that attributes it
    derives from them (an MLA head size from its parts) follow."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    _shrink(config, MINIMAL if sizes is None else sizes, set())
    if rebuild:
        config = _rebuilt(config)
    config._attn_implementation = "eager"
    return config


def _rebuilt(config):
    import inspect

    accepted = inspect.signature(type(config).__init__).parameters
    return type(config)(**{k: v for k, v in config.to_dict().items() if k in accepted})


def _shrink(config, sizes: dict[str, int], seen: set[int]) -> None:
    from transformers import PretrainedConfig

    if id(config) in seen:
        return
    seen.add(id(config))
    heads_before = _int(config, "num_attention_heads")
    for name, value in sizes.items():
        current = _int(config, name)
        if current is not None and current > value:
            setattr(config, name, value)
    for name in [n for n in vars(config) if "vocab_size" in n]:  # per-layer vocabularies too
        current = _int(config, name)
        if current is not None and current > sizes.get("vocab_size", current):
            setattr(config, name, sizes["vocab_size"])
    vocab = _int(config, "vocab_size")
    for name in [n for n in vars(config) if n.endswith("_token_id")]:  # special tokens in the vocabulary
        current = _attribute(config, name)
        if vocab and isinstance(current, int) and not isinstance(current, bool) and current >= vocab:
            setattr(config, name, vocab - 1)
        elif vocab and isinstance(current, list):
            setattr(config, name, [min(t, vocab - 1) if isinstance(t, int) else t for t in current])
    heads = _int(config, "num_attention_heads")
    for name in ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num",
                 "decoder_kv_heads"):
        current = _int(config, name)
        if current is not None and heads and heads_before:  # keep the query/key-value group ratio
            setattr(config, name, max(1, heads // max(1, heads_before // max(current, 1))))
    for name in ("num_experts_per_tok", "top_k", "moe_topk"):
        current = _int(config, name)
        experts = next((_int(config, e) for e in ("num_experts", "n_routed_experts", "num_local_experts")
                        if _int(config, e) is not None), None)
        if isinstance(current, int) and experts is not None and current > experts:
            setattr(config, name, experts)
    for name in ("layer_types", "block_types", "layers_block_type"):
        value = _attribute(config, name)
        if isinstance(value, (list, tuple)) and len(value) > 2:
            setattr(config, name, list(value[:2]))
    config._attn_implementation = "eager"
    for value in list(vars(config).values()):
        if isinstance(value, PretrainedConfig):
            _shrink(value, sizes, seen)


def _attribute(config, name: str):
    try:  # some configs raise on per-layer attributes read globally
        return getattr(config, name, None)
    except Exception:
        return None


def _int(config, name: str) -> int | None:
    value = _attribute(config, name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def build_model(model_type: str):
    """The first recipe of :data:`RECIPES` whose model has at most :data:`MAX_PARAMETERS` and
    runs on input_ids alone: ``(recipe name, config, model, ids)``; raises the last failure."""
    import torch
    from transformers import AutoModelForCausalLM

    failures: list[str] = []
    for name, sizes, rebuild in RECIPES:
        try:
            config = tiny_config(model_type, sizes, rebuild)
            with torch.device("meta"):
                size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
            if size > MAX_PARAMETERS:
                raise MemoryError(f"{size / 1e6:.0f}M parameters with the {name} recipe")
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
            vocab = int(getattr(config, "vocab_size", 256) or 256)
            ids = torch.randint(0, min(vocab, 256), (1, 8), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
            return name, config, model, ids
        except Exception as exc:  # try the next recipe
            failures.append(f"{name}: {_first_line(exc)[:140]}")
    raise RuntimeError("; ".join(failures))


def run_one(model_type: str) -> dict[str, object]:
    """Build, capture and expand one architecture (in this process)."""
    import torch

    import jetgraph

    row: dict[str, object] = {"model_type": model_type}
    try:
        recipe, config, model, ids = build_model(model_type)
    except Exception as exc:  # a model we cannot even run is not testable
        return {**row, "outcome": "not testable", "detail": _first_line(exc)}
    row["recipe"] = recipe
    vocab = int(getattr(config, "vocab_size", 256) or 256)
    start = time.perf_counter()
    try:
        prog = jetgraph.capture(model, ids, granularity="block")
    except jetgraph.CaptureError as exc:
        return {**row, "outcome": "refused", "detail": _first_line(exc)}
    except Exception as exc:
        return {**row, "outcome": "crash", "detail": f"capture: {_first_line(exc)}"}
    row.update({"capture_s": round(time.perf_counter() - start, 2), "blocks": len(prog.blocks),
                "sublayers": len(prog.sublayers)})
    row["dynamic"] = prog.dynamic
    # a second input of another batch and length, left-padded in its first row; a program whose
    # export fixed a size (prog.fixed_sizes) keeps that size and changes the other
    shape = (2, 11)
    if not prog.dynamic:
        fixed = prog.fixed_sizes if any(s is not None for s in prog.fixed_sizes) else tuple(ids.shape)
        shape = tuple(other if size is None else size for size, other in zip(fixed, shape, strict=True))
    other = torch.randint(0, min(vocab, 256), shape, generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(other)
    if prog.dynamic:
        mask[0, :3] = 0
    try:
        with torch.no_grad():
            kwargs = {"attention_mask": mask} if prog.reads_mask else {}
            reference = model(input_ids=other, use_cache=False, **kwargs).logits
            logits = prog(other, attention_mask=mask if prog.reads_mask else None)
        real = mask.bool() if prog.reads_mask else torch.ones_like(mask, dtype=torch.bool)
        # the model uses positions 0..seq-1 whatever the padding; compare the unpadded row exactly
        row_index = other.shape[0] - 1
        error = (logits[row_index] - reference[row_index]).abs().max().item()
        scale = max(1.0, reference[row_index].abs().max().item())
        row["logit_error"] = error
        if not error <= 1e-4 * scale or not torch.isfinite(logits[real]).all():
            return {**row, "outcome": "wrong logits", "detail": f"max |Δlogit| {error:.3g} on a second input"}
    except Exception as exc:
        return {**row, "outcome": "crash", "detail": f"second input {list(shape)}: {_first_line(exc)}"}
    row["ops_without_rule"] = ops_without_rule(prog)
    try:
        error, row["oracle"] = _order_one_error(prog, ids)
    except Exception as exc:
        return {**row, "outcome": "captured", "detail": f"order-1 expansion: {_first_line(exc)}"}
    row["jet_error"] = error * JET_TOLERANCE[row["oracle"]]  # relative error of the worst unit
    if not error <= 1:
        detail = f"order-1 terms off the oracle ({row['oracle']}) by {row['jet_error']:.3g}"
        return {**row, "outcome": "captured", "detail": detail}
    return {**row, "outcome": "expanded", "detail": ""}


JET_TOLERANCE = {"jvp": 1e-4, "differences": 1e-3}  # relative; differences in float32 are coarser


def _order_one_error(prog, ids) -> tuple[float, str]:
    """The largest relative error, over every sublayer unit, of its order-1 jet at a centre near
    its input h (coefficients 0 and 1, along h − centre) against :func:`_oracle` on the unit's
    own graph, divided by that oracle's tolerance (:data:`JET_TOLERANCE`; ≤ 1 passes), and the
    oracle used for the worst unit."""
    import torch

    import jetgraph

    view = prog.at("sublayer")
    states, side = view.stream_with_side_inputs(ids)
    generator = torch.Generator().manual_seed(3)
    worst, worst_oracle = 0.0, "jvp"
    for unit in view.units:
        h = states[unit.reads]
        args = [side[name] for name in unit.side_inputs]
        for _ in range(8):  # a centre where the unit is smooth (no router choice within reach)
            center = h + 0.1 * h.std() * torch.randn(h.shape, generator=generator).to(h.dtype)
            oracle = _oracle(unit.graph_module, center, h - center, args)
            if oracle is not None:
                break
        if oracle is None:
            raise RuntimeError(f"{unit.name}: no centre of 8 where its differences are smooth")
        value, tangent, kind = oracle
        jet = jetgraph.jet(unit, center, h, order=1, side=side)
        coefficients = jet.coefficients
        smooth = torch.isfinite(tangent)  # all True for jvp
        scale = max(value.abs().max().item(), tangent[smooth].abs().max().item(), 1e-12)
        error = max((coefficients[0] - value).abs().max().item(),
                    (coefficients[1] - tangent)[smooth].abs().max().item()) / scale / JET_TOLERANCE[kind]
        if error >= worst:
            worst, worst_oracle = error, kind
    return worst, worst_oracle


def _oracle(graph_module, center, direction, args):
    """(f(c), Df(c)[v]) for a unit's graph: ``torch.func.jvp``, or, where the graph holds ops of
    other libraries (their forward-mode AD can be silently zero: transformers' grouped matmul),
    central differences of the graph itself, Richardson-extrapolated (error O(ε⁴)), NaN at the
    positions where the differences at two step sizes disagree (a router's choice changes
    within the step: not smooth there). None when that is over a quarter of the positions: the
    caller picks another centre."""
    import torch

    foreign = any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
                  and n.target.namespace not in ("aten", "prims") for n in graph_module.graph.nodes)
    with torch.no_grad():
        if not foreign:
            return (*torch.func.jvp(lambda x: graph_module(x, *args), (center,), (direction,)), "jvp")

        def difference(step: float) -> torch.Tensor:
            return (graph_module(center + step * direction, *args)
                    - graph_module(center - step * direction, *args)) / (2 * step)

        coarse, fine = difference(0.05), difference(0.025)
        # a position whose two differences disagree has a router choice within the step: the
        # function is not smooth there and its differences measure nothing; compare the others
        gap = (coarse - fine).abs().amax(-1)
        smooth = gap <= 1e-2 * fine.abs().max().clamp_min(1e-12)
        if smooth.float().mean() < 0.75:
            return None
        tangent = torch.where(smooth.unsqueeze(-1), (4 * fine - coarse) / 3, torch.nan)
        return graph_module(center, *args), tangent, "differences"


def ops_without_rule(prog) -> list[str]:
    """Ops in the program's units that have no Taylor rule. A diagnostic: an op that only ever
    sees constants (mask arithmetic) needs none; one that sees the stream's series would raise."""
    from jetgraph.taylor import has_rule

    missing = set()
    for unit in prog.at("sublayer").units:
        for node in unit.graph_module.graph.nodes:
            if node.op == "call_function" and not has_rule(node.target):
                missing.add(str(node.target))
    return sorted(missing)


POST_LN = "interrupted between residual adds"  # refused: a stream normalised or rebuilt between units


def pre_norm_share(rows: list[dict]) -> tuple[int, int]:
    """(expanded, testable) over the testable model types not refused as post-LN: the issue's
    target population, decoder-only pre-norm models (hybrids included, which makes it stricter)."""
    population = [r for r in rows if r["outcome"] != "not testable"
                  and not (r["outcome"] == "refused" and POST_LN in r.get("detail", ""))]
    return sum(r["outcome"] == "expanded" for r in population), len(population)


def markdown(results: dict) -> str:
    """The counts, then one row per model type (outcome, capture time, detail)."""
    counts = results["counts"]
    expanded, population = pre_norm_share(results["results"])
    lines = [" | ".join(f"{o}: **{counts[o]}**" for o in OUTCOMES) + f" | total: {len(results['results'])}",
             "", f"Testable, not refused as an interrupted stream: **{expanded} of {population} expanded "
             f"({100 * expanded / max(population, 1):.1f}%)**.",
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
    parser.add_argument("--merge", action="store_true",
                        help="with --only: replace those rows in benchmarks/results/sweep.json")
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
    expanded, population = pre_norm_share(rows)
    print(f"testable, not refused as an interrupted stream: {expanded} of {population} expanded")
    for row in rows:
        print(f"{row['model_type']:<28} {row['outcome']:<13} {row.get('detail', '')[:100]}")
    if args.only is None or args.merge:  # a partial run overwrites the full table only with --merge
        import torch
        import transformers

        if args.only is not None:
            fresh = {r["model_type"]: r for r in rows}
            rows = [fresh.get(r["model_type"], r) for r in json.loads(RESULTS.read_text())["results"]]
            counts = {o: sum(r["outcome"] == o for r in rows) for o in OUTCOMES}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({
            "command": "python benchmarks/sweep_architectures.py",
            "versions": f"torch {torch.__version__}, transformers {transformers.__version__}",
            "counts": counts, "results": rows}, indent=1) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
