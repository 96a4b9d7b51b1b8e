"""What the commands share: argument types and groups, checks of files before any work, readers
of ``--text``/``--prompts``/``--contexts``, and loading and capturing the model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jetgraph.cli.exits import UsageError
from jetgraph.files import check_writable
from jetgraph.ir import DEFAULT_GRANULARITY

DEFAULT_TEXT = "The capital of France is"
DEFAULT_MAX_TIME = 3600.0
SHRINK_SELECTION = "select fewer paths (--include, --exclude, --max-length) or a shorter --text"
DTYPES = ("float32", "bfloat16", "float16")
CAPTURE_TOKENS = 16  # the example a program is exported on (dynamic in length; export time grows with it)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help that shows every option's default and keeps the descriptions' line breaks; an option
    without a default (None) says in its own help what happens when it is left out."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


# ------------------------------------------------------------------ argument types
def order_type(text: str) -> int:
    from jetgraph.taylor import check_order

    try:
        return check_order(int(text), "--order")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc) if text.lstrip("-").isdigit() else
                                         f"expected an integer, got {text!r}") from None


def int_at_least(minimum: int, what: str):
    """An argparse type: an int >= ``minimum``, else an error naming ``what`` was expected."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


positive = int_at_least(1, "a positive integer")
non_negative = int_at_least(0, "an integer >= 0")


def id_range(text: str) -> range:
    """An argparse type: START:END with 0 <= START < END, token ids START..END-1."""
    start, sep, end = text.partition(":")
    try:
        if not sep:
            raise ValueError
        ids = range(int(start), int(end))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END (token ids START..END-1), "
                                         f"got {text!r}") from None
    if ids.start < 0 or len(ids) == 0:
        raise argparse.ArgumentTypeError(f"expected 0 <= START < END, got {text!r}")
    return ids


def prefix_type(text: str) -> tuple[int, ...]:
    """An argparse type: "none" or comma-separated token ids put before every context."""
    if text.strip().lower() == "none":
        return ()
    try:
        ids = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected "none" or comma-separated token ids, '
                                         f'got {text!r}') from None
    if any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"token ids are >= 0, got {text!r}")
    return ids


def seconds_type(text: str) -> float | None:
    if text.lower() in ("none", "inf", "unlimited"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds or 'none', got {text!r}") from None
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds or 'none', got {text}")
    return None if value == float("inf") else value


def memory_size(text: str) -> float:
    """A memory size: bytes, or a number with kB, MB, GB or TB (powers of 1000)."""
    units = {"tb": 1e12, "gb": 1e9, "mb": 1e6, "kb": 1e3, "b": 1.0, "": 1.0}
    lowered = text.strip().lower()
    number = lowered.rstrip("kmgtb ")
    try:
        value = float(number) * units[lowered[len(number):].strip()]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"expected a memory size such as 8GB or 500MB, got {text!r}"
                                         ) from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive memory size, got {text!r}")
    return value


# ------------------------------------------------------------------ argument groups
def model_argument(parser: argparse.ArgumentParser, tokenizer: bool = True) -> None:
    parser.add_argument("model", help='"smollm2", a local Hugging Face folder, a .gguf file (or a folder '
                        'holding one; dequantised once and cached), or a cached hub id')
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="load the weights in this dtype (kept in it: capture, jets and tables run "
                             "in it; see docs/precision.md)")
    parser.add_argument("--lazy", action="store_true",
                        help="read the weights from the folder's safetensors only while a computation "
                             "needs them (models larger than memory; docs/large-models.md)")
    if tokenizer:
        parser.add_argument("--tokenizer", help="a tokenizer folder or tokenizer.json (default: the model's)")


def granularity_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--granularity", choices=("block", "sublayer"), default=DEFAULT_GRANULARITY,
                        help="residual units: whole blocks, or attention and MLP sublayers")


def path_filters(parser: argparse.ArgumentParser, exclude: str | None, max_length: int) -> None:
    parser.add_argument("--order", type=order_type, default=0, help="Taylor order of every unit's jet")
    parser.add_argument("--paths", nargs="+", default=None,
                        help='explicit paths in the path language, e.g. "E→U" "E→mlp0^1→U" (then '
                             "--include, --exclude and --max-length are not used)")
    parser.add_argument("--include", default=None, help="comma list of unit kinds or names to keep")
    parser.add_argument("--exclude", default=exclude,
                        help='comma list of unit kinds or names to drop ("attn": the attention-free paths)')
    parser.add_argument("--max-length", type=non_negative, default=max_length, help="units per path at most")
    parser.add_argument("--weights", choices=("unit", "uniform"), default="unit",
                        help="unit: each path term is the path's own value (a bigram path's logits, as "
                             "in ngrams); uniform: Algorithm 2's 1/N per unit")


def cost_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help="print the cost plan (items, FLOPs, memory, time) and stop")
    parser.add_argument("--max-time", type=seconds_type, default=DEFAULT_MAX_TIME,
                        help="refuse work estimated to take longer (seconds; 'none' for no limit)")


class RenamedFlag(argparse.Action):
    """An option whose 0.7 spelling (its second option string) still works for one release: that
    spelling prints a deprecation note on stderr."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if option_string is not None and option_string != self.option_strings[0]:
            print(f"jetgraph: {option_string} is deprecated and goes in 0.9: use {self.option_strings[0]}",
                  file=sys.stderr)
        setattr(namespace, self.dest, values)


def first_tokens_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--first-tokens M`` (0.7: ``--average``): how many tokens the model expects first a
    read-out of its stream mixes over."""
    parser.add_argument("--first-tokens", "--average", type=non_negative, default=None, metavar="M",
                        action=RenamedFlag, dest="first_tokens",
                        help=f"{what} the M first tokens the model expects most, after the prefix "
                             "(default: 0 when the tokenizer adds a BOS, else 16)")


