"""Pictures of residual programs and expansions with graphviz (SVG, PNG or DOT).

``program_graph`` draws the residual IR: encoder, units (attention and MLP coloured apart) and
decoder on the stream, with runs of identical blocks collapsed past ``max_nodes``.
``expansion_graph`` draws an expansion's term DAG (its nodes, in the expansion's own order) — an
edge from each centre to the terms built on it — labelled with units, orders and, given an input,
each term's norm; past ``max_nodes`` the largest terms are kept and the rest summarised in one
node. ``render`` writes either; without the ``dot`` program the DOT text is still written, and
the error says how to install graphviz.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import graphviz
import networkx as nx
import torch

from jetgraph.errors import JetgraphError
from jetgraph.files import atomic_write
from jetgraph.ir import DECODER_NAME, ENCODER_NAME, ResidualProgram
from jetgraph.passes.expansion import Expansion

COLOURS = {"attn": "#f4a261", "mlp": "#8ab17d", "encoder": "#b8c0ff", "decoder": "#b8c0ff",
           "source": "#b8c0ff", "stream": "#e9ecef", "identity": "#e9ecef", "logits": "#ffd6a5"}
FORMATS = ("svg", "png", "dot")


class RenderError(JetgraphError):
    """The picture could not be rendered (usually: graphviz's ``dot`` is not installed)."""


def program_graph(prog: ResidualProgram, max_nodes: int = 40) -> graphviz.Digraph:
    """The residual IR as a graphviz graph (runs of blocks collapsed beyond ``max_nodes``)."""
    dot = graphviz.Digraph(name=prog.model_class, graph_attr={"rankdir": "TB", "fontname": "Helvetica"},
                           node_attr={"shape": "box", "style": "rounded,filled", "fontname": "Helvetica"})
    dot.node(ENCODER_NAME, f"{ENCODER_NAME}\n{prog.encoder.module_path}", fillcolor=COLOURS["encoder"])
    units = list(prog.units)
    half = max(1, max_nodes // 2)
    shown = units if len(units) <= max_nodes else [*units[:half], None, *units[len(units) - half:]]
    previous = ENCODER_NAME
    for unit in shown:
        if unit is None:
            hidden = len(units) - 2 * half
            dot.node("collapsed", f"… {hidden} more units …", shape="plaintext", style="")
            dot.edge(previous, "collapsed", style="dashed")
            previous = "collapsed"
            continue
        label = (f"{unit.name}  [{unit.kind}]\n{unit.module_path}\n"
                 f"{unit.op_count} ops, {unit.num_parameters:,} params")
        dot.node(unit.name, label, fillcolor=COLOURS.get(unit.kind, "#ffffff"))
        dot.edge(previous, unit.name, label="h" if unit.reads == unit.index else "h (parallel)")
        previous = unit.name
    dot.node(DECODER_NAME, f"{DECODER_NAME}\n{prog.decoder.module_path}", fillcolor=COLOURS["decoder"])
    dot.edge(previous, DECODER_NAME)
    return dot


@torch.no_grad()
def expansion_graph(expansion: Expansion, input_ids: torch.Tensor | None = None,
                    max_nodes: int = 60) -> graphviz.Digraph:
    """The term DAG of ``expansion``; with ``input_ids``, labels carry norms and large terms win."""
    graph = expansion.to_networkx()
    norms: dict[int, float] = {}
    if input_ids is not None:
        values = expansion.evaluate(input_ids)
        by_name = {term.name: term.uid for term in expansion.terms}
        norms = {by_name[name]: value.norm().item() for name, value in values.terms.items()}
    keep = set(graph.nodes)
    if len(keep) > max_nodes:
        outputs = sorted((t.uid for t in expansion.terms), key=lambda uid: -norms.get(uid, 0.0))
        keep = set()
        for uid in outputs:
            needed = {uid} | _ancestors(graph, uid)
            if len(keep | needed) > max_nodes:
                break
            keep |= needed
    dot = graphviz.Digraph(name="expansion", graph_attr={"rankdir": "LR", "fontname": "Helvetica"},
                           node_attr={"shape": "box", "style": "rounded,filled", "fontname": "Helvetica"})
    for term in expansion.nodes:  # the expansion's own walk: inputs first, a stable order
        uid = term.uid
        if uid not in keep:
            continue
        label = term.steps[-1] if term.kind != "identity" else f"{term.steps[-1]} (id)"
        if term.kind == "jet" and term.order:
            label += f"\ncoefficient {term.degree} of an order-{term.order} jet"
        if uid in norms:
            label += f"\n‖·‖ = {norms[uid]:.3g}"
        colour = COLOURS["logits"] if term.space == "logits" else COLOURS.get(term.kind, "#ffffff")
        dot.node(str(uid), label, fillcolor=colour, penwidth="2" if uid in norms else "1")
    for source, target in graph.edges:
        if source in keep and target in keep:
            dot.edge(str(source), str(target), label=graph.edges[source, target].get("unit") or "")
    hidden = sum(1 for term in expansion.terms if term.uid not in keep)  # terms, not DAG nodes
    if hidden:
        why = "smaller norms" if norms else "not drawn"
        dot.node("more", f"… {hidden} more terms ({why}) …", shape="plaintext", style="")
    return dot


def render(graph: graphviz.Digraph, path: str | Path) -> Path:
    """Write ``graph`` to ``path``; the suffix picks SVG, PNG or DOT."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise RenderError(f"unsupported picture format {path.suffix!r}: use one of "
                          f"{', '.join('.' + f for f in FORMATS)}")
    if fmt == "dot":
        return atomic_write(path, graph.source)
    if shutil.which("dot") is None:
        fallback = atomic_write(path.with_suffix(".dot"), graph.source)
        raise RenderError(f"graphviz's `dot` program is not installed, so {path.name} was not drawn; "
                          f"the DOT text is in {fallback}. Install it with `apt-get install graphviz` "
                          "(Debian/Ubuntu) or `brew install graphviz` (macOS)")
    return atomic_write(path, graph.pipe(format=fmt))


def _ancestors(graph: nx.DiGraph, node: int) -> set[int]:
    stack, seen = [node], set()
    while stack:
        for parent in graph.predecessors(stack.pop()):
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen
