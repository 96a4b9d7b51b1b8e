"""The ``jetgraph`` command line: ``capture`` a model and ``demo`` (the README's main job).

Exit codes: 0 success, 1 a jetgraph error (bad model, capture failure), 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_TEXT = "The capital of France is"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    from jetgraph.errors import JetgraphError

    try:
        return args.run(args)
    except JetgraphError as exc:
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


def _run_demo(args: argparse.Namespace) -> int:
    return _run_capture(args)


if __name__ == "__main__":
    sys.exit(main())
