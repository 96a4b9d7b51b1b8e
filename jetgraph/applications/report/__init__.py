"""One self-contained HTML explorer per set of results: the data embedded as JSON, the script and
style inlined (``explorer.js``, ``explorer.css``: plain JavaScript, no library), nothing fetched
when the page is viewed. ``jetgraph.report(results…, "report.html")`` writes it; each result's
``to_html(path)`` writes one alone.

Views: a lens as the states × positions grid (top token per cell, colour = probability of the
model's own next token or cosine, hover for the top-k, one grid per order, diverged cells
outlined); a path attribution as a layered graph (sources at the bottom, units by layer, the
target on top, edges as wide as the contribution they carry, a slider that keeps the paths
carrying a chosen share, click a node for the paths through it); tables (n-gram tables and any
rows) sortable, searchable by token text and paged.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch

from jetgraph.files import atomic_write

TOP = 10  # tokens per lens cell in the hover


def report(*results: object, path: str | Path = "report.html", title: str = "jetgraph report",
           tokenizer: object = None, input_ids: torch.Tensor | None = None) -> Path:
    """Write ``results`` (lens results, path attributions, n-gram tables) as one HTML file;
    ``tokenizer`` labels tokens, ``input_ids`` ([batch, seq]) names a lens's positions."""
    if not results:
        raise ValueError("report needs at least one result (a LensResult, PathAttribution or NgramTable)")
    target = Path(path)
    if target.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"a report is an .html file, got {target.name!r}")
    views = [view for result in results for view in views_of(result, tokenizer, input_ids)]
    return write_page(views, target, title)


def write_page(views: list[dict], path: str | Path, title: str) -> Path:
    """Views made here (``rows_view``, ``csv_view``, …) as one HTML file."""
    return atomic_write(Path(path), page(title, views))


def explorer(*results: object, title: str = "jetgraph", tokenizer: object = None,
             input_ids: torch.Tensor | None = None):
    """The explorer of ``results`` for a notebook cell (``result.show()``)."""
    from jetgraph.applications.report.inline import Explorer

    views = [view for result in results for view in views_of(result, tokenizer, input_ids)]
    return Explorer(page(title, views))


def page(title: str, views: list[dict]) -> str:
    """The whole HTML document: data, style and script inline."""
    folder = resources.files(__name__)
    style = folder.joinpath("explorer.css").read_text(encoding="utf-8")
    script = folder.joinpath("explorer.js").read_text(encoding="utf-8")
    data = json.dumps({"title": title, "views": views}, separators=(",", ":"), allow_nan=False,
                      default=_plain).replace("</", "<\\/")
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_escape(title)}</title><style>{style}</style></head><body>"
            f"<header><h1>{_escape(title)}</h1><nav id=\"nav\"></nav></header><main id=\"views\"></main>"
            f"<div id=\"tooltip\"></div>"
            f"<script type=\"application/json\" id=\"jetgraph-data\">{data}</script>"
            f"<script>{script}</script></body></html>\n")


def views_of(result: object, tokenizer: object = None, input_ids: torch.Tensor | None = None) -> list[dict]:
    """The explorer views of one result, by its type."""
    from jetgraph.applications.explain import PathAttribution
    from jetgraph.applications.explain.attention import ScoreAttribution
    from jetgraph.applications.lens import LensAverage, LensResult
    from jetgraph.applications.ngrams import NgramTable

    if isinstance(result, PathAttribution):
        return [attribution_view(result)]
    if isinstance(result, LensResult):
        return [lens_view([result], tokenizer, input_ids)]
    if isinstance(result, LensAverage):
        return [curves_view(result)]
    if isinstance(result, ScoreAttribution):
        return [score_view(result)]
    if isinstance(result, NgramTable):
        return [ngram_view(result, tokenizer)]
    if isinstance(result, dict):  # jetgraph.lens: {order: LensResult}
        result = list(result.values())
    if isinstance(result, (list, tuple)) and result and all(isinstance(r, LensResult) for r in result):
        return [lens_view(list(result), tokenizer, input_ids)]
    raise ValueError(f"report takes LensResult, LensAverage, PathAttribution, ScoreAttribution or NgramTable "
                     f"results, got "
                     f"{type(result).__name__}")


