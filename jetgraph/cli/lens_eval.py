"""``jetgraph lens-eval``: the lenses compared on the intermediate-concept prompt sets.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jetgraph.cli.exits import UsageError
from jetgraph.cli.options import (
    check_output,
    granularity_argument,
    load,
    model_argument,
    positive,
    seconds_type,
)

LENS_KINDS = ("logit", "iterative", "ahead", "jacobian")
DEFAULT_MAX_SECONDS = 3600.0


def add_parser(command) -> None:
    """Register the command with the CLI's ``command(name, help, description)``."""
    evaluate = command(
        "lens-eval", "compare lenses on intermediate concepts (pass@k, first state, leakage control)",
        "Score lenses on two-hop prompt sets: is the intermediate concept (the country of 'the capital "
        "of the country famous for tulips') in a lens's top-k at some state and position, and the "
        "answer? Lenses that read later states are also scored with those states taken from a control "
        "prompt with the same answer (docs/lens-comparison.md).")
    model_argument(evaluate)
    evaluate.add_argument("--set", dest="sets", action="append", metavar="NAME",
                          help="a prompt set (repeat for several; default all): "
                               "arithmetic_ordering, associations, capitals, translation")
    evaluate.add_argument("--lens", dest="kinds", action="append", choices=LENS_KINDS, metavar="KIND",
                          help=f"a lens to score (repeat; default all of {', '.join(LENS_KINDS)})")
    evaluate.add_argument("--fitted", action="append", type=Path, default=[], metavar="FOLDER",
                          help="a fitted lens saved with FittedLens.save (averaged Jacobian or tuned); "
                               "repeat")
    granularity_argument(evaluate)
    evaluate.add_argument("--every", type=positive, default=1, metavar="N",
                          help="score every N-th stream state from h0 (fewer states, less time)")
    evaluate.add_argument("--out", type=Path, default=None, help="also write every score as JSON")
    evaluate.add_argument("--max-time", type=seconds_type, default=DEFAULT_MAX_SECONDS,
                          help="refuse a run estimated (from the first prompt) to take longer (seconds; "
                               "'none' for no limit)")
    evaluate.set_defaults(run=run, check=check)


def check(args: argparse.Namespace) -> None:
    from jetgraph.applications.lens.concepts import concept_set_names

    names = concept_set_names()
    unknown = [name for name in args.sets or [] if name not in names]
    if unknown:
        raise UsageError(f"unknown --set {', '.join(unknown)}: the sets are {', '.join(names)}")
    for folder in args.fitted:
        if not (folder / "result.json").is_file():
            raise UsageError(f"--fitted {folder} holds no saved lens (result.json): save one with "
                             "FittedLens.save(folder)")
    if args.out is not None:
        check_output(args.out, (".json",), "--out")


def run(args: argparse.Namespace) -> int:
    import jetgraph
    from jetgraph.applications.lens import FittedLens
    from jetgraph.applications.lens.concepts import concept_table

    fitted = [FittedLens.load(folder) for folder in args.fitted]
    for folder, lens in zip(args.fitted, fitted, strict=True):
        if lens.granularity != args.granularity:
            raise UsageError(f"--fitted {folder} holds a {lens.kind} lens fitted at {lens.granularity} "
                             f"states: give --granularity {lens.granularity}")
    model, tokenizer, _ = load(args, text="a")
    prog = jetgraph.capture(model, granularity=args.granularity)
    states = list(range(0, len(prog.units), args.every))
    result = jetgraph.lenses.concepts(prog, tokenizer, sets=args.sets, kinds=args.kinds or LENS_KINDS,
                                      fitted_lenses=fitted, granularity=args.granularity, layers=states,
                                      max_seconds=args.max_time)
    print(f"pass@10 of the intermediate concept / the answer (median first state), states "
          f"{', '.join(result['states'])}:")
    print(concept_table(result["lenses"]))
    if result["controls"]:
        print("\nleakage control: the later states taken from a prompt with the same answer:")
        print(concept_table(result["controls"]))
    print("\nchance baseline: another item's concept / answer on the same prompt:")
    print(concept_table(result["lenses"], parts=("other_intermediate", "other_answer")))
    own = [f"{name} {scores['pass@1']:.2f} / {scores['pass@10']:.2f}"
           for name, scores in result["model"].items() if scores["items"]]
    print("\nthe model's own answer at the prompt's end, pass@1 / pass@10: "
          + (", ".join(own) or "no item scored"))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0
