"""Which path decomposition to trust, by evidence: planted circuits with known truth, and real
prompts against the measured effect of removing each path.

Part ``induction``: two-layer attention-only GPT-2s (their MLPs held at zero) trained on random
token sequences in which a segment of random length repeats (after ``… A B … A`` comes ``B``).
The truth comes from the model's behaviour: the layer-1 head whose ablation costs the copied
token's logit most, and the layer-0 head whose output, cut from that head's input alone (path
patching), costs it most; the copying accuracy with that edge cut says how much of the copying
it carries. The attention patterns (previous-token and induction scores) are recorded beside.
Each decomposition is asked for its top path through two attention heads.

Part ``rule``: the planted-rule model of the roles study (one MLP trained alone on a rule
"trigger → target"): does the top path of the target's logit after a trigger pass that MLP?

Part ``smollm2``: 20 indirect-object prompts (target the indirect object, contrast the subject)
and 20 factual prompts (the model's own top token). For the 20 largest listed paths of each, the
predicted contribution (for a path of units, the total the cut removes in the frozen network)
against the measured effect of cutting the path's last edge in the real model; the same for the
20 units of largest direct logit attribution and attribution patching, against zero-ablating the
unit. Spearman rank correlation (median over prompts) and the calibration slope (least squares
through the origin, all items pooled).

    python -m benchmarks.explain_study [--part induction rule smollm2] [--seeds 3] [--prompts 20]

Writes ``benchmarks/results/explain_study.json``; docs/explain.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import jetgraph
from jetgraph.applications.explain import FrozenNetwork, explain_program
from jetgraph.applications.explain.patching import (
    logits_with,
    remove_path,
    remove_unit,
    unit_attributions,
    value_with,
)
from jetgraph.applications.groundtruth.planted import planted_rule_model
from jetgraph.applications.groundtruth.training import TinyConfig, row_batches, train

RESULTS = Path(__file__).resolve().parent / "results" / "explain_study.json"
LENGTH = 32  # an induction row: a random segment of 5..14 tokens, the segment again, random filler


# ------------------------------------------------------------------------------------ induction
def induction_rows(count: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose segment of random length repeats at once (so only in-context copying predicts
    the second copy), and each row's segment length."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, vocab, (count, LENGTH), generator=generator)
    lengths = torch.randint(5, 15, (count,), generator=generator)
    for row, length in zip(rows, lengths.tolist(), strict=True):
        row[length:2 * length] = row[:length]
    return rows, lengths


def attention_only_gpt2(vocab: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=LENGTH,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                        eos_token_id=None, attn_implementation="eager")
    model = GPT2LMHeadModel(config)
    for block in model.transformer.h:  # attention-only: every MLP's output held at zero
        torch.nn.init.zeros_(block.mlp.c_proj.weight)
        torch.nn.init.zeros_(block.mlp.c_proj.bias)
        for parameter in block.mlp.parameters():
            parameter.requires_grad_(False)
    return model


def _heads_by_pattern(model, rows: torch.Tensor, lengths: torch.Tensor
                      ) -> tuple[int, int, list[float], list[float]]:
    """(previous-token head of layer 0, induction head of layer 1) from the model's patterns:
    mean attention to the token before, and to the token after the earlier copy of this one."""
    with torch.no_grad():
        attentions = model(input_ids=rows, output_attentions=True).attentions
    previous, induction = torch.zeros(4), torch.zeros(4)
    for i, length in enumerate(lengths.tolist()):
        positions = torch.arange(length + 1, 2 * length)
        previous += attentions[0][i][:, positions, positions - 1].mean(dim=1)
        induction += attentions[1][i][:, positions, positions - length + 1].mean(dim=1)
    previous, induction = previous / len(lengths), induction / len(lengths)
    return int(previous.argmax()), int(induction.argmax()), previous.tolist(), induction.tolist()


def _cut(network: FrozenNetwork, source: int, receiver: int):
    """Unit ``receiver`` reading the stream without unit ``source``'s output (an edge cut)."""
    def edit(unit, x):
        return unit(x - network.unit_outputs[source].unsqueeze(0), network.side)
    return edit


