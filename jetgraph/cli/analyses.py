"""The paper's tables: ``roles``, ``curves``, ``diff`` and ``masses`` (component roles, training
dynamics, fine-tuning diffs, keyword masses).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jetgraph.capture.config_facts import folder_facts
from jetgraph.cli.exits import UsageError
from jetgraph.cli.options import (
    DTYPES,
    check_output,
    cost_arguments,
    first_tokens_argument,
    id_range,
    load,
    model_argument,
    non_negative,
    positive,
    prefix_argument,
    read_text_option,
    sources_argument,
)

FEW_POSITIONS = 20  # fewer target positions than this: say that the intervals will be wide
READOUT_HELP = ('read-out: "h_last→U" (the default: the model after each token, read after the tokenizer\'s '
                'BOS, or averaged over --first-tokens first tokens when it adds none) or a bigram path '
                'such as "E→U", "E→MLP_last→U"')


def add_commands(command) -> None:
    """Register the analysis commands with the CLI's ``command(name, help, description)``."""
    roles = command("roles", "which units write a set of target tokens: ranked by bigram paths, checked by "
                             "ablations on real text",
                    "Rank every MLP unit (and pairs among the best) by its bigram path's centred logit on "
                    "the "
                    "targets (data-free), then measure the target's ΔLogit on real text under zero-ablation, "
                    "mean-ablation and removal of the unit's path terms, with 95%% bootstrap intervals.\n"
                    "Writes a PNG and a CSV. Without --text the text is sampled from the model itself.")
    model_argument(roles)
    roles.add_argument("--targets", nargs="+", required=True, metavar="SPEC",
                       help='target tokens: "ing" (that piece, with or without a leading space), '
                            '"suffix:ing", '
                            '"re:PATTERN" (full match of the decoded token) or "id:123"; several are united')
    roles.add_argument("--text", type=Path, metavar="FILE",
                       help="UTF-8 text the interventions run on, cut in windows of --length tokens "
                            "(default: --samples texts sampled from the model)")
    roles.add_argument("--samples", type=positive, default=64,
                       help="texts to sample when no --text is given")
    roles.add_argument("--length", type=positive, default=128, help="tokens per window or sampled text")
    roles.add_argument("--windows", type=positive, default=256, help="at most this many windows of --text")
    roles.add_argument("--rows", type=positive, default=None,
                       help="source tokens the path scores average over: the N tokens the model predicts "
                            "most, without special, unused and byte tokens (default: every such token up "
                            "to 8192, else the 4096 it predicts most)")
    roles.add_argument("--pairs", type=non_negative, default=6,
                       help="pair the best M units (paths E→i→j→U); 0: no pairs")
    roles.add_argument("--start", choices=("embedding", "stream"), default="embedding",
                       help="where the ranked paths begin: the token embedding (E→u→U, the paper's bigram "
                            "paths) or each unit's own input state on a one-token context (h_k→u→U)")
    prefix_argument(roles)
    roles.add_argument("--attention", action="store_true",
                       help="also ablate every attention unit (zero and mean; bigram paths avoid attention, "
                            "so these are not ranked)")
    roles.add_argument("--seed", type=non_negative, default=0, help="seed of the sampling")
    roles.add_argument("--chunk", type=positive, default=1024, help="source tokens per batched call")
    roles.add_argument("--out", type=Path, default=Path("roles.png"), help="PNG to write")
    roles.add_argument("--csv", type=Path, default=Path("roles.csv"), help="CSV to write")
    roles.add_argument("--html", type=Path, help="also write the table as a sortable, searchable HTML page")
    cost_arguments(roles)
    roles.set_defaults(run=run_roles, check=check_roles)

    curves = command("curves", "how a bigram table forms over training checkpoints: hit ratio and top-k mass",
                     "For every checkpoint folder (in training order; the last is the final model): the "
                     "share of the final top-K bigram table it already has (hit ratio), the total "
                     "probability of its own top-K and the probability it gives the final top-K.")
    curves.add_argument("folders", nargs="+", type=Path, help="Hugging Face checkpoint folders, oldest first")
    _readout_arguments(curves)
    curves.add_argument("--top", type=positive, default=100, help="K, entries of the top-K table")
    curves.add_argument("--out", type=Path, default=Path("curves.png"), help="PNG to write")
    curves.add_argument("--csv", type=Path, default=Path("curves.csv"), help="CSV to write")
    curves.set_defaults(run=run_curves, check=check_curves)

    diff = command("diff", "how a bigram read-out changes from model A to model B (same vocabulary)",
                   "Read the same bigram read-out from both models over the same source tokens and rank the "
                   "entries whose probability rose and fell most (--rank prob), or by log-ratio among "
                   "entries where a model gives at least --min-prob.")
    diff.add_argument("model_a", help="the base model (as for the other commands)")
    diff.add_argument("model_b", help="the changed model, with the same vocabulary")
    diff.add_argument("--tokenizer", help="a tokenizer folder (default: model A's)")
    dtype_argument(diff)
    _readout_arguments(diff)
    diff.add_argument("--top", type=positive, default=50, help="entries per direction")
    diff.add_argument("--rank", choices=("prob", "log_ratio"), default="prob",
                      help="rank by p_B − p_A or by log p_B − log p_A")
    diff.add_argument("--min-prob", type=float, default=1e-3, help="probability floor of --rank log_ratio")
    diff.add_argument("--out", type=Path, default=Path("diff.png"), help="PNG to write")
    diff.add_argument("--csv", type=Path, default=Path("diff.csv"), help="CSV to write")
    diff.add_argument("--html", type=Path, help="also write the table as a sortable, searchable HTML page")
    diff.set_defaults(run=run_diff, check=check_diff)

    masses = command("masses", "keyword masses of models: the paper's mean mass and a calibrated lift",
                     "For every model: the mean over source tokens of the read-out's probability on the "
                     "keywords (the paper's toxic mass), and the lift: that mass divided by the mass on "
                     "control tokens matched to the keywords on the first model's unigram read-out; both "
                     "with 95%% bootstrap intervals over the source tokens.")
    masses.add_argument("models", nargs="+",
                        help="models with the same vocabulary; the first is the reference")
    masses.add_argument("--keywords", required=True,
                        help='"toxic", "refusal", a file (one word per line) or comma-separated words')
    masses.add_argument("--tokenizer", help="a tokenizer folder (default: the first model's)")
    dtype_argument(masses)
    _readout_arguments(masses)
    masses.add_argument("--controls", type=positive, default=20, help="matched control sets")
    masses.add_argument("--seed", type=non_negative, default=0,
                        help="seed of the control sets and bootstrap")
    masses.add_argument("--out", type=Path, default=Path("masses.png"), help="PNG to write")
    masses.add_argument("--csv", type=Path, default=Path("masses.csv"), help="CSV to write")
    masses.set_defaults(run=run_masses, check=check_masses)


