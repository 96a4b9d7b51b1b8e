"""The ``jetgraph`` command line: capture, lens, ngrams, paths, emit and the end-to-end demo.

Everything a command can check is checked before the model is loaded (path specs, unit names
against the model's config, orders, keyword files, output paths); sweeps and enumerations then
print or check their cost plan before any work. Exit codes: 0 success, 1 an error (bad model,
refused plan, unwritable output), 2 bad usage, 130 interrupted. A user error is one line, never
a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from jetgraph.files import check_writable

DEFAULT_TEXT = "The capital of France is"
DEFAULT_GRANULARITY = "sublayer"  # the unit names of the path language (attn0, mlp0, …)
DEFAULT_MAX_TIME = 3600.0
SHRINK_SELECTION = "select fewer paths (--include, --exclude, --max-length) or a shorter --text"


class UsageError(Exception):
    """Arguments that cannot work together (exit code 2)."""


class _LaunchFailed(Exception):
    """Processes started by ``--nproc`` failed (exit code 1; they printed their own errors)."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help that shows every option's default and keeps the descriptions' line breaks; an option
    without a default (None) says in its own help what happens when it is left out."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and parse errors (2)
        return int(exc.code or 0)
    args.argv = argv
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    from jetgraph.errors import JetgraphError

    try:
        if hasattr(args, "check"):
            args.check(args)
        return args.run(args)
    except UsageError as exc:
        print(f"jetgraph {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if _rank() == 0:  # under torchrun, rank 0 speaks for all
            print(f"\njetgraph {args.command}: interrupted; {_resume_hint(args)}", file=sys.stderr)
        return 130
    except (JetgraphError, ValueError, IndexError, OSError, MemoryError, _LaunchFailed) as exc:
        message = str(exc) or type(exc).__name__
        if isinstance(exc, MemoryError):
            message = "out of memory: " + (str(exc) or "lower --chunk or the size of the job")
        where = f" (rank {_rank()})" if "WORLD_SIZE" in os.environ else ""
        print(f"jetgraph {args.command}{where}: error: {message}", file=sys.stderr)
        return 1


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _resume_hint(args: argparse.Namespace) -> str:
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


# ------------------------------------------------------------------------------ arguments
def _order(text: str) -> int:
    from jetgraph.taylor import check_order

    try:
        return check_order(int(text), "--order")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc) if text.lstrip("-").isdigit() else
                                         f"expected an integer, got {text!r}") from None


def _int_at_least(minimum: int, what: str):
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


_positive = _int_at_least(1, "a positive integer")
_non_negative = _int_at_least(0, "an integer >= 0")


def _id_range(text: str) -> range:
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


def _prefix(text: str) -> tuple[int, ...]:
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


def _prefix_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefix", type=_prefix, default=None, metavar="IDS",
                        help='tokens put before every context of a read-out of the model\'s stream: '
                             'comma-separated ids, or "none" (default: what the tokenizer adds before a '
                             'text, e.g. its BOS; docs/readouts.md)')


