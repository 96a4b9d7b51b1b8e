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

from jetgraph.taylor.decompositions import DECOMPOSITIONS
from jetgraph.taylor.functional import Unsupported, fake_mode_of, functionalize, node_emitter

aten = torch.ops.aten

_DROPOUTS = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default}
# Ops that return their first input's value when dtype and device do not change.
_IDENTITIES = {
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other, aten.type_as.default,
    aten.alias.default, aten.detach.default,
    aten.detach_.default, aten.lift_fresh_copy.default,
}
# Ops that only check metadata or guard a size: no users, no computation, no Taylor rule.
_ASSERTS = {
    aten._assert_tensor_metadata.default, aten._assert_scalar.default,
    aten.sym_constrain_range_for_size.default,
}


def core_module(exported: torch.export.ExportedProgram) -> fx.GraphModule:
    """The exported program as a functional core-op GraphModule: in-place ops rewritten by the
    fast pass (:func:`jetgraph.taylor.functional.functionalize`), or, for a write it cannot
    invert, by ``run_decompositions({})`` (a retrace: seconds); then :func:`lower_to_core`."""
    module = exported.module(check_guards=False)
    try:
        functionalize(module)
    except Unsupported:
        module = exported.run_decompositions({}).module(check_guards=False)
    return lower_to_core(module)


def lower_to_core(graph_module: fx.GraphModule) -> fx.GraphModule:
    """Rewrite composite ops in place and drop assert-only nodes; returns the same module,
    recompiled."""
    graph = graph_module.graph
    fake_mode = fake_mode_of(graph)
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _ASSERTS and not node.users:
            pass  # erased below
        elif node.target in _DROPOUTS and not _arg(node, 2, "train", False):
            node.replace_all_uses_with(node.args[0])
        elif node.target in _IDENTITIES and _same_value_type(node, node.args[0]):
            node.replace_all_uses_with(node.args[0])
        elif node.target in DECOMPOSITIONS:
            with graph.inserting_before(node):
                emit = node_emitter(graph, node, fake_mode)
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
