"""Lower an exported graph to jetgraph's core op set by rewriting only the nodes that need it.

``ExportedProgram.run_decompositions`` retraces the whole program (15 s for SmolLM2); this pass
touches only the composite ops in :data:`DECOMPOSITIONS` and the no-op wrappers (eval-mode
dropout, same-dtype casts, aliases and detaches), so lowering costs milliseconds. New nodes get
``meta["val"]`` computed under the graph's fake mode and inherit their source node's ``nn_module_stack``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch._guards import detect_fake_mode

from jetgraph.taylor.decompositions import DECOMPOSITIONS

aten = torch.ops.aten

_DROPOUTS = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default}
# Ops that return their first input's value when dtype and device do not change.
_IDENTITIES = {
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other, aten.type_as.default,
    aten.alias.default, aten.detach.default,
    aten.detach_.default, aten.lift_fresh_copy.default,
}


def lower_to_core(graph_module: fx.GraphModule) -> fx.GraphModule:
    """Rewrite composite ops in place; returns the same module, recompiled."""
    graph = graph_module.graph
    vals = [n.meta["val"] for n in graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    fake_mode = detect_fake_mode(vals)
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _DROPOUTS and not _arg(node, 2, "train", False):
            node.replace_all_uses_with(node.args[0])
        elif node.target in _IDENTITIES and _same_value_type(node, node.args[0]):
            node.replace_all_uses_with(node.args[0])
        elif node.target in DECOMPOSITIONS:
            with graph.inserting_before(node):
                emit = _emitter(graph, node, fake_mode)
                result = DECOMPOSITIONS[node.target](emit, _node_shape, *node.args, **node.kwargs)
            node.replace_all_uses_with(result)
        else:
            continue
        graph.erase_node(node)
    graph.eliminate_dead_code()
    graph.lint()
    graph_module.recompile()
    return graph_module


def _arg(node: fx.Node, position: int, name: str, default: Any) -> Any:
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def _same_value_type(node: fx.Node, source: Any) -> bool:
    out, inp = node.meta.get("val"), getattr(source, "meta", {}).get("val")
    return (
        isinstance(out, torch.Tensor)
        and isinstance(inp, torch.Tensor)
        and out.dtype == inp.dtype
        and out.device == inp.device
    )


def _node_shape(node: fx.Node) -> torch.Size:
    return node.meta["val"].shape


def _emitter(graph: fx.Graph, source: fx.Node, fake_mode: Any):
    """``emit(op, *args)`` appends a node and computes its fake value."""
    stack = source.meta.get("nn_module_stack")

    def emit(op: Any, *args: Any, **kwargs: Any) -> fx.Node:
        if op is aten.ones.default:
            kwargs.setdefault("device", source.meta["val"].device)
        node = graph.call_function(op, tuple(args), kwargs)
        if stack is not None:
            node.meta["nn_module_stack"] = stack
        if fake_mode is not None:
            fake_args, fake_kwargs = torch.fx.node.map_aggregate(
                (args, kwargs), lambda a: a.meta.get("val") if isinstance(a, fx.Node) else a)
            try:
                with fake_mode:
                    node.meta["val"] = op(*fake_args, **fake_kwargs)
            except Exception:  # a value is only an aid for later passes, never required
                pass
        return node

    return emit
