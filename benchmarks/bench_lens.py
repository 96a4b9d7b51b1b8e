"""The iterative jet lens over all layers against a forward, the hand logit lens and nested jvp.

16-token input; orders 0, 1, 2 (``jetgraph.applications.iterative_lens``: the model's stream,
then every state's decoder jet in one batched call), and all three from one Taylor pass at order 2
(``iterative_lenses``, what ``jetgraph.lens`` and the CLI run) against the three separate calls.
Baselines in the same run, alternated with jetgraph's calls: one forward of the Hugging Face
model; the order-0 logit lens by hand (one forward with hidden states, then final norm +
unembedding of every h_ℓ, one layer at a time); and **the same lens by nested jvp** two ways:
the paper's method as its reference code runs it (``jex/jet.py``: per state, the model run for
its hidden states, then g_j = d/dt g_{j-1}(h_ℓ + t v) by ``torch.autograd.functional.jvp`` with
``create_graph=True``, v = h_L − h_ℓ), and a leaner one (one forward for every state, then
nested ``torch.func.jvp``). Both are checked equal to jetgraph's lens.

    python benchmarks/bench_lens.py [--repeats 5] [--model smollm2|FOLDER]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

import jetgraph
from jetgraph.applications import iterative_lens, iterative_lenses

RESULTS = Path(__file__).resolve().parent / "results" / "lens.json"
TINYSTORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "tinystories-656k"
TEXT = ("The quick brown fox jumps over the lazy dog, and then it runs back into the forest to find "
        "its friends")


def best_of(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def stream_states(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """h_0..h_L of a Hugging Face decoder: its hidden states, the last one taken before the final
    norm (Hugging Face returns it normed)."""
    taken: list[torch.Tensor] = []
    handle = model.get_decoder().norm.register_forward_hook(lambda m, args, out: taken.append(args[0]))
    try:
        hidden = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    return [*hidden[:-1], taken[-1]]


def decoder_of(model: torch.nn.Module):
    return lambda h: model.lm_head(model.get_decoder().norm(h))


def paper_lens(model: torch.nn.Module, ids: torch.Tensor, order: int) -> torch.Tensor:
    """The iterative lens as the paper's reference code computes it: per state, the model run for
    its hidden states, then the jet chain g_j by ``torch.autograd.functional.jvp`` (double
    backward, ``create_graph=True``), divided by j! and summed. Logits [states, 1, seq, vocab]."""
    decoder = decoder_of(model)
    rows = []
    for layer in range(model.config.num_hidden_layers + 1):
        with torch.no_grad():
            states = stream_states(model, ids)
        centre, variate = states[layer], states[-1]
        direction = (variate - centre).detach()
        chain = [decoder]
        for _ in range(order):
            chain.append(lambda u, g=chain[-1], v=direction: torch.autograd.functional.jvp(g, u, v,
                                                                                        create_graph=True)[1])
        with torch.enable_grad():
            total = sum(g(centre) / math.factorial(j) for j, g in enumerate(chain))
        rows.append(total.detach())
    return torch.stack(rows)


def nested_jvp_lens(model: torch.nn.Module, ids: torch.Tensor, order: int) -> torch.Tensor:
    """The same lens by nested ``torch.func.jvp``, every state from one forward."""
    decoder = decoder_of(model)
    states = stream_states(model, ids)
    rows = []
    for centre in states:
        direction = states[-1] - centre
        chain = [decoder]
        for _ in range(order):
            chain.append(lambda u, g=chain[-1], v=direction: torch.func.jvp(g, (u,), (v,))[1])
        rows.append(sum(g(centre) / math.factorial(j) for j, g in enumerate(chain)))
    return torch.stack(rows)


def alternated(sides: dict, repeats: int) -> dict[str, float]:
    """Best time of each side, the sides run in turn ``repeats`` times after one warm-up each."""
    for fn in sides.values():
        fn()
    best = {name: float("inf") for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--model", default="smollm2", help="smollm2, or a Hugging Face Llama-style folder")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = jetgraph.load_model(args.model)
    ids = tokenizer(TEXT, return_tensors="pt", add_special_tokens=False).input_ids[:, : args.tokens]
    prog = jetgraph.capture(model, ids, granularity="block")

    def forward() -> None:
        model(input_ids=ids, use_cache=False)

    def hand_logit_lens() -> list[torch.Tensor]:
        hidden = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
        # HF applies the final norm to the last hidden state already; the others get it here
        return [model.lm_head(model.model.norm(h) if i < len(hidden) - 1 else h)
                for i, h in enumerate(hidden)]

    forward_s = best_of(forward, args.repeats)
    hand_s = best_of(hand_logit_lens, args.repeats)
    by_hand = torch.stack(hand_logit_lens())
    rows = []
    for order in (0, 1, 2):
        times = alternated({"jetgraph": lambda order=order: iterative_lens(prog, ids, order=order),
                            "paper": lambda order=order: paper_lens(model, ids, order),
                            "nested_jvp": lambda order=order: nested_jvp_lens(model, ids, order)},
                           args.repeats)
        result = iterative_lens(prog, ids, order=order)
        scale = result.logits.abs().max().item()
        differences = {name: (result.logits - fn(model, ids, order)).abs().max().item() / scale
                       for name, fn in (("paper", paper_lens), ("nested_jvp", nested_jvp_lens))}
        seconds = times["jetgraph"]
        row = {"order": order, "seconds": round(seconds, 4), "over_hand_lens": round(seconds / hand_s, 2),
               "over_forward": round(seconds / forward_s, 1),
               "paper_method_s": round(times["paper"], 4),
               "speedup_over_paper_method": round(times["paper"] / seconds, 1),
               "nested_jvp_s": round(times["nested_jvp"], 4),
               "speedup_over_nested_jvp": round(times["nested_jvp"] / seconds, 1),
               "max_relative_difference": differences,
               "cosine_mid_layer": round(result.metrics["cosine"][len(result.labels) // 2].mean().item(), 4)}
        if order == 0:
            row["max_abs_diff_vs_hand"] = (result.logits[:, 0] - by_hand[:, 0]).abs().max().item()
        rows.append(row)
        print(json.dumps(row))
    both = alternated({"one_pass": lambda: iterative_lenses(prog, ids, (0, 1, 2)),
                       "paper": lambda: paper_lens(model, ids, 2)}, args.repeats)
    separate_s = sum(row["seconds"] for row in rows)
    together = {"orders": "0-2", "one_pass_s": round(both["one_pass"], 4),
                "separate_calls_s": round(separate_s, 4),
                "one_pass_over_separate": round(both["one_pass"] / separate_s, 2),
                "paper_method_order_2_s": round(both["paper"], 4),
                "speedup_over_paper_method": round(both["paper"] / both["one_pass"], 1)}
    print(json.dumps(together))
    print(f"\nforward {forward_s:.4f} s, hand logit lens {hand_s:.4f} s ({ids.shape[1]} tokens, "
          f"{len(prog.units) + 1} states)")
    print("order | seconds | x hand lens | x forward | paper's method | speed-up | nested jvp | speed-up")
    for row in rows:
        print(f"{row['order']} | {row['seconds']} | {row['over_hand_lens']} | {row['over_forward']} | "
              f"{row['paper_method_s']} | {row['speedup_over_paper_method']} | {row['nested_jvp_s']} | "
              f"{row['speedup_over_nested_jvp']}")
    print(f"0-2 in one pass | {together['one_pass_s']} | | | {together['paper_method_order_2_s']} | "
          f"{together['speedup_over_paper_method']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_lens.py " + " ".join(sys.argv[1:])
    args.out.write_text(json.dumps({
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "command": command.strip(), "model": Path(args.model).name,
        "tokens": int(ids.shape[1]), "forward_s": round(forward_s, 4), "hand_logit_lens_s": round(hand_s, 4),
        "results": rows, "all_orders": together}, indent=2) + "\n")


if __name__ == "__main__":
    main()