def induction_run(seed: int, steps: int) -> dict:
    """The truth from the model's behaviour: the layer-1 head whose ablation costs the copied
    token's logit most (the copying head), and the layer-0 head whose output, cut from that head's
    input alone, costs it most (the head it composes with); then each decomposition's top
    multi-hop path against that edge."""
    start = time.perf_counter()
    vocab = 48
    model = attention_only_gpt2(vocab, seed)
    rows, _ = induction_rows(8000, vocab, seed)
    train(model, row_batches(rows, 64, seed), steps, 1e-3)
    held_out, lengths = induction_rows(16, vocab, seed + 100)
    previous, induction, previous_scores, induction_scores = _heads_by_pattern(model, held_out, lengths)
    prog = jetgraph.capture(model, held_out[:1])
    view = prog.at("head")
    names = [u.name for u in view.units]
    cases = []
    for row, length in zip(held_out[:8], lengths[:8].tolist(), strict=True):
        position = length + 3  # predicts the token at length + 4, a copy of the one at 4
        target = int(row[position + 1])
        network = FrozenNetwork(view, row.unsqueeze(0), position, lambda logits, t=target: logits[..., t])
        cases.append((row.unsqueeze(0), position, target, network))
    ablation = {h: statistics.mean(n.value - remove_unit(n, f"attn1.h{h}") for *_, n in cases)
                for h in range(4)}
    copy_head = max(ablation, key=ablation.get)
    receiver = names.index(f"attn1.h{copy_head}")
    edge_cut = {g: statistics.mean(n.value - value_with(n, receiver, _cut(n, names.index(f"attn0.h{g}"),
                                                                           receiver))
                                   for *_, n in cases) for g in range(4)}
    feed_head = max(edge_cut, key=edge_cut.get)
    edge = (f"attn0.h{feed_head}", f"attn1.h{copy_head}")
    copied = cut_copied = ablated_copied = 0
    tops = {"frozen": [], "jet order 0": [], "jet order 1": []}
    jet = {"method": "jet", "max_length": 2, "budget": 10**5}
    for ids, position, target, network in cases:
        with torch.no_grad():
            copied += int(prog(ids)[0, position].argmax() == target)
        cut = _cut(network, names.index(edge[0]), receiver)
        logits = logits_with(network, receiver, cut)
        cut_copied += int(logits.argmax() == target)
        ablated = logits_with(network, receiver, lambda unit, x: torch.zeros_like(x))
        ablated_copied += int(ablated.argmax() == target)
        for method, options in (("frozen", {"budget": 400}), ("jet order 0", {**jet, "order": 0}),
                                ("jet order 1", {**jet, "order": 1})):
            result = explain_program(prog, ids, target, position=position, **options)
            multi = [p for p in result.paths if sum(u.startswith("attn") for u in p.units) >= 2]
            tops[method].append({"top": result.paths[0].path,
                                 "top_multi_hop": list(multi[0].units) if multi else None,
                                 "edge_is_top_multi_hop": bool(multi) and tuple(multi[0].units[:2]) == edge})
    found = {m: sum(t["edge_is_top_multi_hop"] for t in runs) for m, runs in tops.items()}
    return {"seed": seed, "copying_head": edge[1], "composes_with": edge[0],
            "logit_drop_ablating_layer1_heads": ablation,
            "logit_drop_cutting_layer0_heads_from_it": edge_cut,
            "pattern_previous_token_head": previous, "pattern_induction_head": induction,
            "previous_scores": previous_scores, "induction_scores": induction_scores,
            "copying_accuracy": copied / 8, "copying_accuracy_with_edge_cut": cut_copied / 8,
            "copying_accuracy_with_copying_head_ablated": ablated_copied / 8,
            "edge_is_top_multi_hop_of_8": found, "examples": {m: runs[:2] for m, runs in tops.items()},
            "seconds": round(time.perf_counter() - start, 1)}