def _seconds(text: str) -> float | None:
    if text.lower() in ("none", "inf", "unlimited"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds or 'none', got {text!r}") from None
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds or 'none', got {text}")
    return None if value == float("inf") else value


def _parser() -> argparse.ArgumentParser:
    from jetgraph._version import __version__

    parser = argparse.ArgumentParser(
        prog="jetgraph", formatter_class=_Formatter,
        description="Capture residual networks and expand them into jet paths.")
    parser.add_argument("--version", action="version", version=f"jetgraph {__version__}")
    commands = parser.add_subparsers(title="commands", dest="command")

    def command(name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=description or help,
                                   formatter_class=_Formatter)

    capture = command("capture", "capture a model, print its residual IR and check it against the model")
    _model_argument(capture, tokenizer=False)
    capture.add_argument("--text", default=DEFAULT_TEXT, help="example input text")
    _granularity(capture)
    capture.add_argument("--out", type=Path, help="also write the summary to this file")
    capture.set_defaults(run=_run_capture, check=_check_capture)

    lens = command("lens", "the iterative jet lens: every layer's decoder jet, as a PNG and a CSV",
                   "Decode every stream state h_l with the order-k jet of the decoder centred there "
                   "(order 0 = logit lens) and compare with the model's logits.")
    _model_argument(lens)
    lens.add_argument("text", nargs="?", help="input text (or --prompts FILE)")
    lens.add_argument("--prompts", type=Path, metavar="FILE",
                      help="one prompt per line: the lens over all of them in padded batches, metrics "
                           "averaged over the prompts (the PNG shows mean cosine and its 95%% interval)")
    lens.add_argument("--batch-size", type=_positive, default=8,
                      help="at most this many prompts per batch with --prompts (fewer when a batch's planned "
                           "peak would pass --max-memory)")
    lens.add_argument("--order", type=_order, default=1, help="highest Taylor order; orders 0..K are drawn")
    _granularity(lens)
    lens.add_argument("--joint", action="store_true",
                      help="also fit the joint lens (weighted centres), drawn and written with the rest")
    lens.add_argument("--out", type=Path, default=Path("lens.png"), help="PNG to write")
    lens.add_argument("--csv", type=Path, help="also write every order's per-layer metrics as CSV")
    _cost_arguments(lens)

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

    lens.add_argument("--max-memory", type=memory_size, default=None, metavar="SIZE",
                      help="memory budget of the lens above the loaded model (e.g. 8GB); --prompts picks its "
                           "batch size to fit it. Default: half the memory available (--prompts), all of it "
                           "(one text). The plan (--dry-run) states the peak")
    lens.set_defaults(run=_run_lens, check=_check_lens)

    ngrams = command("ngrams", "bigram / skip-bigram tables read from the model or from its paths",
                     "Evaluate paths (unit weights: their own logits) on every vocabulary token (or token "
                     "pair for paths through attention) and keep the global top-N.\nThe default, h_last→U, "
                     "is the model's own next-token distribution after each token, read the way the "
                     "tokenizer builds text: after its BOS when it adds one, else averaged over the "
                     "--average tokens the model expects most before it: the read-out that recovers known "
                     "bigrams best (docs/readouts.md).\nThe cost is planned first: "
                     "--dry-run prints it, and a table estimated past --max-time is refused.")
    _model_argument(ngrams)
    ngrams.add_argument("--paths", nargs="+", default=["h_last→U"],
                        help='paths such as "h_last→U" (the default) "E→U" "E→MLP_last→U" "E→mlp3^1→U" '
                             '"E→attn0→U"')
    ngrams.add_argument("--average", type=_non_negative, default=None, metavar="M",
                        help="for a path from the model's stream (h_last→U): average each row's "
                             "distribution over the M first tokens the model expects most after the "
                             "prefix (default: 0 when the tokenizer adds a BOS, else 16)")
    _prefix_argument(ngrams)
    ngrams.add_argument("--top", type=_positive, default=100, help="global top-N entries")
    ngrams.add_argument("--keywords",
                        help='keyword list for probability masses: "toxic", "refusal" or a file')
    sources = ngrams.add_mutually_exclusive_group()
    sources.add_argument("--first", type=_positive, default=None, metavar="N",
                         help="only the N tokens the model itself predicts most (data-free, without the "
                              "tokenizer's special, unused and byte tokens) as the (first) context token "
                              "(default: every token)")
    sources.add_argument("--id-range", type=_id_range, default=None, metavar="START:END",
                         help="only token ids START..END-1 as the (first) context token")
    sources.add_argument("--contexts", type=Path, default=None,
                         help="a file of contexts, one per line as token ids (two ids for paths through "
                              "attention)")
    ngrams.add_argument("--rank", choices=("prob", "logit"), default="prob",
                        help="order the top-N by conditional probability or by raw logit")
    ngrams.add_argument("--last-top", type=_non_negative, default=0, metavar="M",
                        help="also keep, for each last context token, its best M entries, written to "
                             "OUT-by-last.csv (the per-z2 summary of a pair table)")
    ngrams.add_argument("--chunk", type=_positive, default=1024, help="contexts per batched call")
    ngrams.add_argument("--resume", type=Path, metavar="FOLDER",
                        help="folder for checkpoints, made if missing (an interrupted run continues, "
                                                    "with any number of processes)")
    ngrams.add_argument("--nproc", type=_positive, default=None, metavar="N",
                        help="split each table over N processes on this machine (torchrun's launcher; "
                             "one per GPU on a GPU node); under torchrun the table is split over its ranks")
    ngrams.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where tables are computed; auto: this rank's GPU (LOCAL_RANK) if there is one")
    ngrams.add_argument("--out", type=Path, default=Path("ngrams.csv"),
                        help="CSV or JSON to write; one file per path (suffixed -0, -1, …) when several")
    _cost_arguments(ngrams)
    ngrams.set_defaults(run=_run_ngrams, check=_check_ngrams)

    sketch = command("sketch", "a jet n-gram language model read from the model, scored by perplexity",
                     "Read a bigram table (the default read-out: the model after each token, read after "
                     "the tokenizer's BOS or averaged over --average first tokens; each row's top "
                     "--bigram-top tokens, the rest backing off to the unigram), a trigram table "
                     "(the model on every token pair, each row's top tokens) when affordable, and a unigram "
                     "(the bigram read-out's rows averaged) from the model; interpolate them "
                     "(weights fitted on a development split) and print the perplexity on held-out text "
                     "of this sketch, the model itself, and count-based bigram and unigram LMs trained on "
                     "the same text.\nWithout --text the text is sampled from the model itself.")
    _model_argument(sketch)
    sketch.add_argument("--text", type=Path, metavar="FILE",
                        help="UTF-8 text, split in order 80/10/10: count LMs, interpolation weights, "
                             "perplexities (default: --samples texts sampled from the model)")
    sketch.add_argument("--samples", type=_positive, default=1024,
                        help="texts to sample from the model when no --text is given (split 80/10/10)")
    sketch.add_argument("--length", type=_positive, default=None,
                        help="tokens per sampled text, and per scored window of --text (default: 256, or "
                             "the model's context if shorter)")
    sketch.add_argument("--average", type=_non_negative, default=None, metavar="M",
                        help="first tokens the bigram read-out is averaged over, after the prefix "
                             "(default: 0 when the tokenizer adds a BOS, else 16)")
    _prefix_argument(sketch)
    sketch.add_argument("--trigram", choices=("auto", "on", "off"), default="auto",
                        help="read the trigram table: auto when it fits --max-time and 2 GB, on (refuse "
                             "otherwise), off")
    sketch.add_argument("--trigram-top", type=_positive, default=16, metavar="K",
                        help="tokens kept per trigram row (the rest of the row backs off to the bigram)")
    sketch.add_argument("--bigram-top", type=_positive, default=128, metavar="K",
                        help="tokens kept per bigram row, with their exact probabilities; the rest of "
                             "the row backs off to the unigram (memory O(V·K); K ≥ V: the dense table)")
    sketch.add_argument("--seed", type=_non_negative, default=0, help="seed of the sampling")
    sketch.add_argument("--out", type=Path, default=Path("sketch"),
                        help="folder for sketch.safetensors (the tables), sketch.json and perplexities.csv")
    _cost_arguments(sketch)
    sketch.set_defaults(run=_run_sketch, check=_check_sketch)

    paths = command("paths", "count the paths of a model and draw an expansion's path graph")
    _model_argument(paths)
    paths.add_argument("--text", default=DEFAULT_TEXT, help="input on which the drawn terms' norms are taken")
    _granularity(paths)
    _path_filters(paths, exclude="attn", max_length=2)
    paths.add_argument("--max-nodes", type=_positive, default=60, help="largest graph drawn in full")
    paths.add_argument("--limit", type=_positive, default=5000,
                       help="refuse selections of more paths than this")
    paths.add_argument("--render", type=Path, default=Path("paths.svg"), help="SVG, PNG or DOT to write")
    _cost_arguments(paths)
    paths.set_defaults(run=_run_paths, check=_check_paths)

    emit = command("emit", "emit an expansion of a model as a standalone Python module (+ .safetensors)",
                   "Expand MODEL (its paths, or its iterative lens) and write the expansion as a "
                   "standalone module that imports only torch and safetensors.")
    _model_argument(emit)
    emit.add_argument("-o", "--out", type=Path, required=True, help="the .py file to write (+ .safetensors)")
    emit.add_argument("--text", default=DEFAULT_TEXT,
                      help="example input the code is traced on (the code runs on any batch and length)")
    emit.add_argument("--expansion", choices=("paths", "lens"), default="paths",
                      help="paths: Algorithm 2 with filters; lens: the decoder's jet at every h_l")
    _granularity(emit)
    _path_filters(emit, exclude=None, max_length=1)
    emit.add_argument("--no-remainder", action="store_true",
                      help="leave out the model's own forward (target, remainder) and its weights")
    emit.add_argument("--limit", type=_positive, default=5000,
                      help="refuse expansions with more terms than this")
    _cost_arguments(emit)
    emit.set_defaults(run=_run_emit, check=_check_emit)

    from jetgraph.cli_analyses import add_commands

    add_commands(command)

    demo = command("demo", "end to end on SmolLM2: capture, lens, bigrams, path graph, emitted code",
                   "The README's main job: writes PNG/SVG/CSV/.py into --out and prints a summary.")
    demo.add_argument("--model", default="smollm2", help="model to run the demo on")
    demo.add_argument("--text", default=DEFAULT_TEXT, help="input text of the lens and the emitted code")
    demo.add_argument("--out", type=Path, default=Path("jetgraph-demo"), help="output folder")
    demo.add_argument("--chunk", type=_positive, default=1024, help="vocabulary rows per batched call")
    demo.set_defaults(run=_run_demo, check=_check_demo)
    return parser


DTYPES = ("float32", "bfloat16", "float16")


def _model_argument(parser: argparse.ArgumentParser, tokenizer: bool = True) -> None:
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


def _granularity(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--granularity", choices=("block", "sublayer"), default=DEFAULT_GRANULARITY,
                        help="residual units: whole blocks, or attention and MLP sublayers")


def _path_filters(parser: argparse.ArgumentParser, exclude: str | None, max_length: int) -> None:
    parser.add_argument("--order", type=_order, default=0, help="Taylor order of every unit's jet")
    parser.add_argument("--paths", nargs="+", default=None,
                        help='explicit paths in the path language, e.g. "E→U" "E→mlp0^1→U" (then '
                             "--include, --exclude and --max-length are not used)")
    parser.add_argument("--include", default=None, help="comma list of unit kinds or names to keep")
    parser.add_argument("--exclude", default=exclude,
                        help='comma list of unit kinds or names to drop ("attn": the attention-free paths)')
    parser.add_argument("--max-length", type=_non_negative, default=max_length, help="units per path at most")
    parser.add_argument("--weights", choices=("unit", "uniform"), default="unit",
                        help="unit: each path term is the path's own value (a bigram path's logits, as "
                             "in ngrams); uniform: Algorithm 2's 1/N per unit")


def _cost_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help="print the cost plan (items, FLOPs, memory, time) and stop")
    parser.add_argument("--max-time", type=_seconds, default=DEFAULT_MAX_TIME,
                        help="refuse work estimated to take longer (seconds; 'none' for no limit)")


