"""The ``jetgraph`` command line: ``capture`` a model and ``demo`` (the README's main job).

Exit codes: 0 success, 1 a jetgraph error (bad model, capture failure), 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_TEXT = "The capital of France is"


class UsageError(Exception):
    """Arguments that cannot work together (exit code 2)."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    from jetgraph.errors import JetgraphError

    try:
        return args.run(args)
    except UsageError as exc:
        print(f"jetgraph: error: {exc}", file=sys.stderr)
        return 2
    except (JetgraphError, ValueError) as exc:
        print(f"jetgraph: error: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jetgraph", description="Capture residual networks and expand them into jet paths.")
    commands = parser.add_subparsers(title="commands")
    capture = commands.add_parser(
        "capture", help="capture a model, print its residual IR and check it against the model")
    capture.add_argument("model", help='"smollm2", a local Hugging Face folder, or a cached hub id')
    capture.add_argument("--text", default=DEFAULT_TEXT, help="example input text")
    capture.add_argument("--granularity", choices=("block", "sublayer"), default="block")
    capture.add_argument("--out", type=Path, help="also write the summary to this file")
    capture.set_defaults(run=_run_capture)
    lens = commands.add_parser(
        "lens", help="the iterative jet lens: every layer's decoder jet, as a PNG and a CSV",
        description="Decode every stream state h_l with the order-k jet of the decoder centred there "
                    "(order 0 = logit lens) and compare with the model's logits.")
    _model_arguments(lens)
    lens.add_argument("text", help="input text")
    lens.add_argument("--order", type=int, default=1, help="highest Taylor order; orders 0..K are drawn")
    lens.add_argument("--granularity", choices=("block", "sublayer"), default="block")
    lens.add_argument("--joint", action="store_true", help="also fit the joint lens (weighted centres)")
    lens.add_argument("--out", type=Path, default=Path("lens.png"), help="PNG to write (default lens.png)")
    lens.add_argument("--csv", type=Path, help="also write the per-layer metrics as CSV")
    lens.set_defaults(run=_run_lens)
    ngrams = commands.add_parser(
        "ngrams", help="bigram / skip-bigram tables read from attention-free or one-attention paths",
        description="Evaluate paths on every vocabulary token (or token pair) and keep the global top-N.")
    _model_arguments(ngrams)
    ngrams.add_argument("--paths", nargs="+", default=["E→U"],
                        help='paths such as "E→U" "E→MLP_last→U" "E→mlp3^1→U" "E→attn0→U"')
    ngrams.add_argument("--top", type=int, default=100, help="global top-N entries (default 100)")
    ngrams.add_argument("--keywords",
                        help='keyword list for probability masses: "toxic", "refusal" or a file')
    ngrams.add_argument("--first", type=int, default=None,
                        help="paths through attention: only tokens < N as the first context token")
    ngrams.add_argument("--rank", choices=("prob", "logit"), default="prob",
                        help="order the top-N by conditional probability (default) or by raw logit")
    ngrams.add_argument("--chunk", type=int, default=1024, help="contexts per batched call")
    ngrams.add_argument("--resume", type=Path, help="folder for checkpoints (an interrupted run continues)")
    ngrams.add_argument("--out", type=Path, default=Path("ngrams.csv"),
                        help="CSV or JSON to write; one file per path (suffixed) when several")
    ngrams.set_defaults(run=_run_ngrams)
    paths = commands.add_parser("paths", help="count the paths of a model and draw an expansion's path graph")
    _model_arguments(paths)
    paths.add_argument("--text", default=DEFAULT_TEXT)
    paths.add_argument("--granularity", choices=("block", "sublayer"), default="sublayer")
    paths.add_argument("--order", type=int, default=0)
    paths.add_argument("--exclude", default="attn",
                       help='comma list of kinds or units to drop (default "attn")')
    paths.add_argument("--max-length", type=int, default=2)
    paths.add_argument("--max-nodes", type=int, default=60, help="largest graph drawn in full")
    paths.add_argument("--render", type=Path, default=Path("paths.svg"), help="SVG, PNG or DOT to write")
    paths.set_defaults(run=_run_paths)
    emit = commands.add_parser(
        "emit", help="emit an expansion of a model as a standalone Python module (+ .safetensors)",
        description="Expand MODEL (its paths, or its iterative lens) and write the expansion as a "
                    "standalone module that imports only torch and safetensors.")
    _model_arguments(emit)
    emit.add_argument("-o", "--out", type=Path, required=True, help="the .py file to write")
    emit.add_argument("--text", default=DEFAULT_TEXT, help="example input: fixes the emitted shape")
    emit.add_argument("--expansion", choices=("paths", "lens"), default="paths",
                      help="paths: Algorithm 2 with filters; lens: the decoder's jet at every h_l")
    emit.add_argument("--order", type=int, default=0, help="Taylor order (default 0)")
    emit.add_argument("--granularity", choices=("block", "sublayer"), default="block")
    emit.add_argument("--include", default=None, help="comma list of unit kinds or names to keep")
    emit.add_argument("--exclude", default=None, help='comma list of unit kinds or names to drop ("attn")')
    emit.add_argument("--max-length", type=int, default=1, help="units per path at most (default 1)")
    emit.add_argument("--no-remainder", action="store_true",
                      help="leave out the model's own forward (target, remainder) and its weights")
    emit.add_argument("--limit", type=int, default=5000,
                      help="refuse expansions with more terms than this (default 5000)")
    emit.set_defaults(run=_run_emit)
    demo = commands.add_parser(
        "demo", help="end to end on SmolLM2: capture, lens, bigrams, path graph, emitted code",
        description="The README's main job: writes PNG/SVG/CSV/.py into --out and prints a summary.")
    demo.add_argument("--model", default="smollm2")
    demo.add_argument("--text", default=DEFAULT_TEXT)
    demo.add_argument("--out", type=Path, default=Path("jetgraph-demo"), help="output folder")
    demo.add_argument("--chunk", type=int, default=1024, help="vocabulary rows per batched call")
    demo.set_defaults(run=_run_demo)
    return parser


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help='"smollm2", a local Hugging Face folder, or a cached hub id')
    parser.add_argument("--tokenizer", help="a tokenizer folder or tokenizer.json (default: the model's)")


