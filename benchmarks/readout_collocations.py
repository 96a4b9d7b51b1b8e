"""Bigram read-outs of a real pretrained model, scored on collocations whose next token is known.

A pretrained model has no ground-truth bigram table, but some pairs leave no doubt: after
" United" comes " States", after " Harry" " Potter". This scores each read-out by how many of 40
such collocations it ranks first (and in its top 5), and the mean log-probability it gives the
expected token. Read-outs: the single paths E→U and E→MLP_last→U, the model on the token alone
at position 0 (h_last→U), the model after each of the tokenizer's special tokens, and the default
read-out under the tokenizer's input convention (docs/readouts.md): after its BOS when it adds
one, else averaged over the M first tokens the model expects most, for several M.

    python benchmarks/readout_collocations.py            # SmolLM2-135M, ~3 min on 2 cores
    python benchmarks/readout_collocations.py --out /tmp/collocations.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import torch

import jetgraph
from jetgraph.applications import full_table
from jetgraph.applications.ngrams.convention import InputConvention
from jetgraph.applications.ngrams.readout import RowReader

ROOT = Path(__file__).resolve().parent.parent
PAIRS = [(" United", " States"), (" New", " York"), (" Harry", " Potter"), (" Los", " Angeles"),
         (" ice", " cream"), (" Hong", " Kong"), (" Prime", " Minister"), (" Middle", " East"),
         (" human", " rights"), (" climate", " change"), (" World", " War"), (" Sri", " Lanka"),
         (" Puerto", " Rico"), (" Saudi", " Arabia"), (" El", " Salvador"), (" Buenos", " Aires"),
         (" Tel", " Aviv"), (" Las", " Vegas"), (" San", " Francisco"), (" Wall", " Street"),
         (" according", " to"), (" due", " to"), (" such", " as"), (" rather", " than"), (" as", " well"),
         (" in", " order"), (" Mount", " Everest"), (" Star", " Wars"), (" Real", " Madrid"),
         (" Barack", " Obama"), (" Donald", " Trump"), (" Albert", " Einstein"), (" Isaac", " Newton"),
         (" peanut", " butter"), (" carbon", " dioxide"), (" machine", " learning"),
         (" artificial", " intelligence"), (" social", " media"), (" high", " school"), (" credit", " card")]


def score(log_probs: torch.Tensor, expected: torch.Tensor) -> dict[str, float]:
    """Collocations ranked first, in the top 5, and the mean log-probability of the expected token."""
    target = log_probs.gather(1, expected[:, None])[:, 0]
    rank = (log_probs > target[:, None]).sum(-1)
    return {"top1": int((rank == 0).sum()), "top5": int((rank < 5).sum()), "pairs": len(expected),
            "mean_log_prob": float(target.mean())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "readout_collocations.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    model, tokenizer = jetgraph.load_model(args.model)
    prog = jetgraph.capture(model, granularity="block")
    firsts = [tokenizer(a, add_special_tokens=False)["input_ids"] for a, _ in PAIRS]
    seconds = [tokenizer(b, add_special_tokens=False)["input_ids"] for _, b in PAIRS]
    keep = [i for i, (a, b) in enumerate(zip(firsts, seconds, strict=True)) if len(a) == 1 and len(b) >= 1]
    rows = torch.tensor([firsts[i][0] for i in keep])
    expected = torch.tensor([seconds[i][0] for i in keep])
    results = {}
    for path in ("E→U", "E→MLP_last→U"):
        table = full_table(prog, path, contexts=rows.view(-1, 1))
        results[path] = score(table.double().log_softmax(-1), expected)
    alone = full_table(prog, "h_last→U", contexts=rows.view(-1, 1)).double().log_softmax(-1)
    results["h_last→U, the token alone at position 0"] = score(alone, expected)
    for special in sorted(set(tokenizer.all_special_ids)):
        reader = RowReader(prog, count=0, convention=InputConvention((special,)))
        name = f"h_last→U after {tokenizer.decode([special])!r} (id {special})"
        results[name] = score(reader(rows), expected)
    convention = InputConvention.from_tokenizer(tokenizer)
    for count in ((None, 4) if convention.prefix else (1, 4, 16)):
        reader = RowReader(prog, count=count, convention=convention)
        name = f"default read-out ({convention.describe(tokenizer)}; " + (
            f"{len(reader.first)} expected first token{'s' if len(reader.first) > 1 else ''})" if reader.first
            else "no mixture)")
        results[name] = score(reader(rows), expected) | {"read": reader.describe(tokenizer)}
    print(f"{args.model}: {len(keep)} collocations")
    print("| read-out | top-1 | top-5 | mean log p(expected) |\n|---|---|---|---|")
    for name, s in results.items():
        print(f"| {name} | {s['top1']}/{s['pairs']} | {s['top5']}/{s['pairs']} | {s['mean_log_prob']:.2f} |")
    payload = {"model": args.model, "machine": f"{platform.machine()}, torch {torch.__version__}",
               "command": "python benchmarks/readout_collocations.py", "pairs": [PAIRS[i] for i in keep],
               "results": results, "seconds": round(time.perf_counter() - start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out} in {payload['seconds']} s")
    return payload


if __name__ == "__main__":
    main()