# ----------------------------------------------------------------------- checks before work
def _check_text(text: str, option: str) -> None:
    if not text or not text.strip():
        raise UsageError(f"{option} is empty: give at least one token of input text")


def _check_output(path: Path, suffixes: tuple[str, ...], option: str) -> None:
    if path.suffix.lower() not in suffixes:
        raise UsageError(f"{option} must end in {' or '.join(suffixes)}, got {str(path)!r}")
    check_writable(path, option)


def _check_capture(args: argparse.Namespace) -> None:
    _check_text(args.text, "--text")
    if args.out is not None:
        check_writable(args.out, "--out")


def _check_lens(args: argparse.Namespace) -> None:
    if (args.text is None) == (args.prompts is None):
        raise UsageError("give either a text or --prompts FILE (one prompt per line), not both or neither")
    if args.prompts is not None:
        if args.joint:
            raise UsageError("--joint fits weights on one input; it does not combine with --prompts")
        args.prompt_texts = _read_prompts(args.prompts)
    else:
        _check_text(args.text, "the text")
    _check_output(args.out, (".png",), "--out")
    if args.csv is not None:
        _check_output(args.csv, (".csv",), "--csv")


def _check_ngrams(args: argparse.Namespace) -> None:
    from jetgraph.applications.ngrams import load_keywords
    from jetgraph.passes.pathspec import starts_at_model_state

    dims = _config_dims(args.model)
    _check_path_specs(args.paths, dims)
    if args.average is not None and not any(starts_at_model_state(spec) for spec in args.paths):
        raise UsageError("--average applies to paths from the model's stream (h_last→U, hN→U); "
                         f"these read exactly their own tokens: {' '.join(args.paths)}")
    stream_paths = any(starts_at_model_state(spec) for spec in args.paths)
    if args.prefix is not None and args.first is None and not stream_paths:
        raise UsageError("--prefix applies to read-outs of the model's stream (h_last→U, hN→U) and to "
                         f"--first N; these paths read exactly their own tokens: {' '.join(args.paths)}")
    args.keyword_words = load_keywords(args.keywords) if args.keywords else None
    if args.id_range is not None and "vocab" in dims and args.id_range.stop > dims["vocab"]:
        raise UsageError(f"--id-range {args.id_range.start}:{args.id_range.stop} reaches past the "
                         f"vocabulary of {dims['vocab']:,} tokens")
    if args.contexts is not None:
        args.context_rows = _read_contexts(args.contexts)
    for out in _ngram_outputs(args):
        _check_output(out, (".csv", ".json"), "--out")
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


