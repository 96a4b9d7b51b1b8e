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
from jetgraph.applications.explain.attention import attention_score_attribution, head_score
from jetgraph.applications.explain.patching import (
    logits_with,
    remove_path,
    remove_unit,
    unit_attributions,
)
from jetgraph.applications.groundtruth.planted import planted_rule_model
from jetgraph.applications.groundtruth.training import TinyConfig

RESULTS = Path(__file__).resolve().parent / "results" / "explain_study.json"
LENGTH = 40  # an induction row: random tokens in which a random segment repeats at once
HEADS = 4


# ------------------------------------------------------------------------------------ induction
def induction_rows(count: int, vocab: int, seed: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Random rows in which a segment of random length (6..) starting at a random offset repeats
    at once (only in-context copying predicts its second copy); each row's (offset, length)."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, vocab, (count, LENGTH), generator=generator)
    segments = []
    for row in rows:
        offset = int(torch.randint(0, LENGTH // 4, (1,), generator=generator))
        length = int(torch.randint(6, (LENGTH - offset) // 2 + 1, (1,), generator=generator))
        row[offset + length:offset + 2 * length] = row[offset:offset + length]
        segments.append((offset, length))
    return rows, segments


def copy_labels(rows: torch.Tensor, segments: list[tuple[int, int]]) -> torch.Tensor:
    """Labels for the second copy only (after its first token), -100 elsewhere."""
    labels = torch.full_like(rows, -100)
    for i, (offset, length) in enumerate(segments):
        labels[i, offset + length + 1:offset + 2 * length] = rows[i, offset + length + 1:offset + 2 * length]
    return labels


def attention_only_llama(vocab: int, seed: int):
    """A two-layer Llama (rotary positions) whose MLPs are held at zero: attention only."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=HEADS,
                         max_position_embeddings=LENGTH, attn_implementation="eager",
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(config)
    for layer in model.model.layers:
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)
        for parameter in layer.mlp.parameters():
            parameter.requires_grad_(False)
    return model


def train_copying(model, vocab: int, seed: int, steps: int) -> float:
    """AdamW on fresh induction rows, the loss on the second copy only; the last step's loss."""
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                                  weight_decay=0.01)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        rows, segments = induction_rows(32, vocab, seed * 100_000 + step)
        loss = model(input_ids=rows, labels=copy_labels(rows, segments)).loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    model.eval()
    return float(loss.detach())


def head_patterns(model, rows: torch.Tensor, segments: list[tuple[int, int]]
                  ) -> tuple[list[float], list[float]]:
    """Per head: layer 0's mean attention to the token before (previous-token score) and layer
    1's mean attention to the token after the earlier copy of this one (induction score), over
    the second copies."""
    with torch.no_grad():
        attentions = model(input_ids=rows, output_attentions=True).attentions
    previous, induction = torch.zeros(HEADS), torch.zeros(HEADS)
    for i, (offset, length) in enumerate(segments):
        positions = torch.arange(offset + length + 1, offset + 2 * length)
        previous += attentions[0][i][:, positions, positions - 1].mean(dim=1)
        induction += attentions[1][i][:, positions, positions - length + 1].mean(dim=1)
    return (previous / len(segments)).tolist(), (induction / len(segments)).tolist()


def _without(network: FrozenNetwork, vector: torch.Tensor):
    """A unit reading the stream without ``vector`` (an edge cut in the real model)."""
    def edit(unit, x):
        return unit(x - vector.unsqueeze(0), network.side)
    return edit


def _head_index(name: str) -> int:
    return int(name.rpartition(".h")[2])


def induction_case(prog, networks, ids: torch.Tensor, query: int, earlier: int,
                   induction_scores: list[float], attention0: torch.Tensor) -> dict:
    """One held-out row: the frozen decomposition's answers and the real model's truth.

    Answer 1, the copying path: the top path of the copied token's logit must start at the
    earlier copy and pass one layer-1 head, an induction head by its pattern. Answer 2, the
    composition it reads: the top multi-hop pair of that head's score at the earlier copy must be
    (the current token) × (the token before the earlier copy, moved by a layer-0 head), and that
    head must be the one whose output, taken from the key row in the real model, lowers the
    score most (path patching); that it is a previous-token head is read from its pattern."""
    heads, blocks = networks
    target = int(ids[0, query + 1])
    result = explain_program(prog, ids, target, position=query, budget=200)
    top = next(p for p in result.paths if p.position is not None)
    record = {"copying_path": f"{top.path} @{top.position}", "copying_share": top.contribution / result.value,
              "from_earlier_copy": top.position == earlier and len(top.units) == 1
              and top.units[0].startswith("attn1."), "induction_head": False, "composition": False}
    network = FrozenNetwork(heads, ids, query, lambda logits: logits[..., target])
    names = {u.name: u.index for u in heads.units}
    copying = top.units[0] if top.units else ""
    if record["from_earlier_copy"]:
        record["induction_head"] = induction_scores[_head_index(copying)] >= 0.5
        score = attention_score_attribution(network, copying, query, earlier)
        pair = score.top_multi_hop()
        stream = network.states[heads.units[names[copying]].reads]
        drops = []
        for head in range(HEADS):
            edited = stream.clone()
            edited[earlier] -= network.unit_outputs[names[f"attn0.h{head}"]][earlier]
            drops.append(score.value - head_score(network, copying, query, earlier, edited))
        truth = max(range(HEADS), key=lambda h: drops[h])
        record |= {"score": score.value, "attention": score.pattern,
                   "top_score_pair": [pair.query.path if pair.query else None,
                                      pair.key.path if pair.key else None, pair.contribution / score.value],
                   "score_drop_cutting_layer0_heads_from_key": drops, "composes_with": f"attn0.h{truth}",
                   "composes_with_attends_to_previous": float(attention0[truth, earlier, earlier - 1]),
                   "composes_with_is_previous_token_head_here":
                       int(attention0[:, earlier, earlier - 1].argmax()) == truth}
        record["composition"] = (
            pair.query is not None and pair.query.units == () and pair.query.position == query
            and pair.key is not None and pair.key.units == (f"attn0.h{truth}",)
            and pair.key.position == earlier - 1)
        # the found edge, cut in the real model: that head's output taken from layer 1's input
        sublayer = FrozenNetwork(blocks, ids, query, lambda logits: logits[..., target])
        receiver = next(u.index for u in blocks.units if u.name == "attn1")
        least = min(range(HEADS), key=lambda h: drops[h])
        for head, key in ((truth, "copies_with_edge_cut"), (least, "copies_with_control_cut")):
            vector = network.unit_outputs[names[f"attn0.h{head}"]]
            record[key] = int(logits_with(sublayer, receiver, _without(sublayer, vector)).argmax()) == target
    jet = explain_program(prog, ids, target, position=query, method="jet", order=0, max_length=2,
                          budget=10**5)
    multi = next((p for p in jet.paths if sum(u.startswith("attn") for u in p.units) >= 2), None)
    record["jet0_top_multi_hop"] = multi.path if multi else None
    record["jet0_found"] = bool(multi) and multi.units[0] == record.get("composes_with") and \
        multi.units[1] == copying
    with torch.no_grad():
        record["copies"] = int(prog(ids)[0, query].argmax()) == target
    return record


def induction_run(seed: int, steps: int, cases: int = 24) -> dict:
    """Train, read the heads' patterns, then one :func:`induction_case` per held-out row."""
    start = time.perf_counter()
    vocab = 64
    model = attention_only_llama(vocab, seed)
    loss = train_copying(model, vocab, seed, steps)
    rows, segments = induction_rows(cases, vocab, 10_000 + seed)
    previous_scores, induction_scores = head_patterns(model, rows, segments)
    with torch.no_grad():
        attention0 = model(input_ids=rows, output_attentions=True).attentions[0]
    prog = jetgraph.capture(model, rows[:1])
    networks = (prog.at("head"), prog.at("sublayer"))
    records = []
    for i, (offset, length) in enumerate(segments):
        query = offset + length + 3  # its next token is the copy of the one at offset + 4
        records.append(induction_case(prog, networks, rows[i:i + 1], query, query + 1 - length,
                                      induction_scores, attention0[i]))
    count = {key: sum(bool(r.get(key)) for r in records)
             for key in ("copies", "from_earlier_copy", "induction_head", "composition",
                         "composes_with_is_previous_token_head_here", "copies_with_edge_cut",
                         "copies_with_control_cut", "jet0_found")}
    count["found"] = sum(r["from_earlier_copy"] and r["induction_head"] and r["composition"] for r in records)
    return {"seed": seed, "steps": steps, "heads_per_layer": HEADS, "final_loss": loss, "cases": cases,
            "previous_scores": previous_scores, "induction_scores": induction_scores, "counts": count,
            "examples": records[:3], "seconds": round(time.perf_counter() - start, 1)}


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
    parser.add_argument("--steps", type=int, default=1000, help="training steps of the induction models")
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
            print(f"induction seed {seed}: found {r['counts']['found']}/{r['cases']} {r['counts']}")
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