def sources_argument(group, what: str) -> None:
    """``--sources N`` (0.7: ``--first``): the N tokens the model predicts most as rows."""
    group.add_argument("--sources", "--first", type=positive, default=None, metavar="N", action=RenamedFlag,
                       dest="sources",
                       help="only the N tokens the model itself predicts most (data-free, without the "
                            f"tokenizer's special, unused and byte tokens) as {what} (default: every token)")


def prefix_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefix", type=prefix_type, default=None, metavar="IDS",
                        help='tokens put before every context of a read-out of the model\'s stream: '
                             'comma-separated ids, or "none" (default: what the tokenizer adds before a '
                             'text, e.g. its BOS; docs/readouts.md)')


# ------------------------------------------------------------------ checks and readers
def check_text(text: str, option: str) -> None:
    if not text or not text.strip():
        raise UsageError(f"{option} is empty: give at least one token of input text")


def check_output(path: Path, suffixes: tuple[str, ...], option: str) -> None:
    if path.suffix.lower() not in suffixes:
        raise UsageError(f"{option} must end in {' or '.join(suffixes)}, got {str(path)!r}")
    check_writable(path, option)


def read_text_option(path: Path | None) -> str | None:
    """The UTF-8 text of a --text FILE (None when not given); a usage error if unreadable or empty."""
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--text {str(path)!r}: cannot read it as UTF-8 text ({exc})") from None
    check_text(text, "--text")
    return text


def read_prompts(path: Path) -> list[str]:
    """The non-empty lines of a prompts file."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise UsageError(f"--prompts {str(path)!r} does not exist") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise UsageError(f"--prompts {str(path)!r} is not a text file with one prompt per line") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise UsageError(f"--prompts {str(path)!r} holds no prompts")
    return prompts


def read_contexts(path: Path) -> list[list[int]]:
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise UsageError(f"--contexts {str(path)!r} is not a text file of token ids") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.replace(",", " ").split()
        if not all(p.isdigit() for p in parts):
            raise UsageError(f"--contexts {str(path)!r} line {number}: expected token ids, "
                             f"got {line.strip()!r}")
        rows.append([int(p) for p in parts])
    if not rows:
        raise UsageError(f"--contexts {str(path)!r} holds no contexts")
    if len({len(r) for r in rows}) != 1:
        raise UsageError(f"--contexts {str(path)!r}: every line needs the same number of token ids")
    return rows


def check_path_specs(specs: list[str] | None, dims: dict[str, int]) -> list:
    """Path specs parsed (once: the PathSpecs are what the command hands down), and their unit
    names checked against the config's layer count."""
    from jetgraph.passes.pathspec import check_unit_names, parse_path

    parsed = []
    for text in specs or ():
        parsed.append(parse_path(text))
        if "layers" in dims:
            check_unit_names(text, dims["layers"])
    return parsed


def unit_names(text: str | None) -> set[str] | None:
    return None if text is None else {part.strip() for part in text.split(",") if part.strip()}


# ------------------------------------------------------------------ loading, capture and plans
def load(args: argparse.Namespace, text: str | None = None):
    """(model, tokenizer, input ids) with the tokenizer and text checked against the model."""
    import torch

    import jetgraph
    from jetgraph.capture.loading import encode, load_tokenizer

    if getattr(args, "lazy", False):
        model = jetgraph.load_lazy(args.model, dtype=getattr(torch, args.dtype))
        tokenizer = load_tokenizer(getattr(args, "tokenizer", None) or args.model)
    else:
        model, tokenizer = jetgraph.load_model(args.model, dtype=getattr(torch, args.dtype))
    if getattr(args, "tokenizer", None):
        tokenizer = load_tokenizer(args.tokenizer)
    ids = encode(model, tokenizer, text if text is not None else args.text)
    return model, tokenizer, ids


def capture_program(model, ids, granularity: str = DEFAULT_GRANULARITY):
    """The program of ``model``, exported on the first tokens of ``ids`` only (capture time does
    not depend on the length of the user's text); callers run it on the whole text."""
    import jetgraph

    return jetgraph.capture(model, ids[:, :CAPTURE_TOKENS], granularity=granularity)


def shown(text: str, limit: int = 60) -> str:
    """A text as echoed in summaries: whole when short, else its start and its length."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}… ({len(text):,} characters)"


def stop_at_plan(args: argparse.Namespace, plans, memory_option: str) -> bool:
    """Print the plans for --dry-run (True: stop), else refuse those past --max-time."""
    from jetgraph.cost import format_plan
    from jetgraph.errors import CostError

    if args.dry_run:
        print(format_plan(plans, args.max_time))
        return True
    for plan in plans:
        plan.check(args.max_time, "--max-time SECONDS (or --max-time none)",
                   memory_option=memory_option)
    total = sum(p.seconds for p in plans)
    if args.max_time is not None and total > args.max_time:
        raise CostError(f"refusing {len(plans)} jobs estimated at {total:.3g} s together, more than "
                        f"--max-time {args.max_time:g}: run fewer at once or raise --max-time")
    return False
