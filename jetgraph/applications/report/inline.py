"""Results in notebooks: a compact static view for ``_repr_html_`` (a small table, no script, so
it renders in any notebook frontend and in GitHub's), and :class:`Explorer`, the full explorer
for ``result.show()`` (an iframe whose ``srcdoc`` is the self-contained page). Nothing here
imports a notebook package."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from jetgraph.files import atomic_write

ROWS = 10  # rows of a compact view


class Explorer:
    """The full explorer of some results: shown inline by a notebook (``_repr_html_``), or saved
    (:meth:`save`) as the same file :func:`jetgraph.report` writes."""

    def __init__(self, document: str, height: int = 640) -> None:
        self.document = document
        self.height = height

    def _repr_html_(self) -> str:
        return (f'<iframe srcdoc="{html.escape(self.document, quote=True)}" '
                f'style="width:100%;height:{self.height}px;border:1px solid #ddd" '
                f'sandbox="allow-scripts"></iframe>')

    def save(self, path: str | Path) -> Path:
        return atomic_write(Path(path), self.document)


def table_html(caption: str, columns: Sequence[str], rows: Sequence[Sequence[object]], note: str = "") -> str:
    """A compact HTML table (numbers right-aligned, 4 significant digits)."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    foot = f"<div style='color:#777;font-size:12px'>{html.escape(note)}</div>" if note else ""
    return (f"<div><b>{html.escape(caption)}</b><table style='border-collapse:collapse;font-size:12px'>"
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{foot}</div>")


def attribution_html(result: object) -> str:
    rows = [[r["rank"], f"{r['token']}@{r['position']}" if r["position"] != "" else "", r["path"],
             r["contribution"], _percent(r["share"]), _percent(r["cumulative_share"])]
            for r in result.rows(ROWS)]
    note = (f"value {result.value:.5g}; completeness {result.completeness:.1%}; remainder "
            f"{result.remainder:.3g}; {len(result.paths)} paths listed; .show() for the explorer")
    columns = ["rank", "source", "path", "contribution", "share", "cumulative"]
    return table_html(f"PathAttribution of {result.label(result.target)!r} ({result.method}, "
                      f"{result.granularity})", columns, rows, note)


def lens_html(result: object) -> str:
    """The last position's top token per state, beside the metrics of :meth:`LensResult.table`."""
    top = result.logits[:, 0, -1].float().argmax(-1).tolist()
    rows = [[row["center"], top[i], row["cosine"], row["top1"], row["kl"]]
            for i, row in enumerate(result.table())]
    return table_html(f"LensResult: {result.kind}, order {result.order}",
                      ["state", "top token (last position)", "cosine", "top-1 agreement", "KL"], rows,
                      ".show() for the states × positions explorer")


def lens_average_html(result: object) -> str:
    rows = [[row["center"], row["cosine"], row["top1"], row["kl"]] for row in result.table()]
    return table_html(f"LensAverage: {result.kind}, order {result.order}, {result.prompts} prompts",
                      ["state", "cosine", "top-1 agreement", "KL"], rows, "means over the prompts")


def ngram_html(table: object) -> str:
    entries = table.entries()[:ROWS]
    columns = list(entries[0]) if entries else []
    return table_html(f"NgramTable {table.path}", columns, [[e[c] for c in columns] for e in entries],
                      f"top {len(entries)} of the table's entries; .show() for the searchable table")


def _cell(value: object) -> str:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float):
        text = "—" if not math.isfinite(value) else f"{value:.4g}"
        return f"<td style='text-align:right;padding:1px 6px'>{text}</td>"
    return f"<td style='padding:1px 6px'>{html.escape(str(value))}</td>"


def _percent(value: float) -> str:
    return "—" if not math.isfinite(value) else f"{value:.1%}"


__all__ = ["Explorer", "attribution_html", "lens_average_html", "lens_html", "ngram_html", "table_html"]