def read_text_option(path: Path | None) -> str | None:
    """The UTF-8 text of a --text FILE (None when not given); a usage error if unreadable or empty."""
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--text {str(path)!r}: cannot read it as UTF-8 text ({exc})") from None
    _check_text(text, "--text")
    return text


def _check_sketch(args: argparse.Namespace) -> None:
    args.text_content = read_text_option(args.text)
    if args.text_content is None and args.samples < 10:
        raise UsageError(f"--samples {args.samples} is too few to split 80/10/10: give at least 10")
    context = _config_dims(args.model).get("context")
    if args.length is None:
        args.length = min(256, context) if context is not None else 256
    if args.length < 3:
        raise UsageError(f"--length {args.length}: a scored window needs at least 3 tokens")
    if context is not None and args.length > context:
        raise UsageError(f"--length {args.length} is longer than the model's context of {context} tokens")
    check_writable(args.out / "sketch.json", "--out folder")


def _check_path_specs(specs: list[str] | None, dims: dict[str, int]) -> None:
    """Path specs parsed, and their unit names checked against the config's layer count."""
    from jetgraph.passes.pathspec import check_unit_names, parse_path

    for spec in specs or ():
        parse_path(spec)
        if "layers" in dims:
            check_unit_names(spec, dims["layers"])