# ------------------------------------------------------------------------------------ lens
def lens_view(results: Sequence[object], tokenizer: object = None, input_ids: torch.Tensor | None = None,
              batch: int = 0) -> dict:
    """One grid per order (states × positions) of the ``batch``-th sequence."""
    first = results[0]
    true = first.true_logits[batch].float()
    own = true.argmax(-1)
    seq = true.shape[0]
    tokens = _token_texts(tokenizer, None if input_ids is None else input_ids[batch].tolist(), seq)
    orders = []
    for result in results:
        logits = result.logits[:, batch].float()  # [centres, seq, vocab]
        probabilities = torch.softmax(torch.nan_to_num(logits, nan=-1e30, posinf=1e30, neginf=-1e30), -1)
        top_p, top_i = probabilities.topk(min(TOP, probabilities.shape[-1]), -1)
        cosine = torch.nn.functional.cosine_similarity(logits, true.unsqueeze(0), dim=-1)
        own_p = probabilities.gather(-1, own.view(1, seq, 1).expand(logits.shape[0], seq, 1))[..., 0]
        diverged = ~torch.isfinite(logits).all(-1)
        divergent = result.divergent_tokens[:, batch]  # a diverging series (overflow included)
        cells = [[{"top": [[_label(tokenizer, int(i)), float(p)]
                           for p, i in zip(top_p[s, t], top_i[s, t], strict=True)],
                   "rest": float(1 - top_p[s, t].sum()), "own": _finite(own_p[s, t]),
                   "cos": _finite(cosine[s, t]), "diverged": bool(diverged[s, t]),
                   "divergent": bool(divergent[s, t])}
                  for t in range(seq)] for s in range(logits.shape[0])]
        orders.append({"name": f"order {result.order} ({result.kind})", "labels": list(result.labels),
                       "cells": cells})
    return {"kind": "lens", "title": "lens", "tokens": tokens,
            "next": [_label(tokenizer, int(t)) for t in own],
            "subtitle": "each cell: the top token the lens reads at that state and position; hover "
                        "for the top tokens with probabilities; outlined: the jet's series diverges there "
                        "(read with care)", "orders": orders}


def curves_view(average: object) -> dict:
    """A lens over many prompts: per state, each bounded metric's mean over the prompts with the
    10th–90th percentile band."""
    series = []
    for metric, name in (("top1", "top-1 agreement"), ("cosine", "cosine"), ("topk", "top-k overlap")):
        values = average.prompt_metrics[metric].double()  # [centres, prompts]
        low, high = torch.nanquantile(values, 0.1, dim=1), torch.nanquantile(values, 0.9, dim=1)
        series.append({"name": name, "mean": [_finite(v) or 0.0 for v in values.nanmean(1)],
                       "low": [_finite(v) or 0.0 for v in low], "high": [_finite(v) or 0.0 for v in high]})
    return {"kind": "curves", "title": f"lens over {average.prompts} prompts (order {average.order})",
            "subtitle": f"{average.kind} lens, order {average.order}: mean over the prompts, band = "
                        "10th–90th percentile",
            "curves": {"title": "per state: the mean over the prompts and its band; hover a state for the "
                                "numbers", "labels": list(average.labels), "series": series}}


