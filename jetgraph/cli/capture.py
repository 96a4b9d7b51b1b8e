"""``jetgraph capture``: capture a model, print its residual IR and check it against the model.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from jetgraph.cli.options import (
    CAPTURE_TOKENS,
    DEFAULT_TEXT,
    capture_program,
    check_text,
    granularity_argument,
    load,
    model_argument,
    shown,
)
from jetgraph.files import check_writable


def add_parser(command) -> None:
    """Register the command with the CLI's ``command(name, help, description)``."""
    capture = command("capture", "capture a model, print its residual IR and check it against the model")
    model_argument(capture, tokenizer=False)
    capture.add_argument("--text", default=DEFAULT_TEXT, help="example input text")
    granularity_argument(capture)
    capture.add_argument("--out", type=Path, help="also write the summary to this file")
    capture.set_defaults(run=run, check=check)


def check(args: argparse.Namespace) -> None:
    check_text(args.text, "--text")
    if args.out is not None:
        check_writable(args.out, "--out")


def run(args: argparse.Namespace) -> int:
    from jetgraph.files import atomic_write

    start = time.perf_counter()
    model, _, ids = load(args)
    loaded = time.perf_counter()
    prog = capture_program(model, ids, args.granularity)
    captured = time.perf_counter()
    errors = _logit_errors(model, prog, ids)
    lines = [
        prog.summary_table(),
        "",
        f"input: {shown(args.text)} ({ids.shape[1]} tokens; exported on the first "
        f"{min(CAPTURE_TOKENS, ids.shape[1])}, checked on all)",
        *(f"max |logits(program) - logits(model, {name} attention)| = {value:.3g}"
          for name, value in errors.items()),
        *([] if errors else ["read lazily: the logits were checked at capture against the model's own "
                             "forward, streaming every block once (on the exported example)"]),
        f"load {loaded - start:.1f} s, capture + lift {captured - loaded:.1f} s",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        atomic_write(args.out, text + "\n")
    return 0


def _logit_errors(model, prog, ids) -> dict[str, float]:
    """Max abs logit error against the model as loaded and with eager (math) attention (none for
    a model read lazily: its whole forward would read every weight)."""
    import torch

    from jetgraph.capture import lazy_weights

    errors: dict[str, float] = {}
    if lazy_weights(model) is not None:
        return errors
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