def _context_tokens(spec: str) -> int | None:
    """Tokens of context a path reads, from its text (None: it passes a block, whose kind is
    known only after capture)."""
    from jetgraph.passes.pathspec import reads_context

    mixes = reads_context(spec)
    return None if mixes is None else 2 if mixes else 1


def _check_paths(args: argparse.Namespace) -> None:
    _check_path_specs(args.paths, _config_dims(args.model))
    _check_text(args.text, "--text")
    _check_output(args.render, (".svg", ".png", ".dot"), "--render")


def _check_emit(args: argparse.Namespace) -> None:
    if args.paths and args.expansion == "lens":
        raise UsageError("--paths selects paths of --expansion paths; the lens expansion takes none")
    _check_path_specs(args.paths, _config_dims(args.model))
    _check_text(args.text, "--text")
    _check_output(args.out, (".py",), "--out")
    if not args.out.stem.isidentifier():
        raise UsageError(f"--out {args.out.name!r} cannot be imported: the file name must be a Python "
                         "identifier (letters, digits, '_')")
    check_writable(args.out.with_suffix(".safetensors"), "weights file")


def _check_demo(args: argparse.Namespace) -> None:
    _check_text(args.text, "--text")
    check_writable(args.out / "summary.txt", "--out folder")


_CONFIG_KEYS = {"layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
                "vocab": ("vocab_size",), "hidden": ("hidden_size", "n_embd", "d_model"),
                "context": ("max_position_embeddings", "n_positions")}


def _config_dims(model: str) -> dict[str, int]:
    """Layers, vocabulary, width and context from the model's config.json, read without loading the model
    (what is missing is left out: the capture checks everything again)."""
    from jetgraph.capture.loading import SMOLLM2_NAMES, cache_dir

    smollm2 = model.lower() in SMOLLM2_NAMES
    folder = cache_dir() / "smollm2-135m-instruct-f32" if smollm2 else Path(model)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}  # not converted yet (smollm2's first load), or a hub id
    dims: dict[str, int] = {}
    for section in (config.get("text_config") or {}, config):
        for name, keys in _CONFIG_KEYS.items():
            for key in keys:
                if isinstance(section.get(key), int) and not isinstance(section.get(key), bool):
                    dims[name] = section[key]
    return dims


def _refuse_hopeless_tables(args: argparse.Namespace, dims: dict[str, int]) -> None:
    """Before loading: a lower bound on each table's time (its decoder matmul alone,
    rows · 2·V·d FLOPs at the GEMM rate measured here) past --max-time is refused at once."""
    import torch

    from jetgraph.cost import format_count, format_duration, format_flops, gemm_rate
    from jetgraph.errors import CostError

    if args.max_time is None or args.dry_run or "vocab" not in dims or "hidden" not in dims:
        return
    vocab, hidden = dims["vocab"], dims["hidden"]
    for spec in args.paths:
        pairs = _context_tokens(spec) == 2  # a lower bound: a block path counts as one token
        if args.contexts is not None:
            rows = len(args.context_rows)
        else:
            given = args.first or (len(args.id_range) if args.id_range is not None else None)
            rows = (min(given, vocab) if given else vocab) * (vocab if pairs else 1)
        flops = rows * 2.0 * vocab * hidden
        rate = gemm_rate(getattr(torch, args.dtype))
        seconds = flops / rate
        if seconds > args.max_time:
            raise CostError(f"refusing the n-gram table {spec} before loading the model: "
                            f"{format_count(rows)} contexts need {format_flops(flops)} for the decoder "
                            f"matmul alone, at least {format_duration(seconds)} at {rate / 1e9:.3g} "
                            f"GFLOP/s ({args.dtype}) measured here, more than --max-time "
                            f"{args.max_time:g} s; restrict the contexts (--first N, --contexts FILE) "
                            "or raise --max-time (none: no limit)")


def _check_context_rows(args: argparse.Namespace, vocab: int | None) -> None:
    """--contexts rows against every path (one id without attention, two through it) and the
    vocabulary of the model's config."""
    width = len(args.context_rows[0])
    for spec in args.paths:
        needed = _context_tokens(spec)
        if needed is not None and width != needed:  # a block path is checked after capture
            raise UsageError(f"--contexts {str(args.contexts)!r} has {width} id(s) per line, but {spec} "
                             f"reads {needed} token(s) of context")
    largest = max(max(row) for row in args.context_rows)
    if vocab is not None and largest >= vocab:
        raise UsageError(f"--contexts {str(args.contexts)!r} holds token id {largest}, outside the "
                         f"model's vocabulary of {vocab}")


def _read_prompts(path: Path) -> list[str]:
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


