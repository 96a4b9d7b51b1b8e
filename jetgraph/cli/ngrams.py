"""``jetgraph ngrams``: bigram and skip-bigram tables read from the model or from its paths.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from jetgraph.capture.config_facts import folder_facts
from jetgraph.cli.exits import UsageError
from jetgraph.cli.launch import launch_ranks
from jetgraph.cli.options import (
    capture_program,
    check_output,
    check_path_specs,
    cost_arguments,
    first_tokens_argument,
    id_range,
    load,
    model_argument,
    non_negative,
    positive,
    prefix_argument,
    read_contexts,
    sources_argument,
    stop_at_plan,
)
from jetgraph.files import check_writable
from jetgraph.passes.paths import context_tokens


def add_parser(command) -> None:
    """Register the command with the CLI's ``command(name, help, description)``."""
    ngrams = command("ngrams", "bigram / skip-bigram tables read from the model or from its paths",
                     "Evaluate paths (unit weights: their own logits) on every vocabulary token (or token "
                     "pair for paths through attention) and keep the global top-N.\nThe default, h_last→U, "
                     "is the model's own next-token distribution after each token, read the way the "
                     "tokenizer builds text: after its BOS when it adds one, else averaged over the "
                     "--first-tokens tokens the model expects most before it: the read-out that recovers "
                     "known bigrams best (docs/readouts.md).\nThe cost is planned first: "
                     "--dry-run prints it, and a table estimated past --max-time is refused.")
    model_argument(ngrams)
    ngrams.add_argument("--paths", nargs="+", default=["h_last→U"],
                        help='paths such as "h_last→U" (the default) "E→U" "E→MLP_last→U" "E→mlp3^1→U" '
                             '"E→attn0→U"')
    first_tokens_argument(ngrams, "for a path from the model's stream (h_last→U): mix each row's "
                                  "distribution over")
    prefix_argument(ngrams)
    ngrams.add_argument("--top", type=positive, default=100, help="global top-N entries")
    ngrams.add_argument("--keywords",
                        help='keyword list for probability masses: "toxic", "refusal" or a file')
    sources = ngrams.add_mutually_exclusive_group()
    sources_argument(sources, "the (first) context token")
    sources.add_argument("--id-range", type=id_range, default=None, metavar="START:END",
                         help="only token ids START..END-1 as the (first) context token")
    sources.add_argument("--contexts", type=Path, default=None,
                         help="a file of contexts, one per line as token ids (two ids for paths through "
                              "attention)")
    ngrams.add_argument("--rank", choices=("prob", "logit"), default="prob",
                        help="order the top-N by conditional probability or by raw logit")
    ngrams.add_argument("--last-top", type=non_negative, default=0, metavar="M",
                        help="also keep, for each last context token, its best M entries, written to "
                             "OUT-by-last.csv (the per-z2 summary of a pair table)")
    ngrams.add_argument("--chunk", type=positive, default=1024, help="contexts per batched call")
    ngrams.add_argument("--resume", type=Path, metavar="FOLDER",
                        help="folder for checkpoints, made if missing (an interrupted run continues, "
                                                    "with any number of processes)")
    ngrams.add_argument("--nproc", type=positive, default=None, metavar="N",
                        help="split each table over N processes on this machine (torchrun's launcher; "
                             "one per GPU on a GPU node); under torchrun the table is split over its ranks")
    ngrams.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where tables are computed; auto: this rank's GPU (LOCAL_RANK) if there is one")
    ngrams.add_argument("--out", type=Path, default=Path("ngrams.csv"),
                        help="CSV or JSON to write; one file per path (suffixed -0, -1, …) when several")
    ngrams.add_argument("--html", type=Path,
                        help="also write each table as a searchable HTML explorer (suffixed like --out)")
    cost_arguments(ngrams)
    ngrams.set_defaults(run=run, check=check)