def _load(args: argparse.Namespace, text: str | None = None):
    """(model, tokenizer, input ids) with the tokenizer and text checked against the model."""
    import jetgraph
    from jetgraph.capture.loading import encode, load_tokenizer

    model, tokenizer = jetgraph.load_model(args.model)
    if getattr(args, "tokenizer", None):
        tokenizer = load_tokenizer(args.tokenizer)
    ids = encode(model, tokenizer, text if text is not None else args.text)
    return model, tokenizer, ids


def _run_capture(args: argparse.Namespace) -> int:
    import jetgraph

    start = time.perf_counter()
    model, tokenizer = jetgraph.load_model(args.model)
    loaded = time.perf_counter()
    ids = tokenizer(args.text, return_tensors="pt", add_special_tokens=False).input_ids
    prog = jetgraph.capture(model, ids, granularity=args.granularity)
    captured = time.perf_counter()
    errors = _logit_errors(model, prog, ids)
    lines = [
        prog.summary_table(),
        "",
        f"input: {args.text!r} ({ids.shape[1]} tokens)",
        *(f"max |logits(program) - logits(model, {name} attention)| = {value:.3g}"
          for name, value in errors.items()),
        f"load {loaded - start:.1f} s, capture + lift {captured - loaded:.1f} s",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


def _logit_errors(model, prog, ids) -> dict[str, float]:
    """Max abs logit error against the model as loaded and with eager (math) attention."""
    import torch

    errors: dict[str, float] = {}
    original = getattr(getattr(model, "config", None), "_attn_implementation", None)
    with torch.no_grad():
        logits = prog(ids)
        reference = model(input_ids=ids, use_cache=False).logits
        errors[original or "default"] = (logits - reference).abs().max().item()
        if original not in (None, "eager") and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
            try:
                eager = model(input_ids=ids, use_cache=False).logits
            finally:
                model.set_attn_implementation(original)
            errors["eager"] = (logits - eager).abs().max().item()
    return errors


def _run_emit(args: argparse.Namespace) -> int:
    import jetgraph

    if args.out.suffix != ".py":
        raise UsageError(f"--out must name a .py file, got {str(args.out)!r}")
    start = time.perf_counter()
    model, _, ids = _load(args)
    prog = jetgraph.capture(model, ids, granularity=args.granularity)
    if args.expansion == "lens":
        states = [jetgraph.stream_term(prog, i) for i in range(len(prog.units) + 1)]
        expansion = jetgraph.expand(prog, "decoder", states, order=args.order, weights="unit")
    else:
        paths = jetgraph.expand_paths(prog, order=args.order, include=_names(args.include),
                                      exclude=_names(args.exclude), max_length=args.max_length)
        count = paths.count()
        if count > args.limit:
            raise UsageError(f"{count} paths pass the filters, more than --limit {args.limit}: lower "
                             "--max-length, --exclude unit kinds, or raise --limit")
        expansion = paths.expansion()
    path = jetgraph.emit_source(expansion, args.out, ids, remainder=not args.no_remainder)
    weights = path.with_suffix(".safetensors")
    print(f"{expansion!r} of {prog.model_class}: {len(expansion)} terms for input_ids of shape "
          f"{tuple(ids.shape)}")
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB) and {weights} "
          f"({weights.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s")
    return 0


