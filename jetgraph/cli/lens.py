"""``jetgraph lens``: the iterative jet lens of one text, or averaged over a file of prompts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jetgraph.capture.config_facts import folder_facts
from jetgraph.cli.exits import UsageError
from jetgraph.cli.options import (
    capture_program,
    check_output,
    check_text,
    cost_arguments,
    granularity_argument,
    load,
    memory_size,
    model_argument,
    order_type,
    positive,
    read_prompts,
)


def add_parser(command) -> None:
    """Register the command with the CLI's ``command(name, help, description)``."""
    lens = command("lens", "the iterative jet lens: every layer's decoder jet, as a PNG and a CSV",
                   "Decode every stream state h_l with the order-k jet of the decoder centred there "
                   "(order 0 = logit lens) and compare with the model's logits.")
    model_argument(lens)
    lens.add_argument("text", nargs="?", help="input text (or --prompts FILE)")
    lens.add_argument("--prompts", type=Path, metavar="FILE",
                      help="one prompt per line: the lens over all of them in padded batches, metrics "
                           "averaged over the prompts (the PNG shows mean cosine and its 95%% interval)")
    lens.add_argument("--batch-size", type=positive, default=8,
                      help="at most this many prompts per batch with --prompts (fewer when a batch's planned "
                           "peak would pass --max-memory)")
    lens.add_argument("--order", type=order_type, default=1,
                      help="highest Taylor order; orders 0..K are drawn")
    granularity_argument(lens)
    lens.add_argument("--joint", action="store_true",
                      help="also fit the joint lens (weighted centres), drawn and written with the rest")
    lens.add_argument("--out", type=Path, default=Path("lens.png"), help="PNG to write")
    lens.add_argument("--csv", type=Path, help="also write every order's per-layer metrics as CSV")
    lens.add_argument("--html", type=Path, help="also write the interactive explorer (one HTML file)")
    cost_arguments(lens)

    lens.add_argument("--max-memory", type=memory_size, default=None, metavar="SIZE",
                      help="memory budget of the lens above the loaded model (e.g. 8GB); --prompts picks its "
                           "batch size to fit it. Default: half the memory available (--prompts), all of it "
                           "(one text). The plan (--dry-run) states the peak")
    lens.set_defaults(run=run, check=check)


def check(args: argparse.Namespace) -> None:
    if (args.text is None) == (args.prompts is None):
        raise UsageError("give either a text or --prompts FILE (one prompt per line), not both or neither")
    if args.prompts is not None:
        if args.joint:
            raise UsageError("--joint fits weights on one input; it does not combine with --prompts")
        args.prompt_texts = read_prompts(args.prompts)
    else:
        check_text(args.text, "the text")
    check_output(args.out, (".png",), "--out")
    if args.csv is not None:
        check_output(args.csv, (".csv",), "--csv")
    if args.html is not None:
        check_output(args.html, (".html", ".htm"), "--html")


def run(args: argparse.Namespace) -> int:
    import warnings

    from jetgraph.applications import iterative_lenses, joint_lens, write_lens_csv
    from jetgraph.applications.lens import LensSeriesDivergenceWarning, LensSizes, lens_plan
    from jetgraph.applications.plots import plot_lens
    from jetgraph.cost import format_plan

    if args.prompts is not None:
        return _run_lens_over_prompts(args)
    model, tokenizer, ids = load(args)
    prog = capture_program(model, ids, args.granularity)
    orders = range(args.order + 1)
    plan = lens_plan(LensSizes.of(prog, orders), [ids.shape[1]], 1)
    if args.dry_run:
        print(format_plan([plan], args.max_time, max_bytes=args.max_memory)
              + ("\n  (the joint lens's fit is not included)" if args.joint else ""))
        return 0
    plan.check(args.max_time, "--max-time SECONDS (or --max-time none)", max_bytes=args.max_memory,
               memory_option="shorten the text, lower --order, or raise --max-memory")
    with warnings.catch_warnings():  # the table marks a diverging series with * and explains it
        warnings.simplefilter("ignore", LensSeriesDivergenceWarning)
        results = list(iterative_lenses(prog, ids, orders).values())  # one Taylor pass
    if args.joint:
        results.append(joint_lens(prog, ids, order=args.order))
    plot_lens(results, args.out, tokenizer, ids)
    print(lens_table(results))
    if args.csv is not None:
        write_lens_csv(results, args.csv)
    if args.html is not None:
        from jetgraph.applications.report import report

        report(results, path=args.html, title=f"lens of {args.model}", tokenizer=tokenizer, input_ids=ids)
    print(_wrote(args))
    return 0