# ----------------------------------------------------------------------------------------- rule
def rule_run(seed: int) -> dict:
    start = time.perf_counter()
    cfg = TinyConfig(vocab=64, n_layer=3, seq=32, steps=200, n_embd=64, seed=seed)
    model, rule, text = planted_rule_model(cfg, layer=1)
    prog = jetgraph.capture(model, text[:1, :8])
    hits, through, shares = 0, 0, []
    for row in text[:16]:
        positions = [p for p in range(4, row.numel() - 1) if int(row[p]) in rule.triggers]
        if not positions:
            continue
        ids = row[:positions[0] + 1].unsqueeze(0)
        result = explain_program(prog, ids, rule.target, granularity="sublayer", budget=300)
        hits += 1
        tops = [p for p in result.paths if p.position is not None]
        through += int(rule.unit in tops[0].units)
        shares.append(sum(p.contribution for p in result.paths if rule.unit in p.units) / result.value)
    return {"seed": seed, "planted_in": rule.unit, "prompts": hits, "top_path_through_planted_mlp": through,
            "share_through_planted_mlp_median": statistics.median(shares) if shares else None,
            "seconds": round(time.perf_counter() - start, 1)}


# -------------------------------------------------------------------------------------- smollm2
NAMES = [(" Mary", " John"), (" Sarah", " Tom"), (" Anna", " David"), (" Emma", " James")]
TEMPLATES = ["When{a} and{b} went to the store,{b} gave a drink to",
             "When{a} and{b} went to the park,{b} gave a ball to",
             "After{a} and{b} went to the office,{b} handed a letter to",
             "While{a} and{b} were working at the school,{b} gave a book to",
             "Then,{a} and{b} had a long argument. Afterwards{b} said to"]
FACTS = ["The capital of France is", "The capital of Germany is", "The capital of Italy is",
         "The capital of Spain is", "The capital of Japan is", "The capital of Russia is",
         "The capital of Egypt is", "The capital of Greece is", "The Eiffel Tower is in",
         "The currency of Japan is the", "Water is made of hydrogen and",
         "The largest planet in the solar system is",
         "Romeo and Juliet was written by William", "The first president of the United States was George",
         "The chemical symbol for gold is", "The Great Wall is in", "Mount Everest is in",
         "The sun rises in the", "The opposite of hot is", "Two plus two equals"]


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        for rank, index in enumerate(order):
            out[index] = float(rank)
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    den = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / den if den else float("nan")


def slope(predicted: list[float], measured: list[float]) -> float:
    den = sum(p * p for p in predicted)
    return sum(p * m for p, m in zip(predicted, measured, strict=True)) / den if den else float("nan")


def smollm2_prompt(prog, tokenizer, text: str, target: str | None, contrast: str | None, top: int,
                   granularity: str, budget: int) -> dict:
    ids = tokenizer(text, return_tensors="pt").input_ids
    pieces = [tokenizer(t, add_special_tokens=False).input_ids if t else None for t in (target, contrast)]
    target_id = pieces[0][0] if pieces[0] else None
    contrast_id = pieces[1][0] if pieces[1] else None
    result = explain_program(prog, ids, target_id, contrast_id, granularity=granularity, budget=budget)
    t, c = result.target, result.contrast
    network = FrozenNetwork(prog.at(granularity), ids, result.position,
                            lambda row: row[..., t] - (row[..., c] if c is not None else 0))
    items = [p for p in result.paths if p.position is not None][:top]
    predicted = [p.contribution if not p.units else network.group_value(p.source, p.position, p.units)
                 for p in items]
    measured = [network.value - remove_path(network, p.source, p.position, p.units) for p in items]
    scores = unit_attributions(network)
    out = {"text": text, "value": result.value, "completeness": result.completeness,
           "paths": {"predicted": predicted, "measured": measured, "names": [p.path for p in items]}}
    for method, column in (("dla", 0), ("attribution_patching", 1)):
        chosen = sorted(scores, key=lambda u: -abs(scores[u][column]))[:top]
        out[method] = {"predicted": [scores[u][column] for u in chosen],
                       "measured": [network.value - remove_unit(network, u) for u in chosen], "names": chosen}
    return out


