"""Exit codes, and the errors the command line reports as usage errors or failed launches.

0 success, 1 an error (bad model, refused plan, unwritable output), 2 bad usage, 130
interrupted. A user error is one line, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from pathlib import Path

ERROR = 1
USAGE = 2
INTERRUPTED = 130


class UsageError(Exception):
    """Arguments that cannot work together (exit code 2)."""


class LaunchFailed(Exception):
    """Processes started by ``--nproc`` failed (exit code 1; they printed their own errors)."""


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def resume_hint(args: argparse.Namespace) -> str:
    written = getattr(args, "written", [])
    verb = "is" if len(written) == 1 else "are"
    done = f"{', '.join(map(str, written))} {verb} complete; " if written else ""
    if getattr(args, "resume", None):
        saved = sorted(Path(args.resume).glob("ngrams-*.pt")) if Path(args.resume).is_dir() else []
        if not saved:
            return f"{done}no checkpoint was written yet in {args.resume}: a rerun starts from the beginning"
        return (f"{done}rerun the same command to resume from the checkpoints in {args.resume} "
                f"({', '.join(p.name for p in saved)})")
    if args.command == "ngrams":
        return (f"{done}no other output was written; add --resume DIR to make long tables resumable"
                if written else "no output was written; add --resume DIR to make long tables resumable")
    return "no output was half-written"


def in_flags(message: str, flags: Mapping[str, str]) -> str:
    """A library message, which names Python parameters (``max_seconds``, ``trigram="off"``), with
    each name in ``flags`` replaced by the command's option (``--max-time``, ``--trigram off``)."""
    for parameter, flag in flags.items():
        message = re.sub(rf"(?<![\w-]){re.escape(parameter)}(?![\w])", flag, message)
    return message
