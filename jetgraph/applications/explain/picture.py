"""A picture of a path attribution: source tokens at the bottom, units by layer, the target on
top; each edge as wide as the contribution the drawn paths carry along it (blue: for the target,
red: against); the unexpanded groups, the paths not drawn and the remainder as nodes of their own."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict

import graphviz

from jetgraph.applications.explain.attribution import AttributedPath, PathAttribution
from jetgraph.ir import parse_unit_name

FOR, AGAINST = "#1d4ed8", "#b91c1c"


def _source_node(path: AttributedPath, result: PathAttribution) -> tuple[str, str]:
    if path.position is not None:
        label = f"{path.position}: {result.label(path.token)!r}\n{path.source}"
        return f"src{path.position}_{path.source}", label
    return f"const_{path.source}", path.source


def attribution_graph(result: PathAttribution, top: int = 30) -> graphviz.Digraph:
    """The ``top`` listed paths of ``result`` as a graphviz graph (see the module docstring)."""
    drawn = result.paths[:top]
    edges: dict[tuple[str, str], float] = defaultdict(float)
    layers: dict[int, set[str]] = defaultdict(set)
    sources: dict[str, str] = {}
    for path in drawn:
        source, label = _source_node(path, result)
        sources[source] = label
        steps = [source, *path.units, "target"]
        for a, b in itertools.pairwise(steps):
            edges[a, b] += path.contribution
        for unit in path.units:
            layers[(parse_unit_name(unit) or ("", 0))[1]].add(unit)
    widest = max((abs(v) for v in edges.values()), default=1.0) or 1.0  # the drawn paths' edges
    what = f"logit {result.label(result.target)!r}"
    if result.contrast is not None:
        what += f" − logit {result.label(result.contrast)!r}"
    title = f"{what} at position {result.position} = {result.value:.3f}; {len(drawn)} largest paths drawn"
    dot = graphviz.Digraph(name="explain", graph_attr={"rankdir": "BT", "fontname": "Helvetica",
                                                       "ranksep": "0.4", "label": title, "labelloc": "t"},
                           node_attr={"shape": "box", "style": "rounded,filled", "fontname": "Helvetica",
                                      "fontsize": "10"})
    with dot.subgraph(name="sources") as row:
        row.attr(rank="source")
        for name, label in sources.items():
            row.node(name, label, fillcolor="#e0e7ff")
    for layer in sorted(layers):
        with dot.subgraph(name=f"layer{layer}") as row:
            row.attr(rank="same")
            for unit in sorted(layers[layer]):
                kind = (parse_unit_name(unit) or ("mlp", 0))[0]
                row.node(unit, unit, fillcolor="#fde68a" if kind == "attn" else "#bbf7d0")
    rest = result.listed_total - math.fsum(p.contribution for p in drawn)
    with dot.subgraph(name="top") as row:
        row.attr(rank="sink")
        row.node("target", f"{what}\n= {result.value:.3f}", fillcolor="#ffd6a5")
    extras = [("undrawn", f"{len(result.paths) - len(drawn)} more listed paths", rest),
              ("unexpanded", f"{len(result.groups) + result.rest_count:,} unexpanded groups",
               result.unexpanded_total),
              ("remainder", "remainder", result.remainder)]
    for name, label, value in extras:
        dot.node(name, f"{label}\n{value:+.3f}", shape="note", fillcolor="#f1f5f9")
        edges[name, "target"] += value
    for (a, b), value in edges.items():
        width = 0.5 + 7.5 * abs(value) / widest
        dot.edge(a, b, penwidth=f"{min(width, 8.0):.2f}", color=FOR if value >= 0 else AGAINST,
                 label=f"{value:+.2f}", fontsize="8", arrowsize="0.5")
    return dot


__all__ = ["attribution_graph"]