def check(args: argparse.Namespace) -> None:
    from jetgraph.applications.ngrams import load_keywords
    from jetgraph.passes.paths import starts_at_model_state

    dims = folder_facts(args.model)
    args.specs = check_path_specs(args.paths, dims)  # parsed once, handed down as PathSpecs
    if args.first_tokens is not None and not any(starts_at_model_state(spec) for spec in args.specs):
        raise UsageError("--first-tokens applies to paths from the model's stream (h_last→U, hN→U); "
                         f"these read exactly their own tokens: {' '.join(args.paths)}")
    stream_paths = any(starts_at_model_state(spec) for spec in args.specs)
    if args.prefix is not None and args.sources is None and not stream_paths:
        raise UsageError("--prefix applies to read-outs of the model's stream (h_last→U, hN→U) and to "
                         f"--sources N; these paths read exactly their own tokens: {' '.join(args.paths)}")
    args.keyword_words = load_keywords(args.keywords) if args.keywords else None
    if args.id_range is not None and "vocab" in dims and args.id_range.stop > dims["vocab"]:
        raise UsageError(f"--id-range {args.id_range.start}:{args.id_range.stop} reaches past the "
                         f"vocabulary of {dims['vocab']:,} tokens")
    if args.contexts is not None:
        args.context_rows = read_contexts(args.contexts)
    for out in ngram_outputs(args):
        check_output(out, (".csv", ".json"), "--out")
    if args.html is not None:
        check_output(args.html, (".html", ".htm"), "--html")
    if args.resume is not None:
        if args.resume.is_file() or args.resume.suffix in (".pt", ".pth", ".ckpt"):
            raise UsageError(f"--resume takes a folder (one checkpoint ngrams-N.pt per path is kept inside "
                             f"it), not a file: {args.resume}")
        check_writable(args.resume / "ngrams-0.pt", "--resume folder")
    if args.contexts is not None:
        _check_context_rows(args, dims.get("vocab"))
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available here (use --device cpu)")
    if args.nproc is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--nproc launches the processes itself: leave it out under torchrun")
    _refuse_hopeless_tables(args, dims)


def _refuse_hopeless_tables(args: argparse.Namespace, dims: dict[str, int]) -> None:
    """Before loading: a lower bound on each table's time (its decoder matmul alone,
    rows · 2·V·d FLOPs at the GEMM rate measured here) past --max-time is refused at once."""
    import torch

    from jetgraph.cost import format_count, format_duration, format_flops, gemm_rate
    from jetgraph.errors import CostError

    if args.max_time is None or args.dry_run or "vocab" not in dims or "hidden" not in dims:
        return
    vocab, hidden = dims["vocab"], dims["hidden"]
    for text, spec in zip(args.paths, args.specs, strict=True):
        pairs = context_tokens(spec) == 2  # a lower bound: a block path counts as one token
        if args.contexts is not None:
            rows = len(args.context_rows)
        else:
            given = args.sources or (len(args.id_range) if args.id_range is not None else None)
            rows = (min(given, vocab) if given else vocab) * (vocab if pairs else 1)
        flops = rows * 2.0 * vocab * hidden
        rate = gemm_rate(getattr(torch, args.dtype))
        seconds = flops / rate
        if seconds > args.max_time:
            raise CostError(f"refusing the n-gram table {text} before loading the model: "
                            f"{format_count(rows)} contexts need {format_flops(flops)} for the decoder "
                            f"matmul alone, at least {format_duration(seconds)} at {rate / 1e9:.3g} "
                            f"GFLOP/s ({args.dtype}) measured here, more than --max-time "
                            f"{args.max_time:g} s; restrict the contexts (--sources N, --contexts FILE) "
                            "or raise --max-time (none: no limit)")


def _check_context_rows(args: argparse.Namespace, vocab: int | None) -> None:
    """--contexts rows against every path (one id without attention, two through it) and the
    vocabulary of the model's config."""
    width = len(args.context_rows[0])
    for text, spec in zip(args.paths, args.specs, strict=True):
        needed = context_tokens(spec)
        if needed is not None and width != needed:  # a block path is checked after capture
            raise UsageError(f"--contexts {str(args.contexts)!r} has {width} id(s) per line, but {text} "
                             f"reads {needed} token(s) of context")
    largest = max(max(row) for row in args.context_rows)
    if vocab is not None and largest >= vocab:
        raise UsageError(f"--contexts {str(args.contexts)!r} holds token id {largest}, outside the "
                         f"model's vocabulary of {vocab}")


