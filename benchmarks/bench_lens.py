"""The iterative jet lens over all SmolLM2 layers against a forward and the hand logit lens.

16-token input; orders 0, 1, 2 (``jetgraph.applications.iterative_lens``: the model's stream,
then every state's decoder jet in one batched call), and all three from one Taylor pass at order 2
(``iterative_lenses``, what ``jetgraph.lens`` and the CLI run) against the three separate calls.
Baselines in the same run: one forward of the Hugging Face model, and the order-0 logit lens
by hand (one forward with hidden states, then final norm + unembedding of every h_ℓ, one layer at a time).

    python benchmarks/bench_lens.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import jetgraph
from jetgraph.applications import iterative_lens, iterative_lenses

RESULTS = Path(__file__).resolve().parent / "results" / "lens.json"
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = jetgraph.load_model("smollm2")
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
        seconds = best_of(lambda order=order: iterative_lens(prog, ids, order=order), args.repeats)
        result = iterative_lens(prog, ids, order=order)
        row = {"order": order, "seconds": round(seconds, 4), "over_hand_lens": round(seconds / hand_s, 2),
               "over_forward": round(seconds / forward_s, 1),
               "cosine_mid_layer": round(result.metrics["cosine"][len(result.labels) // 2].mean().item(), 4)}
        if order == 0:
            row["max_abs_diff_vs_hand"] = (result.logits[:, 0] - by_hand[:, 0]).abs().max().item()
        rows.append(row)
        print(json.dumps(row))
    one_pass_s = best_of(lambda: iterative_lenses(prog, ids, (0, 1, 2)), args.repeats)
    separate_s = sum(row["seconds"] for row in rows)
    together = {"orders": "0-2", "one_pass_s": round(one_pass_s, 4), "separate_calls_s": round(separate_s, 4),
                "one_pass_over_separate": round(one_pass_s / separate_s, 2)}
    print(json.dumps(together))
    print(f"\nforward {forward_s:.4f} s, hand logit lens {hand_s:.4f} s ({ids.shape[1]} tokens, "
          f"{len(prog.units) + 1} states)")
    print("order | seconds | x hand lens | x forward")
    for row in rows:
        print(f"{row['order']} | {row['seconds']} | {row['over_hand_lens']} | {row['over_forward']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "command": f"python benchmarks/bench_lens.py --repeats {args.repeats}",
        "tokens": int(ids.shape[1]), "forward_s": round(forward_s, 4), "hand_logit_lens_s": round(hand_s, 4),
        "results": rows, "all_orders": together}, indent=2) + "\n")


if __name__ == "__main__":
    main()
