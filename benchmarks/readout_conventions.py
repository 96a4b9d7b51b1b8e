"""The default read-out under each input convention, scored as a bigram LM on text sampled from
the model: TinyStories-656K, whose tokenizer adds a BOS after which nearly every story starts
alike (docs/readouts.md, "What BOS costs").

    python benchmarks/readout_conventions.py            # ~3 min on 2 quiet cores
    python benchmarks/readout_conventions.py --out /tmp/conventions.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
import warnings
from pathlib import Path

import torch

import jetgraph
from jetgraph.applications.ngrams.convention import InputConvention
from jetgraph.applications.ngrams.readout import RowReader
from jetgraph.applications.sketch import sample_texts

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / "tinystories-656k"))
    parser.add_argument("--stories", type=int, default=96)
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "readout_conventions.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    model, tokenizer = jetgraph.load_model(args.model)
    prog = jetgraph.capture(model, granularity="block")
    bos = InputConvention.from_tokenizer(tokenizer)
    windows = sample_texts(model, args.stories, 128, list(bos.prefix) or [0], tokenizer.eos_token_id,
                           pad=0, seed=3)
    ids, mask = windows.ids, windows.mask.bool()
    prev, nxt = ids[:, :-1], ids[:, 1:]
    inside = mask[:, 1:] & mask[:, :-1] & ~torch.isin(prev, torch.tensor(bos.prefix or [-1]))
    vocab = int(prog.decoder.unembedding.shape[0])
    variants = [("BOS b (the default)", bos, 0), ("BOS a b, 4 first tokens", bos, 4),
                ("BOS a b, 16 first tokens", bos, 16),
                ("a b, 16 first tokens, no BOS (0.7)", InputConvention(), 16),
                ("b alone at position 0", InputConvention(), 0)]
    results = {}
    for name, convention, count in variants:
        reader = RowReader(prog, count=count, convention=convention)
        table = torch.cat([reader(torch.arange(s, min(s + 256, vocab))) for s in range(0, vocab, 256)])
        log_p = table[prev[inside], nxt[inside]]
        top1 = (table[prev[inside]].argmax(-1) == nxt[inside]).double().mean()
        results[name] = {"perplexity": math.exp(-float(log_p.mean())), "top1": float(top1)}
        print(f"| {name} | {results[name]['perplexity']:,.1f} | {results[name]['top1']:.3f} |", flush=True)
    payload = {"model": args.model, "pairs": int(inside.sum()), "stories": args.stories, "results": results,
               "machine": f"{platform.machine()}, torch {torch.__version__}",
               "command": "python benchmarks/readout_conventions.py",
               "seconds": round(time.perf_counter() - start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"{payload['pairs']} pairs; wrote {args.out} in {payload['seconds']} s")
    return payload


if __name__ == "__main__":
    main()