def _lens_plan_before_loading(args: argparse.Namespace):
    """The plan of ``lens --prompts`` from the model's config.json and its tokenizer alone (None
    when either is not at hand: a GGUF file, a hub id): --dry-run and --max-time need no model."""
    import torch

    from jetgraph.applications.lens import LensSizes, lens_batch_size, lens_plan
    from jetgraph.capture.loading import load_tokenizer

    dims = folder_facts(args.model)
    if not {"layers", "vocab", "hidden"} <= dims.keys():
        return None
    try:
        tokenizer = load_tokenizer(args.tokenizer or args.model)
        lengths = [len(tokenizer(text).input_ids) for text in args.prompt_texts]
    except Exception:  # any tokenizer trouble is reported after loading, by the real run
        return None
    states = dims["layers"] * (2 if args.granularity == "sublayer" else 1) + 1
    sizes = LensSizes(states, tuple(range(args.order + 1)), dims["vocab"], dims["hidden"],
                      12.0 * dims["layers"] * dims["hidden"] ** 2, getattr(torch, args.dtype))
    return lens_plan(sizes, lengths, lens_batch_size(sizes, lengths, args.max_memory, args.batch_size))


def _run_lens_over_prompts(args: argparse.Namespace) -> int:
    import warnings

    from jetgraph.applications import write_lens_csv
    from jetgraph.applications.lens import (
        LensSeriesDivergenceWarning,
        LensSizes,
        lens_batch_size,
        lens_over_prompts,
        lens_plan,
    )
    from jetgraph.applications.plots import plot_lens_average
    from jetgraph.capture.loading import encode
    from jetgraph.cost import format_plan
    from jetgraph.errors import CostError

    early = _lens_plan_before_loading(args)
    if early is not None and args.dry_run:
        print(format_plan([early], args.max_time, max_bytes=args.max_memory)
              + "\n  (from config.json and the tokenizer, before loading the model)")
        return 0
    if early is not None and args.max_time is not None and early.seconds > args.max_time:
        raise CostError(f"refusing {early.describe()}: more than the limit of --max-time {args.max_time:g} s "
                        "(checked before loading the model); use fewer or shorter prompts, a lower --order, "
                        "or raise --max-time (none: no limit)")
    model, tokenizer, ids = load(args, text=args.prompt_texts[0])
    prog = capture_program(model, ids, args.granularity)
    prompts = [encode(model, tokenizer, text)[0] for text in args.prompt_texts]
    orders = range(args.order + 1)
    sizes, lengths = LensSizes.of(prog, orders), [len(p) for p in prompts]
    batch = lens_batch_size(sizes, lengths, args.max_memory, args.batch_size)  # refuses what cannot fit
    plan = lens_plan(sizes, lengths, batch)
    if args.dry_run:
        print(format_plan([plan], args.max_time, max_bytes=args.max_memory))
        return 0
    plan.check(args.max_time, "--max-time SECONDS (or --max-time none)", max_bytes=float("inf"))
    side = getattr(tokenizer, "padding_side", "left") if prog.reads_mask else "right"
    with warnings.catch_warnings():  # the table marks a diverging series with * and explains it
        warnings.simplefilter("ignore", LensSeriesDivergenceWarning)
        averages = list(lens_over_prompts(prog, prompts, orders, batch_size=batch, side=side,
                                          max_seconds=None, max_memory=float("inf")).values())
    plot_lens_average(averages, args.out)
    print(f"means over {averages[0].prompts} prompts ({averages[0].positions:,} tokens):")
    print(lens_table(averages))
    if args.csv is not None:
        write_lens_csv(averages, args.csv)
    if args.html is not None:
        from jetgraph.applications.report import report

        report(*averages, path=args.html, title=f"lens of {args.model} over {averages[0].prompts} prompts")
    print(_wrote(args))
    return 0


def lens_table(results) -> str:
    """Cosine to the logits by centre, one column per iterative order, ``*`` after a cosine whose
    jet diverges at some token (explained under the table); the joint lens after."""
    from jetgraph.applications.lens import DIVERGENCE_REMAINDER

    iterative = [r for r in results if r.kind == "iterative"]
    lines = [f"{'state':<6}{'after':<10}" + "".join(f"  {'cos@' + str(r.order):>8}" for r in iterative)]
    marked = False
    for i, (label, after) in enumerate(zip(iterative[0].labels, iterative[0].written_by, strict=True)):
        flags = ["*" if r.divergent_counts()[i] else " " for r in iterative]
        marked = marked or "*" in flags
        cells = "".join(f"  {r.table()[i]['cosine']:7.3f}{flag}"
                        for r, flag in zip(iterative, flags, strict=True))
        lines.append(f"{label:<6}{after:<10}{cells}")
    if marked:
        lines.append(f"* diverged: the jet is a diverging Taylor series at some token (order k ≥ 1: ‖c_k‖ ≥ "
                     f"‖c_k-1‖ and ‖logits − lens‖ > {DIVERGENCE_REMAINDER:g}·‖logits‖, or non-finite): that "
                     "number measures the series, not the decoder (CSV column divergent; docs/lens.md)")
    for result in results:
        if result.kind == "joint":
            lines.append(f"joint lens, order {result.order}: cosine "
                         f"{result.metrics['cosine'][0].mean().item():.3f} (weights fitted on this input)")
    return "\n".join(lines)


def _wrote(args: argparse.Namespace) -> str:
    return "wrote " + ", ".join(str(p) for p in (args.out, args.csv, args.html) if p is not None)
