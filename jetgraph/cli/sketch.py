"""``jetgraph sketch``: a jet n-gram language model read from the model, scored by perplexity.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jetgraph.capture.config_facts import folder_facts
from jetgraph.cli.exits import UsageError, in_flags
from jetgraph.cli.options import (
    capture_program,
    cost_arguments,
    first_tokens_argument,
    load,
    model_argument,
    non_negative,
    positive,
    prefix_argument,
    read_text_option,
)
from jetgraph.files import check_writable


def add_parser(command) -> None:
    """Register the command with the CLI's ``command(name, help, description)``."""
    sketch = command("sketch", "a jet n-gram language model read from the model, scored by perplexity",
                     "Read a bigram table (the default read-out: the model after each token, read after "
                     "the tokenizer's BOS or averaged over --first-tokens first tokens; each row's top "
                     "--bigram-top tokens, the rest backing off to the unigram), a trigram table "
                     "(the model on every token pair, each row's top tokens) when affordable, and a unigram "
                     "(the bigram read-out's rows averaged) from the model; interpolate them "
                     "(weights fitted on a development split) and print the perplexity on held-out text "
                     "of this sketch, the model itself, and count-based bigram and unigram LMs trained on "
                     "the same text.\nWithout --text the text is sampled from the model itself.")
    model_argument(sketch)
    sketch.add_argument("--text", type=Path, metavar="FILE",
                        help="UTF-8 text, split in order 80/10/10: count LMs, interpolation weights, "
                             "perplexities (default: --samples texts sampled from the model)")
    sketch.add_argument("--samples", type=positive, default=1024,
                        help="texts to sample from the model when no --text is given (split 80/10/10)")
    sketch.add_argument("--length", type=positive, default=None,
                        help="tokens per sampled text, and per scored window of --text (default: 256, or "
                             "the model's context if shorter)")
    first_tokens_argument(sketch, "mix the bigram read-out's rows over")
    prefix_argument(sketch)
    sketch.add_argument("--trigram", choices=("auto", "on", "off"), default="auto",
                        help="read the trigram table: auto when it fits --max-time and 2 GB, on (refuse "
                             "otherwise), off")
    sketch.add_argument("--trigram-top", type=positive, default=16, metavar="K",
                        help="tokens kept per trigram row (the rest of the row backs off to the bigram)")
    sketch.add_argument("--bigram-top", type=positive, default=128, metavar="K",
                        help="tokens kept per bigram row, with their exact probabilities; the rest of "
                             "the row backs off to the unigram (memory O(V·K); K ≥ V: the dense table)")
    sketch.add_argument("--seed", type=non_negative, default=0, help="seed of the sampling")
    sketch.add_argument("--out", type=Path, default=Path("sketch"),
                        help="folder for sketch.safetensors (the tables), sketch.json and perplexities.csv")
    cost_arguments(sketch)
    sketch.set_defaults(run=run, check=check)


def check(args: argparse.Namespace) -> None:
    args.text_content = read_text_option(args.text)
    if args.text_content is None and args.samples < 10:
        raise UsageError(f"--samples {args.samples} is too few to split 80/10/10: give at least 10")
    context = folder_facts(args.model).get("context")
    if args.length is None:
        args.length = min(256, context) if context is not None else 256
    if args.length < 3:
        raise UsageError(f"--length {args.length}: a scored window needs at least 3 tokens")
    if context is not None and args.length > context:
        raise UsageError(f"--length {args.length} is longer than the model's context of {context} tokens")
    check_writable(args.out / "sketch.json", "--out folder")


class PlanShown(Exception):
    """Raised after a dry run's plan is printed: stop before any table is read."""


FLAGS = {'trigram="auto"': "--trigram auto", 'trigram="off"': "--trigram off", "max_seconds": "--max-time",
         "bigram_top": "--bigram-top", "first_tokens": "--first-tokens",
         "fewer samples": "fewer --samples"}


def run(args: argparse.Namespace) -> int:
    from jetgraph.applications.sketch import sketch_model
    from jetgraph.cost import check_plan, format_plan
    from jetgraph.errors import CostError

    model, tokenizer, ids = load(args, text="a")
    prog = capture_program(model, ids)

    def show(plan) -> None:  # plan_sketch has refused what is past --max-time or memory already
        phases = plan.phases()
        printed = format_plan(phases, args.max_time) + ("\n" + plan.skipped() if plan.skipped() else "")
        print(in_flags(printed, FLAGS))
        if args.dry_run:
            raise PlanShown
        check_plan(phases, args.max_time, "--max-time SECONDS (or --max-time none)", what="the sketch",
                   memory_option=f"lower --bigram-top from {plan.bigram_top}, or --trigram off")

    try:
        report = sketch_model(model, tokenizer, prog, text=args.text_content, samples=args.samples,
                              length=args.length, first_tokens=args.first_tokens,
                              trigram=args.trigram, top=args.trigram_top, max_seconds=args.max_time,
                              seed=args.seed, out=args.out, on_plan=show, bigram_top=args.bigram_top,
                              convention=args.prefix)
    except PlanShown:
        return 0
    except (CostError, ValueError) as exc:  # the library names its parameters; say the options
        raise type(exc)(in_flags(str(exc), FLAGS)) from None
    args.written = report.files
    data = report.data
    print(f"text: {data['source']}; {data['train_tokens']:,} training, {data['dev_tokens']:,} development "
          f"and {data['test_tokens']:,} test tokens")
    l3, l2, l1 = report.lm.weights
    print(f"interpolation (fitted on the development split): trigram {l3:.2f}, bigram {l2:.2f}, "
          f"unigram {l1:.2f}")
    print("perplexity on the test split:")
    for name, value in report.perplexities.items():
        print(f"  {name:42s} {value:10.2f}")
    print(f"wrote {', '.join(str(p) for p in report.files)}")
    return 0