# ------------------------------------------------------------------------------------ attribution
def attribution_view(result: object) -> dict:
    """The layered graph of a path attribution: node positions computed here, the script draws."""
    nodes: dict[str, dict] = {}
    rows: dict[str, int] = {}
    paths = []
    for path in result.paths:
        if path.position is None and not path.units:
            continue  # the decoder's constant: a node beside the target
        ids = [_source_node(nodes, result, path)]
        for unit in path.units:
            nodes.setdefault(unit, {"label": unit, "short": unit})
            rows[unit] = _unit_row(unit)
            ids.append(unit)
        ids.append("target")
        start = f"{result.label(path.token)!r}@{path.position} " if path.position is not None else ""
        paths.append({"nodes": ids, "contribution": path.contribution, "text": start + path.path})
    nodes["target"] = {"label": f"target {result.label(result.target)!r}", "short": "target",
                       "detail": f"value {result.value:.4g}", "fill": "#ffe9a8"}
    grouped = sum(g.contribution for g in result.groups) + result.rest_total
    nodes["groups"] = {"label": f"unexpanded groups ({len(result.groups) + result.rest_count})",
                       "short": "groups", "fill": "#eee", "detail": f"total {grouped:.4g}"}
    nodes["remainder"] = {"label": "remainder (error node)", "short": "remainder", "fill": "#f6d5d5",
                          "detail": f"{result.remainder:.3g}"}
    width, spacing = 900, 52
    by_row: dict[int, list[str]] = {}
    for name, row in rows.items():
        by_row.setdefault(row, []).append(name)
    used = sorted(by_row)  # only the rows that hold a unit take space, bottom-up
    sources = sorted((n for n in nodes if n.startswith("source:")), key=lambda n: nodes[n]["order"])
    height = (len(used) + 2) * spacing + 20
    _spread(nodes, sources, height - spacing // 2 - 10, width)
    heads = 1 + max((int(m.group(1)) for u in rows if (m := re.search(r"\.h(\d+)$", u))), default=0)
    for rank, row in enumerate(used, start=1):
        for unit in by_row[row]:
            nodes[unit]["x"] = round(50 + (width - 100) * _column(unit, heads), 1)
            nodes[unit]["y"] = height - spacing // 2 - 10 - spacing * rank
    _spread(nodes, ["groups", "target", "remainder"], spacing // 2, width)
    return {"kind": "attribution", "title": attribution_title(result),
            "subtitle": f"{result.method}, {result.granularity} granularity; completeness "
                        f"{result.completeness:.1%}", "value": result.value, "nodes": nodes,
            "paths": paths, "width": width, "height": height, "fixed": ["target", "groups", "remainder"],
            "extra": [{"from": "groups", "value": grouped}, {"from": "remainder", "value": result.remainder}],
            "listed": sum(p.contribution for p in result.paths),
            "groups": sum(g.contribution for g in result.groups) + result.rest_total,
            "remainder": result.remainder}


def attribution_title(result: object) -> str:
    """``explain ' Mary' − ' John'`` for a logit difference, ``explain ' Paris'`` otherwise."""
    title = f"explain {result.label(result.target)!r}"
    return title + (f" − {result.label(result.contrast)!r}" if result.contrast is not None else "")


def score_view(result: object) -> dict:
    """A head's score attribution (``explain_attention``) as a sortable table of its pairs."""
    data = result.to_json()
    rows = [[(p["query"] or {}).get("path", "(bias)"), (p["key"] or {}).get("path", "(bias)"),
             p["contribution"], p["contribution"] / result.value if result.value else None]
            for p in data["pairs"]]
    view = rows_view(f"why {result.head} attends {result.query} → {result.key}",
                     ["query side", "key side", "contribution", "share of the score"], rows, [0, 1])
    view["subtitle"] = (f"score {result.value:.4g}, attention {result.pattern:.3f}; pairs of paths of at "
                        f"most {result.max_units} unit(s), the rest summed as 'rest'")
    return view


def _source_node(nodes: dict, result: object, path: object) -> str:
    if path.position is None:
        key = f"source:{path.source}"
        nodes.setdefault(key, {"label": path.source, "short": path.source[:10], "order": 10**6})
        return key
    key = f"source:{path.position}"
    text = result.label(path.token)
    nodes.setdefault(key, {"label": f"{text!r} @{path.position}", "short": f"{text[:7]}@{path.position}",
                           "order": path.position, "fill": "#e4efff"})
    return key


def _unit_row(name: str) -> int:
    """Rows bottom-up: layer ℓ's attention at 2ℓ+1, its MLP at 2ℓ+2 (blocks at 2ℓ+1)."""
    return 2 * _layer_of(name) + (2 if name.startswith("mlp") else 1)


def _column(unit: str, heads: int) -> float:
    """Where a unit sits across (0..1): a head by its number, a unit's bias after its heads, and
    an MLP or a block alternately left and right of centre by layer, so that an edge between
    distant layers does not run through every MLP between them."""
    head = re.search(r"\.h(\d+)$", unit)
    if head:
        return (int(head.group(1)) + 0.5) / (heads + 1)
    if unit.endswith(".bias"):
        return (heads + 0.5) / (heads + 1)
    return 0.3 if _layer_of(unit) % 2 == 0 else 0.7


def _layer_of(unit: str) -> int:
    match = re.search(r"(\d+)", unit)
    return int(match.group(1)) if match else 0


def _spread(nodes: dict, names: list[str], y: float, width: int) -> None:
    for i, name in enumerate(names):
        nodes[name]["x"] = round(50 + (width - 100) * (i + 1) / (len(names) + 1), 1)
        nodes[name]["y"] = y


def _natural(name: str) -> list[object]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


# ------------------------------------------------------------------------------------ tables
def ngram_view(table: object, tokenizer: object = None, limit: int = 100_000) -> dict:
    """An n-gram table's entries as sortable, searchable rows."""
    entries = table.entries(tokenizer)[:limit]
    columns = list(entries[0]) if entries else ["context", "next", "logit"]
    text_columns = [i for i, c in enumerate(columns) if entries and isinstance(entries[0][c], str)]
    return rows_view(f"n-grams of {table.path}", columns, [[e[c] for c in columns] for e in entries],
                     text_columns)


def rows_view(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]],
              search: Sequence[int] | None = None) -> dict:
    """Any table: ``columns`` and ``rows``; ``search``: the columns the search box reads."""
    return {"kind": "table", "title": title, "columns": list(columns),
            "rows": [[_cell(v) for v in row] for row in rows],
            "search": list(search) if search is not None else list(range(len(columns)))}


