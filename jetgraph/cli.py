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
    emit = commands.add_parser(
        "emit", help="emit an expansion of a model as a standalone Python module (+ .safetensors)",
        description="Expand MODEL (its paths, or its iterative lens) and write the expansion as a "
                    "standalone module that imports only torch and safetensors.")
    emit.add_argument("model", help='"smollm2", a local Hugging Face folder, or a cached hub id')
    emit.add_argument("-o", "--out", type=Path, required=True, help="the .py file to write")
    emit.add_argument("--text", default=DEFAULT_TEXT, help="example input: fixes the emitted shape")
    emit.add_argument("--expansion", choices=("paths", "lens"), default="paths",
                      help="paths: Algorithm 2 with filters; lens: the decoder's jet at every h_l")
    emit.add_argument("--order", type=int, default=0, help="Taylor order (default 0)")
    emit.add_argument("--granularity", choices=("block", "sublayer"), default="block")
    emit.add_argument("--include", default=None, help="comma list of unit kinds or names to keep")
    emit.add_argument("--exclude", default=None, help='comma list of unit kinds or names to drop ("attn")')
    emit.add_argument("--max-length", type=int, default=1, help="units per path at most (default 1)")
    emit.add_argument("--limit", type=int, default=5000,
                      help="refuse expansions with more terms than this (default 5000)")
    emit.set_defaults(run=_run_emit)
    demo = commands.add_parser("demo", help="the end-to-end demo on SmolLM2 (capture for now)")
    demo.add_argument("--model", default="smollm2")
    demo.add_argument("--text", default=DEFAULT_TEXT)
    demo.add_argument("--out", type=Path, help="write the summary to this file")
    demo.set_defaults(run=_run_demo, granularity="sublayer")
    return parser


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
    model, tokenizer = jetgraph.load_model(args.model)
    ids = tokenizer(args.text, return_tensors="pt", add_special_tokens=False).input_ids
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
    path = jetgraph.emit_source(expansion, args.out, ids)
    weights = path.with_suffix(".safetensors")
    print(f"{expansion!r} of {prog.model_class}: {len(expansion)} terms for input_ids of shape "
          f"{tuple(ids.shape)}")
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB) and {weights} "
          f"({weights.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s")
    return 0


def _names(text: str | None) -> set[str] | None:
    return None if text is None else {part.strip() for part in text.split(",") if part.strip()}


def _run_demo(args: argparse.Namespace) -> int:
    return _run_capture(args)


if __name__ == "__main__":
    sys.exit(main())
