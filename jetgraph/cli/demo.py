"""``jetgraph demo``: the README's main job, end to end on SmolLM2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jetgraph.cli.options import (
    DEFAULT_TEXT,
    check_text,
    positive,
)
from jetgraph.files import check_writable


def add_parser(command) -> None:
    """Register the command with the CLI's ``command(name, help, description)``."""
    demo = command("demo", "end to end on SmolLM2: capture, lens, bigrams, path graph, emitted code",
                   "The README's main job: writes PNG/SVG/CSV/.py into --out and prints a summary.")
    demo.add_argument("--model", default="smollm2", help="model to run the demo on")
    demo.add_argument("--text", default=DEFAULT_TEXT, help="input text of the lens and the emitted code")
    demo.add_argument("--out", type=Path, default=Path("jetgraph-demo"), help="output folder")
    demo.add_argument("--chunk", type=positive, default=1024, help="vocabulary rows per batched call")
    demo.set_defaults(run=run, check=check)


def check(args: argparse.Namespace) -> None:
    check_text(args.text, "--text")
    check_writable(args.out / "summary.txt", "--out folder")


def run(args: argparse.Namespace) -> int:
    from jetgraph.demo import run_demo

    return run_demo(args.model, args.text, args.out, chunk=args.chunk)
