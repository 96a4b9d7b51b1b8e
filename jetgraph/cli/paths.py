"""``jetgraph paths`` (count a model's paths, draw an expansion's path graph) and ``jetgraph emit``
(write an expansion as a standalone Python module).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from jetgraph.capture.config_facts import folder_facts
from jetgraph.cli.exits import UsageError
from jetgraph.cli.options import (
    DEFAULT_TEXT,
    SHRINK_SELECTION,
    capture_program,
    check_output,
    check_path_specs,
    check_text,
    cost_arguments,
    granularity_argument,
    load,
    model_argument,
    path_filters,
    positive,
    unit_names,
)
from jetgraph.files import check_writable


def add_paths_parser(command) -> None:
    """Register ``paths``."""
    paths = command("paths", "count the paths of a model and draw an expansion's path graph")
    model_argument(paths)
    paths.add_argument("--text", default=DEFAULT_TEXT, help="input on which the drawn terms' norms are taken")
    granularity_argument(paths)
    path_filters(paths, exclude="attn", max_length=2)
    paths.add_argument("--max-nodes", type=positive, default=60, help="largest graph drawn in full")
    paths.add_argument("--limit", type=positive, default=5000,
                       help="refuse selections of more paths than this")
    paths.add_argument("--render", type=Path, default=Path("paths.svg"), help="SVG, PNG or DOT to write")
    cost_arguments(paths)
    paths.set_defaults(run=run_paths, check=check_paths)


def add_emit_parser(command) -> None:
    """Register ``emit``."""
    emit = command("emit", "emit an expansion of a model as a standalone Python module (+ .safetensors)",
                   "Expand MODEL (its paths, or its iterative lens) and write the expansion as a "
                   "standalone module that imports only torch and safetensors.")
    model_argument(emit)
    emit.add_argument("-o", "--out", type=Path, required=True, help="the .py file to write (+ .safetensors)")
    emit.add_argument("--text", default=DEFAULT_TEXT,
                      help="example input the code is traced on (the code runs on any batch and length)")
    emit.add_argument("--expansion", choices=("paths", "lens"), default="paths",
                      help="paths: Algorithm 2 with filters; lens: the decoder's jet at every h_l")
    granularity_argument(emit)
    path_filters(emit, exclude=None, max_length=1)
    emit.add_argument("--no-remainder", action="store_true",
                      help="leave out the model's own forward (target, remainder) and its weights")
    emit.add_argument("--limit", type=positive, default=5000,
                      help="refuse expansions with more terms than this")
    cost_arguments(emit)
    emit.set_defaults(run=run_emit, check=check_emit)


def check_paths(args: argparse.Namespace) -> None:
    check_path_specs(args.paths, folder_facts(args.model))
    check_text(args.text, "--text")
    check_output(args.render, (".svg", ".png", ".dot"), "--render")


def check_emit(args: argparse.Namespace) -> None:
    if args.paths and args.expansion == "lens":
        raise UsageError("--paths selects paths of --expansion paths; the lens expansion takes none")
    check_path_specs(args.paths, folder_facts(args.model))
    check_text(args.text, "--text")
    check_output(args.out, (".py",), "--out")
    if not args.out.stem.isidentifier():
        raise UsageError(f"--out {args.out.name!r} cannot be imported: the file name must be a Python "
                         "identifier (letters, digits, '_')")
    check_writable(args.out.with_suffix(".safetensors"), "weights file")


def selected_paths(args: argparse.Namespace, prog):
    """The filtered paths of ``prog`` at the chosen granularity, refused past ``--limit``."""
    import jetgraph
    from jetgraph.errors import CostError

    view = prog.at(args.granularity)
    try:
        if args.paths:
            paths = jetgraph.expand_paths(view, order=args.order, paths=args.paths, weights=args.weights)
        else:
            paths = jetgraph.expand_paths(view, order=args.order, include=unit_names(args.include),
                                          exclude=unit_names(args.exclude), max_length=args.max_length,
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


def run_paths(args: argparse.Namespace) -> int:
    import jetgraph
    from jetgraph.cost import check_plan, expansion_plan, format_plan
    from jetgraph.viz import expansion_graph, render

    model, _, ids = load(args)
    prog = capture_program(model, ids)
    view, paths, count = selected_paths(args, prog)
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


def run_emit(args: argparse.Namespace) -> int:
    import jetgraph
    from jetgraph.cost import check_plan, emit_plan, format_plan

    start = time.perf_counter()
    model, _, ids = load(args)
    prog = capture_program(model, ids)
    if args.expansion == "lens":
        view = prog.at(args.granularity)
        count = (len(view.units) + 1) * (args.order + 1)
    else:
        view, paths, count = selected_paths(args, prog)
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