def _names(text: str | None) -> set[str] | None:
    return None if text is None else {part.strip() for part in text.split(",") if part.strip()}


def _run_lens(args: argparse.Namespace) -> int:
    import jetgraph
    from jetgraph.applications import iterative_lens, joint_lens
    from jetgraph.applications.plots import plot_lens

    if args.order < 0:
        raise UsageError(f"--order must be >= 0, got {args.order}")
    model, tokenizer, ids = _load(args)
    prog = jetgraph.capture(model, ids, granularity=args.granularity)
    results = [iterative_lens(prog, ids, order=k) for k in range(args.order + 1)]
    if args.joint:
        results.append(joint_lens(prog, ids, order=args.order))
    plot_lens(results[: args.order + 1], args.out, tokenizer, ids)
    print(_lens_table(results))
    if args.csv is not None:
        results[args.order].to_csv(args.csv)
    print(f"wrote {args.out}" + (f" and {args.csv}" if args.csv else ""))
    return 0


def _lens_table(results) -> str:
    lines = [f"{'centre':<16}" + "".join(f"  cos@{r.kind[0]}{r.order}" for r in results)]
    for i, label in enumerate(results[0].labels):
        cells = "".join(f"  {r.metrics['cosine'][i].mean().item():7.3f}" if i < len(r.labels) else "        -"
                        for r in results)
        lines.append(f"{label:<16}{cells}")
    return "\n".join(lines)


def _run_ngrams(args: argparse.Namespace) -> int:
    import jetgraph
    from jetgraph.applications import keyword_ids, load_keywords, ngram_table, path_term
    from jetgraph.applications.ngrams import all_contexts, context_length

    if args.out.suffix not in (".csv", ".json"):
        raise UsageError(f"--out must end in .csv or .json, got {str(args.out)!r}")
    model, tokenizer, ids = _load(args, text="a")
    prog = jetgraph.capture(model, ids)
    keywords = keyword_ids(tokenizer, load_keywords(args.keywords)) if args.keywords else None
    for index, spec in enumerate(args.paths):
        term = path_term(prog, spec)
        contexts = None
        if context_length(term) == 2 and args.first is not None:
            vocab = int(prog.decoder.unembedding.shape[0])
            contexts = all_contexts(vocab, 2, first=range(min(args.first, vocab)))
        resume = args.resume / f"ngrams-{index}.pt" if args.resume else None
        table = ngram_table(prog, term, contexts=contexts, top=args.top, keywords=keywords,
                            normalise=True, rank=args.rank, chunk=args.chunk, resume=resume)
        out = args.out
        if len(args.paths) > 1:
            out = args.out.with_name(f"{args.out.stem}-{index}{args.out.suffix}")
        table.export(out, tokenizer)
        print(f"{term.name}: top {args.top} of {table.contexts.shape[0]:,} contexts x {table.vocab:,} "
              f"-> {out}")
        for entry in table.entries(tokenizer)[:10]:
            print(f"  {entry['context']!r:>16} -> {entry['next']!r:<16} logit {entry['logit']:8.3f}  "
                  f"p {entry['prob']:.3f}")
        if keywords:
            mass = table.mass()
            print(f"  keyword mass ({args.keywords}, {len(keywords)} tokens): {mass['mean']:.5f} "
                  f"[{mass['low']:.5f}, {mass['high']:.5f}] 95% bootstrap")
    return 0


def _run_paths(args: argparse.Namespace) -> int:
    import jetgraph
    from jetgraph.viz import expansion_graph, render

    model, _, ids = _load(args)
    prog = jetgraph.capture(model, ids)
    view = prog.at(args.granularity)
    paths = jetgraph.expand_paths(view, order=args.order, exclude=_names(args.exclude),
                                  max_length=args.max_length)
    expansion = paths.expansion()
    out = render(expansion_graph(expansion, ids, max_nodes=args.max_nodes), args.render)
    total = jetgraph.count_paths(prog, args.granularity, args.order)
    print(f"{prog.model_class}: {total:,} paths at {args.granularity} granularity (order {args.order}); "
          f"{len(expansion)} selected (exclude {args.exclude or 'nothing'}, max length {args.max_length})")
    print(f"wrote {out}")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from jetgraph.demo import run_demo

    return run_demo(args.model, args.text, args.out, chunk=args.chunk)


if __name__ == "__main__":
    sys.exit(main())