def smollm2_part(prompts: int, top: int, granularity: str, budget: int) -> dict:
    model, tokenizer = jetgraph.load_model("smollm2")
    prog = jetgraph.capture(model, tokenizer("The capital of France is", return_tensors="pt").input_ids)
    ioi = [(t.format(a=a, b=b), a, b) for t in TEMPLATES for a, b in NAMES][:prompts]
    runs = {"ioi": [], "factual": []}
    for text, a, b in ioi:
        runs["ioi"].append(smollm2_prompt(prog, tokenizer, text, a, b, top, granularity, budget))
        print(f"  ioi: {text!r}: {runs['ioi'][-1]['value']:+.2f}")
    for text in FACTS[:prompts]:
        runs["factual"].append(smollm2_prompt(prog, tokenizer, text, None, None, top, granularity, budget))
        print(f"  fact: {text!r}: {runs['factual'][-1]['value']:+.2f}")
    summary = {}
    for kind, items in runs.items():
        for method in ("paths", "dla", "attribution_patching"):
            rhos = [spearman(r[method]["predicted"], r[method]["measured"]) for r in items]
            pooled_p = [x for r in items for x in r[method]["predicted"]]
            pooled_m = [x for r in items for x in r[method]["measured"]]
            summary[f"{kind}/{method}"] = {"spearman_median": statistics.median(rhos),
                                           "spearman_min": min(rhos), "spearman_max": max(rhos),
                                           "calibration_slope": slope(pooled_p, pooled_m),
                                           "prompts": len(items)}
    return {"summary": summary, "granularity": granularity, "budget": budget, "top": top, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", nargs="+", default=["induction", "rule", "smollm2"],
                        choices=["induction", "rule", "smollm2"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5000, help="training steps of the induction models")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--granularity", default="head")
    parser.add_argument("--budget", type=int, default=500)
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results |= {"machine": platform.platform(), "torch": torch.__version__}
    if "induction" in args.part:
        runs = []
        for seed in range(args.seeds):
            runs.append(induction_run(seed, args.steps))
            r = runs[-1]
            print(f"induction seed {seed}: copying {r['copying_accuracy']:.2f} → "
                  f"{r['copying_accuracy_with_edge_cut']:.2f} with "
                  f"{r['composes_with']}→{r['copying_head']} "
                  f"cut ({r['copying_accuracy_with_copying_head_ablated']:.2f} with "
                  f"{r['copying_head']} ablated); "
                  f"edge is the top multi-hop path in {r['edge_is_top_multi_hop_of_8']} of 8")
        results["induction"] = runs
    if "rule" in args.part:
        runs = [rule_run(seed) for seed in range(args.seeds)]
        for r in runs:
            print(f"rule seed {r['seed']}: top path through {r['planted_in']} in "
                  f"{r['top_path_through_planted_mlp']}/{r['prompts']}")
        results["rule"] = runs
    if "smollm2" in args.part:
        results["smollm2"] = smollm2_part(args.prompts, args.top, args.granularity, args.budget)
        for name, row in results["smollm2"]["summary"].items():
            print(f"{name:<32} spearman median {row['spearman_median']:+.2f} "
                  f"[{row['spearman_min']:+.2f}, {row['spearman_max']:+.2f}]  "
                  f"slope {row['calibration_slope']:+.2f}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
