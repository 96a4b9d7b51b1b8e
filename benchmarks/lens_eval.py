"""The lenses against each other: faithfulness and intermediate concepts (issue 32).

**Faithfulness.** For every lens of :mod:`jetgraph.lenses` and every stream state h_s scored, over
held-out texts: KL(model ‖ lens) and top-1 agreement with the model, each prompt's mean over its
positions, averaged over the prompts with a 95% bootstrap interval. Also the costs: each fitted
lens's fit time, and each lens's time per prompt; and the averaged Jacobian fitted both ways
(forward mode, the Taylor engine; reverse mode, ``torch.func.vjp`` over output rows), alternated,
with the largest difference between the two fits.

**Intermediate concepts.** :func:`jetgraph.lenses.concepts` on the shipped prompt sets: pass@{1,5,10}
of the intermediate concept and of the answer with the first state, the leakage control for the
lenses that read later states, the chance baseline (another item's words) and the model's own
answer.

Corpora (documented in docs/lens-comparison.md): text *sampled from the model itself* (seeded,
temperature 1, from its BOS), the fitting corpus from seeds 0.., the evaluation texts from seeds
10,000..: disjoint draws. The tuned lens is fitted on the same corpus as the averaged Jacobian.

    python benchmarks/lens_eval.py                 # TinyStories-656K, sublayer states
    python benchmarks/lens_eval.py --ci            # the CI-sized run (tests/test_lens_eval.py)
    python benchmarks/lens_eval.py --model smollm2 --granularity block --every 3 --fitted tuned \
        --eval-texts 40 --length 32 --out benchmarks/results/lens_eval_smollm2.json

Writes benchmarks/results/lens_eval.json (its stated output; --out elsewhere) and prints tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

import jetgraph
from jetgraph.applications.lens import (
    FittedLens,
    LensResult,
    LensSeriesDivergenceWarning,
    ahead_lens,
    fit_jacobian_lens,
    fit_jacobian_lens_reverse,
    fit_tuned_lens,
    iterative_lens,
    jacobian_lens,
)
from jetgraph.applications.lens.concepts import concept_table
from jetgraph.applications.statistics import bootstrap_mean

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "lens_eval.json"
TINYSTORIES = HERE.parents[1] / "shared" / "models" / "tinystories-656k"
EVAL_SEED = 10_000


def sample_texts(model: torch.nn.Module, bos: int | None, count: int, length: int, first_seed: int
                 ) -> list[torch.Tensor]:
    """``count`` texts of ``length`` tokens sampled from ``model`` (temperature 1, from its BOS),
    one seed each from ``first_seed`` on: token ids [1, length]."""
    texts = []
    start = torch.tensor([[bos if bos is not None else 0]])
    for i in range(count):
        torch.manual_seed(first_seed + i)
        with torch.no_grad():
            out = model.generate(start, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=length - 1,
                                 min_new_tokens=length - 1, pad_token_id=0)
        texts.append(out[:, :length])
    return texts


Lens = Callable[[jetgraph.ResidualProgram, torch.Tensor], LensResult]


def lenses(fitted: dict[str, FittedLens], states: list[int]) -> dict[str, Lens]:
    """The lenses compared, by name: what each reads is in docs/lens-comparison.md."""
    chosen: dict[str, Lens] = {
        "logit": lambda p, ids: iterative_lens(p, ids, 0, layers=states),
        "iterative k=1 (reads h_N)": lambda p, ids: iterative_lens(p, ids, 1, layers=states),
        "ahead k=1 m=1": lambda p, ids: ahead_lens(p, ids, 1, 1, layers=states),
        "ahead k=1 m=2": lambda p, ids: ahead_lens(p, ids, 1, 2, layers=states),
        "jacobian (per input)": lambda p, ids: jacobian_lens(p, ids, layers=states),
    }
    names = {"jacobian": "averaged jacobian", "tuned": "tuned"}
    for kind, lens in fitted.items():
        chosen[names[kind]] = lens.apply
    return chosen


def faithfulness(prog: jetgraph.ResidualProgram, texts: list[torch.Tensor],
                 chosen: dict[str, Callable], states: list[int]) -> dict:
    """Per lens and state: KL and top-1 (mean and 95% interval over the texts) and seconds per text."""
    per_lens = {}
    warnings.simplefilter("ignore", LensSeriesDivergenceWarning)  # counted below, not printed per text
    for name, lens in chosen.items():
        kl, top1, seconds, divergent = [], [], 0.0, torch.zeros(len(states))
        for ids in texts:
            started = time.perf_counter()
            result = lens(prog, ids)
            seconds += time.perf_counter() - started
            rows = [result.labels.index(f"h{s}") for s in states]
            divergent += result.divergent[rows].float().mean(-1)
            kl.append(result.prompt_metrics["kl"][rows, 0])
            top1.append(result.prompt_metrics["top1"][rows, 0])
        kl_t, top_t = torch.stack(kl), torch.stack(top1)  # [texts, states]
        per_lens[name] = {
            "seconds_per_text": seconds / len(texts),
            "states": {f"h{s}": {"kl": bootstrap_mean(kl_t[:, i]), "top1": bootstrap_mean(top_t[:, i]),
                                 "divergent_positions": (divergent[i] / len(texts)).item()}
                       for i, s in enumerate(states)},
        }
    return per_lens


def fit_costs(prog: jetgraph.ResidualProgram, corpus: list[torch.Tensor], skip_first: int,
              directions: int, repeats: int, states: list[int]) -> dict:
    """The averaged Jacobian fitted forward and reverse, alternated ``repeats`` times."""
    forward_times, reverse_times = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        forward = fit_jacobian_lens(prog, corpus, layers=states, skip_first=skip_first,
                                    directions=directions, progress=False)
        forward_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        reverse = fit_jacobian_lens_reverse(prog, corpus, layers=states, skip_first=skip_first,
                                            rows=directions, progress=False)
        reverse_times.append(time.perf_counter() - started)
    difference = (forward.matrices - reverse.matrices).abs().max().item()
    return {"forward_seconds": forward_times, "reverse_seconds": reverse_times,
            "directions_per_pass": directions, "max_abs_difference": difference,
            "scale": forward.matrices.abs().max().item()}


def run(model_name: str, *, fit_texts: int, eval_texts: int, length: int, steps: int, granularity: str,
        repeats: int, skip_first: int, directions: int, every: int, fit: list[str], parts: list[str],
        sets: list[str] | None) -> dict:
    model, tokenizer = jetgraph.load_model(model_name)
    bos = getattr(model.config, "bos_token_id", None)
    prog = jetgraph.capture(model, granularity=granularity)
    states = list(range(0, len(prog.units), every))
    corpus = sample_texts(model, bos, fit_texts, length, 0)
    description = (f"{fit_texts} texts of {length} tokens sampled from the model (temperature 1, "
                   "from BOS, seeds 0..)")
    fitted: dict[str, FittedLens] = {}
    fit_seconds: dict[str, float] = {}
    if "jacobian" in fit:
        started = time.perf_counter()
        fitted["jacobian"] = fit_jacobian_lens(prog, corpus, layers=states, skip_first=skip_first,
                                               directions=directions, description=description, progress=False)
        fit_seconds["averaged jacobian (forward mode)"] = time.perf_counter() - started
    if "tuned" in fit:
        started = time.perf_counter()
        fitted["tuned"] = fit_tuned_lens(prog, corpus, layers=states, steps=steps, description=description,
                                         progress=False)
        fit_seconds["tuned"] = time.perf_counter() - started
    result = {
        "model": Path(model_name).name, "granularity": granularity, "states": [f"h{s}" for s in states],
        "fit_corpus": description, "fit_seconds": fit_seconds,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                   f"torch {torch.__version__}",
    }
    if "tuned" in fitted:
        result["tuned_loss_first_last"] = fitted["tuned"].fit["loss_first_last"]
    if "jacobian" in fitted and repeats:
        result["jacobian_fit_forward_vs_reverse"] = fit_costs(prog, corpus, skip_first, directions, repeats,
                                                              states)
    if "faithfulness" in parts:
        held_out = sample_texts(model, bos, eval_texts, length, EVAL_SEED)
        result["eval_texts"] = (f"{eval_texts} texts of {length} tokens sampled from the model, "
                                f"seeds {EVAL_SEED}..")
        result["faithfulness"] = faithfulness(prog, held_out, lenses(fitted, states), states)
    if "concepts" in parts:
        result["concepts"] = jetgraph.lenses.concepts(prog, tokenizer, sets=sets, layers=states,
                                                      fitted_lenses=list(fitted.values()), progress=False)
    return result


def tables(result: dict) -> str:
    """Markdown tables: KL and top-1 per lens and state, the costs, then the concept scores."""
    states = result["states"]
    lines: list[str] = []
    if "faithfulness" in result:
        lines += [f"Faithfulness on {result['model']} ({result['granularity']} states; "
                  f"{result['eval_texts']}): KL(model ‖ lens) in nats, mean [95% interval]", "",
                  "| lens | " + " | ".join(states) + " | s/text |", "|---" * (len(states) + 2) + "|"]
        for name, entry in result["faithfulness"].items():
            cells = [f"{v['kl']['mean']:.3f} [{v['kl']['low']:.3f}, {v['kl']['high']:.3f}]"
                     for v in entry["states"].values()]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {entry['seconds_per_text']:.3f} |")
        lines += ["", "Top-1 agreement with the model, mean [95% interval]", "",
                  "| lens | " + " | ".join(states) + " |", "|---" * (len(states) + 1) + "|"]
        for name, entry in result["faithfulness"].items():
            cells = [f"{v['top1']['mean']:.2f} [{v['top1']['low']:.2f}, {v['top1']['high']:.2f}]"
                     for v in entry["states"].values()]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    costs = result.get("jacobian_fit_forward_vs_reverse")
    if costs:
        lines += ["", f"Averaged Jacobian fit, alternated: forward mode {costs['forward_seconds']} s, "
                  f"reverse mode {costs['reverse_seconds']} s ({costs['directions_per_pass']} directions per "
                  f"pass); max |difference| {costs['max_abs_difference']:.2g} (entries up to "
                  f"{costs['scale']:.3g})."]
    if result["fit_seconds"]:
        lines += ["", "Fit times: " + ", ".join(f"{k} {v:.1f} s" for k, v in result["fit_seconds"].items())]
    if "concepts" in result:
        lines += concept_tables(result["concepts"])
    return "\n".join(lines)


def concept_tables(concepts: dict) -> list[str]:
    """The concept part: pass@10 per lens and set, its control, the chance baseline, the model."""
    sets = list(concepts["sets"])
    def own(scores: dict) -> str:
        return "–" if not scores["items"] else f"{scores['pass@1']:.2f} / {scores['pass@10']:.2f}"

    model = ["| model's own answer (pass@1 / @10 at the prompt's end) | "
             + " | ".join(own(concepts["model"][n]) for n in sets) + " |",
             "| the same on the control prompts | "
             + " | ".join(own(concepts["model_on_control_prompts"][n]) for n in sets) + " |"]
    header = "| | " + " | ".join(sets) + " |\n" + "|---" * (len(sets) + 1) + "|"
    seconds = ", ".join(f"{k} {v:.2f}" for k, v in concepts["seconds_per_prompt"].items())
    return ["", "Intermediate concepts: pass@10 intermediate / answer (median first state), states "
            + ", ".join(concepts["states"]), "", concept_table(concepts["lenses"]),
            "", "Leakage control (later states from the control prompt)", "",
            concept_table(concepts["controls"]),
            "", "Chance baseline: another item's intermediate / answer on this prompt", "",
            concept_table(concepts["lenses"], parts=("other_intermediate", "other_answer")),
            "", header, *model, "", f"Seconds per prompt: {seconds}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(TINYSTORIES), help="a model folder, or smollm2")
    parser.add_argument("--fit-texts", type=int, default=48)
    parser.add_argument("--eval-texts", type=int, default=120)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--granularity", default="sublayer", choices=("block", "sublayer"))
    parser.add_argument("--every", type=int, default=1, help="score every n-th stream state from h0")
    parser.add_argument("--fitted", default="jacobian,tuned",
                        help="fitted lenses: jacobian, tuned (comma list, or none)")
    parser.add_argument("--parts", default="faithfulness,concepts",
                        help="faithfulness, concepts (comma list)")
    parser.add_argument("--sets", default=None, help="concept sets (comma list; default all)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="forward/reverse fit timings, alternated (0: none)")
    parser.add_argument("--skip-first", type=int, default=16)
    parser.add_argument("--directions", type=int, default=32)
    parser.add_argument("--ci", action="store_true",
                        help="the CI-sized run: 4 + 8 texts of 24 tokens, one concept set")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.ci:
        args.fit_texts, args.eval_texts, args.length = 4, 8, 24
        args.steps, args.repeats, args.skip_first = 20, 1, 4
        args.sets = args.sets or "arithmetic_ordering"
    fit = [] if args.fitted == "none" else args.fitted.split(",")
    parts = args.parts.split(",")
    if set(fit) - {"jacobian", "tuned"} or set(parts) - {"faithfulness", "concepts"}:
        parser.error("--fitted takes jacobian, tuned or none; --parts faithfulness, concepts")
    if args.model != "smollm2" and not (Path(args.model) / "config.json").is_file():
        parser.error(f"{args.model} holds no model (config.json): give --model FOLDER or smollm2")
    result = run(args.model, fit_texts=args.fit_texts, eval_texts=args.eval_texts, length=args.length,
                 steps=args.steps, granularity=args.granularity, repeats=args.repeats,
                 skip_first=args.skip_first, directions=args.directions, every=args.every, fit=fit,
                 parts=parts, sets=args.sets.split(",") if args.sets else None)
    result["command"] = "python benchmarks/lens_eval.py " + " ".join(sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(tables(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
