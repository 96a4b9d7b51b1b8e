"""The ``jetgraph`` command line: one module per command (or group of commands), sharing
argument types, readers and loading from :mod:`.options` and exit codes from :mod:`.exits`.

Everything a command can check is checked before the model is loaded (path specs, unit names
against the model's config, orders, keyword files, output paths); sweeps and enumerations then
print or check their cost plan before any work. Exit codes: 0 success, 1 an error (bad model,
refused plan, unwritable output), 2 bad usage, 130 interrupted. A user error is one line, never
a traceback; a bug in jetgraph (any other exception) keeps its traceback.

Each command module has ``add_parser(command)`` (registering its ``check`` and ``run`` as the
subparser's defaults), ``check(args)``, run before anything is loaded, and ``run(args)``.
"""

from __future__ import annotations

import argparse
import os
import sys

from jetgraph.cli import analyses, capture, demo, explain, lens, lens_eval, ngrams, paths, sketch, view
from jetgraph.cli.exits import ERROR, INTERRUPTED, USAGE, LaunchFailed, UsageError, rank, resume_hint
from jetgraph.cli.options import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command, in the order ``jetgraph --help`` lists them."""
    from jetgraph._version import __version__

    parser = argparse.ArgumentParser(
        prog="jetgraph", formatter_class=HelpFormatter,
        description="Capture residual networks and expand them into jet paths.")
    parser.add_argument("--version", action="version", version=f"jetgraph {__version__}")
    commands = parser.add_subparsers(title="commands", dest="command")

    def command(name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=description or help,
                                   formatter_class=HelpFormatter)

    capture.add_parser(command)
    lens.add_parser(command)
    lens_eval.add_parser(command)
    explain.add_parser(command)
    ngrams.add_parser(command)
    sketch.add_parser(command)
    paths.add_paths_parser(command)
    paths.add_emit_parser(command)
    analyses.add_commands(command)
    view.add_parser(command)
    demo.add_parser(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and parse errors (2)
        return int(exc.code or 0)
    args.argv = argv
    if not hasattr(args, "run"):
        parser.print_help()
        return USAGE
    from jetgraph.errors import JetgraphError

    try:
        if hasattr(args, "check"):
            args.check(args)
        return args.run(args)
    except UsageError as exc:
        print(f"jetgraph {args.command}: error: {exc}", file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:
        if rank() == 0:  # under torchrun, rank 0 speaks for all
            print(f"\njetgraph {args.command}: interrupted; {resume_hint(args)}", file=sys.stderr)
        return INTERRUPTED
    except (JetgraphError, ValueError, OSError, MemoryError, LaunchFailed) as exc:
        message = str(exc) or type(exc).__name__
        if isinstance(exc, MemoryError):
            message = "out of memory: " + (str(exc) or "lower --chunk or the size of the job")
        where = f" (rank {rank()})" if "WORLD_SIZE" in os.environ else ""
        print(f"jetgraph {args.command}{where}: error: {message}", file=sys.stderr)
        return ERROR


__all__ = ["UsageError", "build_parser", "main"]