def dtype_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="load the weights in this dtype")
    parser.set_defaults(lazy=False)


def _readout_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--path", default="h_last→U", help=READOUT_HELP)
    first_tokens_argument(parser, "mix h_last→U's rows over")
    prefix_argument(parser)
    sources = parser.add_mutually_exclusive_group()
    sources_argument(sources, "source tokens")
    sources.add_argument("--id-range", type=id_range, default=None, metavar="START:END",
                         help="only token ids START..END-1 as source tokens")
    parser.add_argument("--chunk", type=positive, default=1024, help="source tokens per batched call")


# ----------------------------------------------------------------------- checks before work
def _check_bigram_path(args: argparse.Namespace) -> None:
    from jetgraph.passes.pathspec import parse_path, reads_context

    try:
        parse_path(args.path)
    except ValueError as exc:
        raise UsageError(f"--path {args.path!r}: {exc}") from None
    if reads_context(args.path):
        raise UsageError(f"--path {args.path!r} goes through attention and reads token pairs; these analyses "
                         "read bigram rows: give h_last→U or an attention-free path")


def _check_pngs(args: argparse.Namespace) -> None:
    check_output(args.out, (".png",), "--out")
    check_output(args.csv, (".csv",), "--csv")
    if getattr(args, "html", None) is not None:
        check_output(args.html, (".html", ".htm"), "--html")


