"""``jetgraph view``: saved results (``jetgraph.save_result`` folders, or a folder of them) in one
HTML explorer page, opened in the browser."""

from __future__ import annotations

import argparse
from pathlib import Path

from jetgraph.cli.exits import UsageError
from jetgraph.cli.options import check_output


def add_parser(command) -> None:
    view = command("view", "open saved results in one interactive page",
                   "Load each saved result (a folder written by jetgraph.save_result, or a folder of "
                   "such folders), write them as one self-contained HTML explorer and open it.")
    view.add_argument("paths", nargs="+", type=Path, metavar="FOLDER", help="saved result folder(s)")
    view.add_argument("--out", type=Path, default=Path("view.html"), help="the HTML file to write")
    view.add_argument("--tokenizer", help="a tokenizer (a Hugging Face folder or tokenizer.json) for labels")
    view.add_argument("--no-open", action="store_true", help="write the page without opening a browser")
    view.set_defaults(run=run, check=check)


def check(args: argparse.Namespace) -> None:
    check_output(args.out, (".html", ".htm"), "--out")
    args.folders = []
    for path in args.paths:
        if (path / "result.json").is_file():
            args.folders.append(path)
        elif path.is_dir() and (found := sorted(p.parent for p in path.glob("*/result.json"))):
            args.folders.extend(found)
        else:
            raise UsageError(f"{str(path)!r} holds no saved result (a folder with result.json, written by "
                             "jetgraph.save_result, or a folder of them)")


def run(args: argparse.Namespace) -> int:
    import webbrowser

    from jetgraph.applications.report import report
    from jetgraph.applications.saving import load_result

    tokenizer = None
    if args.tokenizer:
        from jetgraph.capture.loading import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    results = [load_result(folder) for folder in args.folders]
    path = report(*results, path=args.out, title=", ".join(f.name for f in args.folders), tokenizer=tokenizer)
    print(f"wrote {path} ({len(results)} result{'s' * (len(results) != 1)})")
    if not args.no_open:
        webbrowser.open(path.resolve().as_uri())
    return 0