def ngram_outputs(args: argparse.Namespace) -> list[Path]:
    if len(args.paths) == 1:
        return [args.out]
    return [args.out.with_name(f"{args.out.stem}-{i}{args.out.suffix}") for i in range(len(args.paths))]


def run(args: argparse.Namespace) -> int:
    if args.nproc is not None and not args.dry_run:  # a dry run plans here, for N ranks
        return launch_ranks(args)
    from jetgraph.applications.ngrams import current_shard

    shard = current_shard()  # under torchrun: this rank's place; else None
    code = _run_tables(args, shard)
    if shard is not None:
        shard.close()  # every rank finished: close together, so no exit aborts a peer
    return code


def _run_tables(args: argparse.Namespace, shard) -> int:
    import torch

    from jetgraph.applications import keyword_ids
    from jetgraph.applications.ngrams.tables import TableSet
    from jetgraph.errors import CostError

    main_rank = shard is None or shard.is_main
    model, tokenizer, ids = load(args, text="a")
    prog = capture_program(model, ids)
    device = device_for(args.device, shard)
    if device.type != "cpu":
        prog.to(device)
    keywords = keyword_ids(tokenizer, args.keyword_words) if args.keyword_words else None
    ranks = shard.world if shard else (args.nproc or 1)
    tables = TableSet(prog, args.specs, tokenizer=tokenizer, convention=args.prefix,
                      sources=args.id_range if args.id_range is not None else args.sources,
                      contexts=torch.tensor(args.context_rows) if args.contexts is not None else None,
                      first_tokens=args.first_tokens, ranks=ranks, top=args.top, keywords=keywords,
                      normalise=True, rank=args.rank, chunk=args.chunk, last_top=args.last_top)
    printing = main_rank
    if args.dry_run and not main_rank:  # rank 0 prints the plan
        return 0
    try:
        if stop_at_plan(args, tables.plans(), "lower --chunk, or fewer --keywords"):
            return 0
    except CostError as exc:
        if tables.mixture_size == 1:
            raise
        raise CostError(f"{exc} (the default read-out runs the model {tables.mixture_size} times per row: "
                        "--first-tokens M with a smaller M, or --sources N, shrinks it)") from None
    tables.prepare()
    if printing and any(tables.from_stream):
        print(tables.describe())
    outputs = ngram_outputs(args)
    for index, out in enumerate(outputs):
        resume = args.resume / f"ngrams-{index}.pt" if args.resume else None
        table = tables.table(index, resume=resume, max_seconds=None, shard=shard, progress=printing)
        if not printing:
            continue
        table.export(out, tokenizer)
        args.written = [*getattr(args, "written", []), out]
        if args.html is not None:
            html = args.html if len(outputs) == 1 else args.html.with_name(f"{args.html.stem}-{index}.html")
            table.to_html(html, tokenizer)
            args.written.append(html)
        where = f" over {ranks} processes" if ranks > 1 else ""
        print(f"{table.path}: top {args.top} of {len(table.contexts):,} contexts x {table.vocab:,} "
              f"(by {args.rank}){where} -> {out}")
        for entry in table.entries(tokenizer)[:10]:
            print(f"  {entry['context']!r:>16} -> {entry['next']!r:<16} logit {entry['logit']:8.3f}  "
                  f"p {entry['prob']:.6f}")
        if args.last_top:
            by_last = table.export_last(out.with_name(f"{out.stem}-by-last.csv"), tokenizer)
            args.written.append(by_last)
            print(f"  best {args.last_top} per last context token -> {by_last}")
        if keywords:
            mass = table.mass()
            print(f"  keyword mass ({args.keywords}, {len(keywords)} tokens): {mass['mean']:.5f} "
                  f"[{mass['low']:.5f}, {mass['high']:.5f}] 95% bootstrap")
    return 0


def device_for(choice: str, shard):
    import torch

    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if shard is not None:
        return shard.device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