def _read_contexts(path: Path) -> list[list[int]]:
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


def _ngram_outputs(args: argparse.Namespace) -> list[Path]:
    if len(args.paths) == 1:
        return [args.out]
    return [args.out.with_name(f"{args.out.stem}-{i}{args.out.suffix}") for i in range(len(args.paths))]


# ------------------------------------------------------------------------------ commands
def _load(args: argparse.Namespace, text: str | None = None):
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


def _run_capture(args: argparse.Namespace) -> int:
    from jetgraph.files import atomic_write

    start = time.perf_counter()
    model, _, ids = _load(args)
    loaded = time.perf_counter()
    prog = _capture(model, ids, args.granularity)
    captured = time.perf_counter()
    errors = _logit_errors(model, prog, ids)
    lines = [
        prog.summary_table(),
        "",
        f"input: {_shown(args.text)} ({ids.shape[1]} tokens; exported on the first "
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


CAPTURE_TOKENS = 16  # the example a program is exported on (dynamic in length; export time grows with it)


def _capture(model, ids, granularity: str = "block"):
    """The program of ``model``, exported on the first tokens of ``ids`` only (capture time does
    not depend on the length of the user's text); callers run it on the whole text."""
    import jetgraph

    return jetgraph.capture(model, ids[:, :CAPTURE_TOKENS], granularity=granularity)


def _shown(text: str, limit: int = 60) -> str:
    """A text as echoed in summaries: whole when short, else its start and its length."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}… ({len(text):,} characters)"


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


def _selected_paths(args: argparse.Namespace, prog):
    """The filtered paths of ``prog`` at the chosen granularity, refused past ``--limit``."""
    import jetgraph
    from jetgraph.errors import CostError

    view = prog.at(args.granularity)
    try:
        if args.paths:
            paths = jetgraph.expand_paths(view, order=args.order, paths=args.paths, weights=args.weights)
        else:
            paths = jetgraph.expand_paths(view, order=args.order, include=_names(args.include),
                                          exclude=_names(args.exclude), max_length=args.max_length,
                                          weights=args.weights)
    except ValueError as exc:
        other = "block" if args.granularity == "sublayer" else "sublayer"
        raise ValueError(f"{exc} (at --granularity {args.granularity}; {other} names units differently)"
                         ) from None
    count = paths.count()
    if count > args.limit:
        raise CostError(f"{count:,} paths pass the filters, more than --limit {args.limit}: lower "
                        "--max-length, --exclude unit kinds, --include fewer units, or raise --limit")
    return view, paths, count


def _run_emit(args: argparse.Namespace) -> int:
    import jetgraph
    from jetgraph.cost import check_plan, emit_plan, format_plan

    start = time.perf_counter()
    model, _, ids = _load(args)
    prog = _capture(model, ids)
    if args.expansion == "lens":
        view = prog.at(args.granularity)
        count = (len(view.units) + 1) * (args.order + 1)
    else:
        view, paths, count = _selected_paths(args, prog)
    what = f"emitted code for {count:,} terms"
    phases = emit_plan(view, count, ids, args.order, what, remainder=not args.no_remainder)
    if args.dry_run:
        print(format_plan(phases, args.max_time))
        return 0
    check_plan(phases, args.max_time, "--max-time SECONDS (or --max-time none)",
               memory_option=SHRINK_SELECTION, what=what)
    if args.expansion == "lens":
        states = [jetgraph.stream_term(view, i) for i in range(len(view.units) + 1)]
        expansion = jetgraph.expand(view, "decoder", states, order=args.order, weights="unit")
    else:
        expansion = paths.expansion(max_terms=None)
    path = jetgraph.emit_source(expansion, args.out, ids, remainder=not args.no_remainder,
                                max_seconds=None)  # planned and checked above
    weights = path.with_suffix(".safetensors")
    shapes = ("any [batch, seq]" + (f" up to {prog.max_positions} positions" if prog.max_positions else "")
              if prog.dynamic else f"input_ids of shape {tuple(ids.shape)} (the export fixed it)")
    print(f"{expansion!r} of {prog.model_class}: {len(expansion)} terms ({args.weights} weights) for "
          f"{shapes}, with an optional attention mask")
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB) and {weights} "
          f"({weights.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s")
    return 0


def _stop_at_plan(args: argparse.Namespace, plans, memory_option: str) -> bool:
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


def _names(text: str | None) -> set[str] | None:
    return None if text is None else {part.strip() for part in text.split(",") if part.strip()}


def _run_lens(args: argparse.Namespace) -> int:
    import warnings

    from jetgraph.applications import iterative_lenses, joint_lens, write_lens_csv
    from jetgraph.applications.lens import LensSeriesDivergenceWarning, LensSizes, lens_plan
    from jetgraph.applications.plots import plot_lens
    from jetgraph.cost import format_plan

    if args.prompts is not None:
        return _run_lens_over_prompts(args)
    model, tokenizer, ids = _load(args)
    prog = _capture(model, ids, args.granularity)
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
    print(_lens_table(results))
    if args.csv is not None:
        write_lens_csv(results, args.csv)
    print(f"wrote {args.out}" + (f" and {args.csv}" if args.csv else ""))
    return 0


def _lens_plan_before_loading(args: argparse.Namespace):
    """The plan of ``lens --prompts`` from the model's config.json and its tokenizer alone (None
    when either is not at hand: a GGUF file, a hub id): --dry-run and --max-time need no model."""
    import torch

    from jetgraph.applications.lens import LensSizes, lens_batch_size, lens_plan
    from jetgraph.capture.loading import load_tokenizer

    dims = _config_dims(args.model)
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
    model, tokenizer, ids = _load(args, text=args.prompt_texts[0])
    prog = _capture(model, ids, args.granularity)
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
    print(_lens_table(averages))
    if args.csv is not None:
        write_lens_csv(averages, args.csv)
    print(f"wrote {args.out}" + (f" and {args.csv}" if args.csv else ""))
    return 0


def _lens_table(results) -> str:
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


def _run_ngrams(args: argparse.Namespace) -> int:
    if args.nproc is not None and not args.dry_run:  # a dry run plans here, for N ranks
        return _launch_ranks(args)
    import torch

    from jetgraph.applications import keyword_ids, ngram_table
    from jetgraph.applications.ngrams import common_tokens, current_shard, input_convention, ngram_plan
    from jetgraph.applications.ngrams.readout import (
        describe_prefixes,
        placeholder_prefixes,
        prediction_plan,
        readout_prefixes,
    )
    from jetgraph.errors import CostError
    from jetgraph.passes.pathspec import starts_at_model_state

    shard = current_shard()  # under torchrun: this rank's place; else None
    main_rank = shard is None or shard.is_main
    model, tokenizer, ids = _load(args, text="a")
    prog = _capture(model, ids)
    device = _device(args.device, shard)
    if device.type != "cpu":
        prog.to(device)
    keywords = keyword_ids(tokenizer, args.keyword_words) if args.keyword_words else None
    contexts = torch.tensor(args.context_rows) if args.contexts is not None else None
    vocab = int(prog.decoder.unembedding.shape[0])
    mixing = any(starts_at_model_state(spec) for spec in args.paths)
    convention = None
    if mixing or args.first is not None:
        convention = input_convention(args.prefix, tokenizer, vocab)
    options = dict(top=args.top, keywords=keywords, normalise=True, rank=args.rank, chunk=args.chunk,
                   last_top=args.last_top)
    prefixes = placeholder_prefixes(vocab, convention, args.average) if mixing else None  # plan first

    def rows_of(spec: str, first) -> dict:
        """Contexts of one path; a path from the model's stream is read after the prefixes."""
        return dict(contexts=contexts, first=first, average=prefixes if starts_at_model_state(spec) else None)

    placeholder_first = None if args.first is None else range(min(args.first, vocab))
    first = args.id_range if args.id_range is not None else placeholder_first
    ranks = shard.world if shard else (args.nproc or 1)
    plans = [ngram_plan(prog, spec, ranks=ranks, **rows_of(spec, first), **options) for spec in args.paths]
    model_pass = convention is not None and (args.first is not None or (
        prefixes is not None and not convention.prefix and len(prefixes[0]) > 1))
    if model_pass:  # the model's mean prediction: the expected first tokens, the sources of --first
        plans.insert(0, prediction_plan(prog, convention, args.chunk))
    printing = main_rank
    if args.dry_run and not main_rank:  # rank 0 prints the plan
        return 0
    try:
        if _stop_at_plan(args, plans, "lower --chunk, or fewer --keywords"):
            return 0
    except CostError as exc:
        if prefixes is None or len(prefixes[0]) == 1:
            raise
        raise CostError(f"{exc} (the default read-out runs the model {len(prefixes[0])} times per row: "
                        "--average M with a smaller M, or --first N, shrinks it)") from None
    if args.first is not None:
        first = common_tokens(prog, args.first, convention, tokenizer, args.chunk)
    if mixing:
        prefixes = readout_prefixes(prog, convention, args.average, args.chunk)
        if printing:
            print(f"input convention: {convention.describe(tokenizer)}; "
                  f"{describe_prefixes(prefixes, tokenizer)}")
    outputs = _ngram_outputs(args)
    for index, (spec, out) in enumerate(zip(args.paths, outputs, strict=True)):
        resume = args.resume / f"ngrams-{index}.pt" if args.resume else None
        table = ngram_table(prog, spec, resume=resume, max_seconds=None, shard=shard,
                            progress=printing, **rows_of(spec, first), **options)
        if not printing:
            continue
        table.export(out, tokenizer)
        args.written = [*getattr(args, "written", []), out]
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


