"""``jetgraph explain``: which paths make a model predict a token, as a ranked table, CSV, JSON
and a picture."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jetgraph.cli.exits import UsageError
from jetgraph.cli.options import (
    capture_program,
    check_output,
    check_text,
    cost_arguments,
    load,
    model_argument,
    positive,
)

GRANULARITIES = ("head", "sublayer", "block")


def add_parser(command) -> None:
    """Register the command with the CLI's ``command(name, help, description)``."""
    explain = command("explain", "which paths make the model predict a token: an exact path attribution",
                      "Decompose the logit of TARGET at one position of TEXT (or the logit difference "
                      "TARGET − CONTRAST) exactly into input-to-output paths through attention heads and "
                      "MLPs, found by a best-first search (docs/explain.md). A context of one or two "
                      "tokens and --target its next token explains an n-gram table entry.")
    model_argument(explain)
    explain.add_argument("text", help="the input text")
    explain.add_argument("--target", help="the token explained, as text of exactly one token (' Paris') or "
                                          "id:N (default: the model's top prediction)")
    explain.add_argument("--contrast", help="explain logit(target) − logit(contrast) (one token or id:N)")
    explain.add_argument("--position", type=int, default=-1,
                         help="the position whose prediction is explained (default -1: the last)")
    explain.add_argument("--granularity", choices=GRANULARITIES, default="head",
                         help="units of the paths: attention heads and MLPs, attention and MLP sublayers, "
                              "or whole blocks")
    explain.add_argument("--method", choices=("frozen", "jet"), default="frozen",
                         help="frozen: the best-first search of the network frozen on this input (exact, "
                              "no enumeration); jet: every path of the order-k jet expansion up to "
                              "--max-length units")
    explain.add_argument("--budget", type=positive, default=2000,
                         help="most expansions (frozen) or paths (jet)")
    explain.add_argument("--goal", type=float, default=0.9,
                         help="stop once the listed paths carry this share of the value (frozen)")
    explain.add_argument("--order", type=int, default=0, help="Taylor order (jet)")
    explain.add_argument("--max-length", type=int, default=2, help="most units on a path (jet)")
    explain.add_argument("--top", type=positive, default=20, help="paths printed and drawn")
    explain.add_argument("--csv", type=Path, default=Path("explain.csv"), help="CSV of the listed paths")
    explain.add_argument("--json", type=Path, default=Path("explain.json"), help="JSON of everything")
    explain.add_argument("--render", type=Path, default=Path("explain.svg"),
                         help="the picture (SVG, PNG or DOT)")
    explain.add_argument("--html", type=Path, help="also write the interactive explorer (one HTML file)")
    explain.add_argument("--graph-json", type=Path,
                         help="also write circuit-tracer's attribution-graph JSON (Neuronpedia reads it)")
    cost_arguments(explain)
    explain.set_defaults(run=run, check=check)


def check(args: argparse.Namespace) -> None:
    from jetgraph.applications.explain import check_explain_options

    check_text(args.text, "the text")
    if args.contrast is not None and args.contrast == args.target:
        raise UsageError(f"--contrast {args.contrast!r} is the target: the difference would be 0; give "
                         "a different --contrast or none")
    try:
        check_explain_options(args.method, args.budget, args.goal, 60.0, args.order, args.max_length)
    except ValueError as exc:
        message = str(exc)
        for word, flag in (("budget", "--budget"), ("goal", "--goal"), ("order", "--order"),
                           ("max_length", "--max-length")):
            message = message.replace(f"{word} must", f"{flag} must")
        raise UsageError(message) from None
    check_output(args.csv, (".csv",), "--csv")
    check_output(args.json, (".json",), "--json")
    check_output(args.render, (".svg", ".png", ".dot"), "--render")
    if args.html is not None:
        check_output(args.html, (".html", ".htm"), "--html")
    if args.graph_json is not None:
        check_output(args.graph_json, (".json",), "--graph-json")


def _token(tokenizer, value: str | None, vocab: int, what: str) -> int | None:
    from jetgraph.applications.explain import token_id

    if value is None:
        return None
    if value.startswith("id:"):
        try:
            index = int(value[3:])
        except ValueError:
            raise UsageError(f"--{what} {value!r}: id: takes an integer token id") from None
        if not 0 <= index < vocab:
            raise UsageError(f"--{what} id {index} is outside the vocabulary of {vocab}")
        return index
    try:
        index = token_id(tokenizer, value, vocab, f"--{what}")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not value[:1].isspace():  # "Paris" is a word-start token too in most tokenizers: say which
        spaced = tokenizer(" " + value, add_special_tokens=False).input_ids
        if len(spaced) == 1 and spaced[0] != index:
            print(f"note: --{what} {value!r} is token {index}, without a leading space; after a word the "
                  f"model writes {' ' + value!r} (token {spaced[0]}): give --{what} {' ' + value!r} for that",
                  file=sys.stderr)
    return index


def run(args: argparse.Namespace) -> int:
    from jetgraph.applications.explain import explain_program
    from jetgraph.applications.explain.compute import explain_plan
    from jetgraph.applications.explain.picture import attribution_graph
    from jetgraph.applications.targets import token_label
    from jetgraph.cost import format_plan
    from jetgraph.files import atomic_write
    from jetgraph.viz import RenderError, render

    model, tokenizer, ids = load(args)
    seq = ids.shape[1]
    if not -seq <= args.position < seq:
        raise UsageError(f"--position {args.position} is past the input of {seq} token(s) "
                         f"(give -{seq}..{seq - 1})")
    vocab = int(model.get_output_embeddings().weight.shape[0]) if hasattr(model, "get_output_embeddings") \
        and model.get_output_embeddings() is not None else 1 << 62
    target = _token(tokenizer, args.target, vocab, "target")
    contrast = _token(tokenizer, args.contrast, vocab, "contrast")
    prog = capture_program(model, ids)
    if args.method == "frozen":
        plan = explain_plan(prog, seq, args.budget, args.granularity)
        if args.dry_run:
            print(format_plan([plan], args.max_time))
            return 0
        plan.check(args.max_time, "--max-time SECONDS (or --max-time none)")
    elif args.dry_run:
        from jetgraph.passes import expand_paths

        count = len(expand_paths(prog.at(args.granularity), order=args.order, max_length=args.max_length))
        print(f"jet decomposition: {count:,} paths of at most {args.max_length} units at order {args.order}"
              f" (budget {args.budget:,})")
        return 0
    labels = {t: token_label(tokenizer, t) for t in set(ids[0].tolist())
              | {t for t in (target, contrast) if t is not None}}
    result = explain_program(prog, ids, target, contrast, args.position, granularity=args.granularity,
                             method=args.method, budget=args.budget, goal=args.goal,
                             max_seconds=args.max_time or float("inf"), order=args.order,
                             max_length=args.max_length, labels=labels)
    result.labels.setdefault(result.target, token_label(tokenizer, result.target))
    print(result.table(args.top))
    atomic_write(args.csv, result.to_csv())
    atomic_write(args.json, result.to_json())
    written = [args.csv, args.json]
    try:
        written.append(render(attribution_graph(result, args.top), args.render))
    except RenderError as exc:
        print(f"note: {exc}")
    if args.html is not None:
        written.append(result.to_html(args.html))
    if args.graph_json is not None:
        layers = sum(u.kind == "attn" for u in prog.at("sublayer").units) or None
        graph = result.to_graph_json(slug=args.graph_json.stem, layers=layers)
        atomic_write(args.graph_json, json.dumps(graph))
        written.append(args.graph_json)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