def csv_view(path: str | Path, title: str) -> dict:
    """A CSV a command wrote (roles, diffs) as a sortable, searchable table; numbers stay numbers,
    and the search reads the text columns."""
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        columns = next(reader, [])
        rows = [[_number(v) for v in row] for row in reader]
    text = [i for i in range(len(columns)) if rows and any(isinstance(r[i], str) and r[i] for r in rows)]
    return rows_view(title, columns, rows, text)


def _number(text: str) -> object:
    try:
        value = float(text)
    except ValueError:
        return text
    return value if math.isfinite(value) else None


# ------------------------------------------------------------------------------------ helpers
def _token_texts(tokenizer: object, ids: Sequence[int] | None, seq: int) -> list[str]:
    if ids is None:
        return [str(p) for p in range(seq)]
    return [_label(tokenizer, int(t)) for t in ids]


def _label(tokenizer: object, token: int) -> str:
    if tokenizer is None:
        return str(token)
    from jetgraph.applications.targets import token_label

    return token_label(tokenizer, token)


def _finite(value: torch.Tensor) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


def _cell(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (torch.Tensor,)):
        return _cell(value.item())
    return value


def _plain(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot embed {type(value).__name__} in a report")


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


__all__ = [
    "attribution_title",
    "attribution_view",
    "csv_view",
    "curves_view",
    "explorer",
    "lens_view",
    "ngram_view",
    "page",
    "report",
    "rows_view",
    "score_view",
    "views_of",
    "write_page",
]