class _PlanShown(Exception):
    """Raised after a dry run's plan is printed: stop before any table is read."""


def _run_sketch(args: argparse.Namespace) -> int:
    from jetgraph.applications.sketch import sketch_model
    from jetgraph.cost import check_plan, format_plan

    model, tokenizer, ids = _load(args, text="a")
    prog = _capture(model, ids)

    def show(plan) -> None:  # plan_sketch has refused what is past --max-time or memory already
        phases = plan.phases()
        print(format_plan(phases, args.max_time) + ("\n" + plan.skipped() if plan.skipped() else ""))
        if args.dry_run:
            raise _PlanShown
        check_plan(phases, args.max_time, "--max-time SECONDS (or --max-time none)", what="the sketch",
                   memory_option=f"lower --bigram-top from {plan.bigram_top}, or --trigram off")

    try:
        report = sketch_model(model, tokenizer, prog, text=args.text_content, samples=args.samples,
                              length=args.length, first_tokens=args.average,
                              trigram=args.trigram, top=args.trigram_top, max_seconds=args.max_time,
                              seed=args.seed, out=args.out, on_plan=show, bigram_top=args.bigram_top,
                              convention=args.prefix)
    except _PlanShown:
        return 0
    args.written = report.files
    data = report.data
    print(f"text: {data['source']}; {data['train_tokens']:,} training, {data['dev_tokens']:,} development "
          f"and {data['test_tokens']:,} test tokens")
    l3, l2, l1 = report.lm.weights
    print(f"interpolation (fitted on the development split): trigram {l3:.2f}, bigram {l2:.2f}, "
          f"unigram {l1:.2f}")
    print("perplexity on the test split:")
    for name, value in report.perplexities.items():
        print(f"  {name:42s} {value:10.2f}")
    print(f"wrote {', '.join(str(p) for p in report.files)}")
    return 0