def _write_html(args: argparse.Namespace, title: str) -> None:
    """``--html``: the CSV just written as the explorer's table."""
    if getattr(args, "html", None) is None:
        return
    from jetgraph.applications.report import csv_view, write_page

    args.written.append(write_page([csv_view(args.csv, title)], args.html, title))


def check_roles(args: argparse.Namespace) -> None:
    from jetgraph.applications.targets import check_target_specs

    _check_pngs(args)
    try:
        check_target_specs(args.targets)
    except ValueError as exc:
        raise UsageError(f"--targets: {exc}") from None
    args.text_content = read_text_option(args.text)
    context = folder_facts(args.model).get("context")
    if context is not None and args.length > context:
        raise UsageError(f"--length {args.length} is longer than the model's context of {context} tokens")
    if args.length < 2:
        raise UsageError("--length must be at least 2 tokens (a token and the one after it)")


def check_curves(args: argparse.Namespace) -> None:
    _check_bigram_path(args)
    _check_pngs(args)
    if len(args.folders) < 2:
        raise UsageError("give at least two checkpoint folders, oldest first (the last is the final model)")
    for folder in args.folders:
        if not (folder / "config.json").is_file():
            raise UsageError(f"{str(folder)!r} is not a model folder (no config.json)")


def check_diff(args: argparse.Namespace) -> None:
    _check_bigram_path(args)
    _check_pngs(args)
    if not 0 < args.min_prob < 1:
        raise UsageError(f"--min-prob must lie in (0, 1), got {args.min_prob}")
    dims = [folder_facts(m).get("vocab") for m in (args.model_a, args.model_b)]
    if None not in dims and dims[0] != dims[1]:
        raise UsageError(f"the models' vocabularies differ ({dims[0]:,} vs {dims[1]:,} tokens): a diff needs "
                         "the same vocabulary")


def check_masses(args: argparse.Namespace) -> None:
    _check_bigram_path(args)
    _check_pngs(args)
    if not args.keywords.strip(" ,"):
        raise UsageError('--keywords is empty: give "toxic", "refusal", a file or comma-separated words')
    vocabs = {m: folder_facts(m).get("vocab") for m in args.models}
    known = {v for v in vocabs.values() if v is not None}
    if len(known) > 1:
        sizes = ", ".join(f"{m}: {v}" for m, v in vocabs.items())
        raise UsageError(f"the models' vocabularies differ ({sizes})")


# ----------------------------------------------------------------------- commands
def _program(model):
    import jetgraph

    return jetgraph.capture(model)


def _convention(args: argparse.Namespace, tokenizer, vocab: int):
    """The input convention of the read-outs: --prefix, else the tokenizer's."""
    from jetgraph.applications.ngrams import input_convention

    if args.prefix is None and tokenizer is None:
        raise UsageError("no tokenizer to tell what it puts before a text: give --prefix (token ids, or "
                         "none)")
    return input_convention(args.prefix, tokenizer, vocab)


def _rows(args: argparse.Namespace, prog, convention, tokenizer):
    """The source tokens: --id-range, the --sources N the model predicts most, or every token."""
    from jetgraph.applications.ngrams import common_tokens

    if getattr(args, "id_range", None) is not None:
        return list(args.id_range)
    if args.sources is None:
        return None
    return common_tokens(prog, args.sources, convention, tokenizer, args.chunk)


def _folder_tokenizer(folder: Path):
    """The tokenizer saved with a checkpoint folder, or None when it has none."""
    from jetgraph.capture.loading import load_tokenizer
    from jetgraph.errors import ModelLoadError

    try:
        return load_tokenizer(str(folder))
    except (ModelLoadError, OSError, ValueError):
        return None