def _device(choice: str, shard):
    import torch

    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if shard is not None:
        return shard.device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def _launch_ranks(args: argparse.Namespace) -> int:
    """``--nproc N``: the same command in N processes started by torchrun's launcher (one
    machine, a free port); each rank prints its own errors, so a failure here is one line."""
    import uuid

    os.environ.setdefault("LOGLEVEL", "ERROR")  # the launcher's own log: failures are reported below
    threads = max(1, (os.cpu_count() or 1) // args.nproc)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # as torchrun does: no oversubscribed cores
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.ERROR)
    argv, skip = [], False
    for item in args.argv:
        if skip:
            skip = False
            continue
        if item == "--nproc":
            skip = True
            continue
        if not item.startswith("--nproc="):
            argv.append(item)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=args.nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.2)
    try:
        elastic_launch(config, sys.executable)("-m", "jetgraph", *argv)
    except SignalException:  # Ctrl-C reached the launcher too; rank 0 printed the resume hint
        return 130
    except ChildFailedError as exc:
        codes = {failure.local_rank: failure.exitcode for failure in exc.failures.values()}
        if 130 in codes.values() or -2 in codes.values():
            return 130
        failed = sorted(rank for rank, code in codes.items() if code != -15)  # -15: stopped by the launcher
        raise _LaunchFailed(f"process(es) {', '.join(map(str, failed))} of {args.nproc} failed "
                            "(their errors are above); the others were stopped") from None
    return 0


def _run_paths(args: argparse.Namespace) -> int:
    import jetgraph
    from jetgraph.cost import check_plan, expansion_plan, format_plan
    from jetgraph.viz import expansion_graph, render

    model, _, ids = _load(args)
    prog = _capture(model, ids)
    view, paths, count = _selected_paths(args, prog)
    phases = [expansion_plan(view, count, ids, args.order, f"a path picture of {count:,} paths")]
    if args.dry_run:
        print(format_plan(phases, args.max_time))
        return 0
    check_plan(phases, args.max_time, "--max-time SECONDS (or --max-time none)",
               memory_option=SHRINK_SELECTION)
    expansion = paths.expansion(max_terms=None)
    out = render(expansion_graph(expansion, ids, max_nodes=args.max_nodes), args.render)
    total = jetgraph.count_paths(prog, args.granularity, args.order)
    how = ("given as --paths" if args.paths else
           f"exclude {args.exclude or 'nothing'}, max length {args.max_length}")
    print(f"{prog.model_class}: {total:,} paths at {args.granularity} granularity (order {args.order}); "
          f"{len(expansion)} selected ({how}, {args.weights} weights)")
    print(f"wrote {out}")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from jetgraph.demo import run_demo

    return run_demo(args.model, args.text, args.out, chunk=args.chunk)


if __name__ == "__main__":
    sys.exit(main())