def _text_windows(args: argparse.Namespace, tokenizer):
    """(ids [n, L], None, what) of --text: its tokens cut in at most --windows windows of --length."""
    import torch

    from jetgraph.applications.ngrams import InputConvention

    given = args.prefix
    prefix = list(given if given is not None else InputConvention.from_tokenizer(tokenizer).prefix)
    body = args.length - len(prefix)  # each window starts the way the tokenizer starts a text
    if body < 2:
        raise ValueError(f"--length {args.length} leaves fewer than 2 tokens after the prefix {prefix}")
    encoded = tokenizer(args.text_content, add_special_tokens=False)["input_ids"]
    ids = torch.tensor(encoded, dtype=torch.long)
    count = min(args.windows, ids.numel() // body)
    if count == 0:
        raise ValueError(f"--text has {ids.numel()} tokens: fewer than one window of --length {args.length}")
    windows = ids[:count * body].view(count, body)
    windows = torch.cat([torch.tensor(prefix, dtype=torch.long).expand(count, -1), windows], 1)
    return windows, None, f"{count} windows of --text" + (f", each after {prefix}" if prefix else "")


def _sampled_texts(args: argparse.Namespace, model, tokenizer):
    """(ids [n, L], mask, what): --samples texts sampled from the model, each from its BOS."""
    from jetgraph.applications.sketch import sample_texts

    start = [int(i) for i in tokenizer("")["input_ids"]] or [int(i) for i in tokenizer("\n")["input_ids"]]
    if not start:
        raise ValueError("the tokenizer adds no BOS and has no line break to start samples from: give --text")
    windows = sample_texts(model, args.samples, args.length, start, getattr(tokenizer, "eos_token_id", None),
                           pad=int(getattr(tokenizer, "pad_token_id", 0) or 0), seed=args.seed)
    return windows.ids, windows.mask.long(), f"{args.samples} texts sampled from the model"


def run_roles(args: argparse.Namespace) -> int:
    from jetgraph.applications import roles
    from jetgraph.applications.ngrams.readout import prediction_plan
    from jetgraph.applications.plots import plot_roles
    from jetgraph.applications.targets import target_tokens
    from jetgraph.capture.loading import model_vocab_size
    from jetgraph.cost import check_plan, format_plan

    model, tokenizer, _ = load(args, text="a")
    prog = None if model_vocab_size(model) else _program(model)  # the vocabulary, before capture if it can
    vocab = model_vocab_size(model) or int(prog.decoder.unembedding.shape[0])
    targets = target_tokens(args.targets, vocab, tokenizer)
    text, sampling = None, None
    if args.text_content is not None:  # checked before any work: a text without targets stops here
        text = _text_windows(args, tokenizer)
        targets_at = roles.check_text(text[0], text[1], targets)
        windows = text[0].shape[0]
    else:  # sampling is latency-bound: timed, not counted in FLOPs
        from jetgraph.applications.sketch import sampling_rate

        targets_at, windows, sampling = None, args.samples, sampling_rate(model, tokenizer)
    prog = prog or _program(model)
    convention = _convention(args, tokenizer, vocab)
    rows = min(args.rows or roles.default_rows(vocab), vocab)
    phases = [prediction_plan(prog, convention, args.chunk),  # the sources: the tokens it predicts most
              *roles.role_plan(prog, rows, args.pairs, windows, args.length, targets_at=targets_at,
                               attention=args.attention, chunk=args.chunk, start=args.start,
                               sampling=sampling, prefix_length=len(convention.prefix) or 1)]
    print(f"targets: {targets.describe(tokenizer)}")
    print(format_plan(phases, args.max_time))
    if args.dry_run:
        return 0
    check_plan(phases, args.max_time, "--max-time", what="component roles")
    if text is None:
        text = _sampled_texts(args, model, tokenizer)
        roles.check_text(text[0], text[1], targets)  # before the ranking: sampled text may lack targets
    ids, mask, source = text
    # rows: the tokens the model predicts most (every token when rows is the vocabulary)
    report = roles.unit_roles(prog, targets, rows, args.pairs, args.chunk, start=args.start,
                              convention=convention, tokenizer=tokenizer)
    roles.verify_roles(prog, report, ids, mask, attention=args.attention)
    print(f"text: {source}")
    if report.positions < FEW_POSITIONS:
        print(f"note: the text has only {report.positions} target positions, so the intervals are wide: give "
              "more --samples or a longer --text", file=sys.stderr)
    print(report.table(tokenizer))
    args.written = [report.write_csv(args.csv, tokenizer), plot_roles(report, args.out, tokenizer)]
    _write_html(args, f"roles of {args.model}")
    print(f"wrote {', '.join(map(str, args.written))}")
    return 0


def run_curves(args: argparse.Namespace) -> int:
    from jetgraph.applications.curves import checkpoint_curves, load_checkpoint

    programs = [load_checkpoint(folder) for folder in args.folders]
    vocab = int(programs[-1].decoder.unembedding.shape[0])
    convention = _convention(args, _folder_tokenizer(args.folders[-1]), vocab)
    rows = _rows(args, programs[-1], convention, _folder_tokenizer(args.folders[-1]))
    curves = checkpoint_curves(programs, args.path, args.top, rows, args.first_tokens,
                               labels=[str(f) for f in args.folders], chunk=args.chunk, convention=convention)
    print(curves.table())
    args.written = [curves.write_csv(args.csv), curves.plot(args.out)]
    print(f"wrote {', '.join(map(str, args.written))}")
    return 0


def run_diff(args: argparse.Namespace) -> int:
    from jetgraph.applications.diffs import model_diff
    from jetgraph.applications.plots import plot_diff

    args_a = argparse.Namespace(**{**vars(args), "model": args.model_a})
    model_a, tokenizer, _ = load(args_a, text="a")
    model_b, _, _ = load(argparse.Namespace(**{**vars(args_a), "model": args.model_b}), text="a")
    prog_a, prog_b = _program(model_a), _program(model_b)
    vocab = int(prog_a.decoder.unembedding.shape[0])
    convention = _convention(args, tokenizer, vocab)
    diff = model_diff(prog_a, prog_b, args.path, args.top, _rows(args, prog_a, convention, tokenizer),
                      args.first_tokens, args.rank, args.min_prob, args.chunk,
                      names=(args.model_a, args.model_b), convention=convention)
    print(diff.table(tokenizer))
    args.written = [diff.write_csv(args.csv, tokenizer), plot_diff(diff, args.out, tokenizer)]
    _write_html(args, f"diff {args.model_a} → {args.model_b}")
    print(f"wrote {', '.join(map(str, args.written))}")
    return 0


def _keyword_ids(spec: str, tokenizer) -> tuple[list[int], str]:
    from jetgraph.applications.ngrams import keyword_ids, load_keywords

    if spec in ("toxic", "refusal") or Path(spec).is_file():
        words = load_keywords(spec)
        label = f"{spec} ({len(words)} words)"
    else:
        words = [w for w in spec.split(",") if w.strip()]
        label = ", ".join(w.strip() for w in words[:6]) + (", …" if len(words) > 6 else "")
    return keyword_ids(tokenizer, words), label


def run_masses(args: argparse.Namespace) -> int:
    from jetgraph.applications.masses import keyword_masses, masses_table
    from jetgraph.applications.plots import plot_masses

    programs, tokenizer = {}, None
    for name in args.models:
        model, tok, _ = load(argparse.Namespace(**{**vars(args), "model": name}), text="a")
        tokenizer = tokenizer or tok
        programs[name] = _program(model)
    ids, label = _keyword_ids(args.keywords, tokenizer)
    reference = next(iter(programs.values()))
    convention = _convention(args, tokenizer, int(reference.decoder.unembedding.shape[0]))
    sources = _rows(args, reference, convention, tokenizer)
    rows = keyword_masses(programs, ids, args.path, sources, args.first_tokens, args.controls, seed=args.seed,
                          chunk=args.chunk, label=label, convention=convention)
    print(masses_table(rows))
    import csv
    import io

    from jetgraph.files import atomic_write

    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    args.written = [atomic_write(args.csv, buffer.getvalue()), plot_masses(rows, args.out)]
    print(f"wrote {', '.join(map(str, args.written))}")
    return 0
