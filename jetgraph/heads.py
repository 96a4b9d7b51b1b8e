"""Attention heads found in an attention unit's graph, and one graph per head.

Multi-head attention ends the same way in every model: the heads' outputs, a tensor
``[..., heads, head_dim]``, are merged along the feature axis into ``[..., heads·head_dim]`` and
an affine map (the output projection, its bias, reshapes) turns the merged tensor into the
update. Because that map is affine, the update is the sum of what each head's slice of the
merged tensor gives, plus what a zero merged tensor gives (the projection's bias):

    γ(h) = Σ_i P(M ⊙ 1_i) − P(0) … (heads)   +   P(0) (bias)

where ``M`` is the merged tensor and ``1_i`` selects head i's features. This module finds ``M``
from graph structure alone (a reshape that merges the last two axes, after which only affine ops
that read no other stream-dependent value lead to the output) and builds one GraphModule per head
(``M`` replaced by its zero-padded slice, ``P(0)`` subtracted) and one for the bias. Grouped-query
attention shares keys and values between query heads; the merge is over query heads, so each
query head is its own unit. Pure torch.fx: nothing here knows an architecture.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import fx

aten = torch.ops.aten

_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints}
_SHAPE_ONLY = _RESHAPES | {
    aten.clone.default, aten.contiguous.default, aten.alias.default, aten._to_copy.default,
    aten.permute.default, aten.transpose.int, aten.t.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.expand.default, aten.to.dtype, aten.type_as.default,
}
_SCALE = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.neg.default}
_PRODUCTS = {aten.linear.default, aten.mm.default, aten.matmul.default, aten.bmm.default,
             aten.addmm.default, aten.einsum.default}
_OFFSETS = {aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar}


class HeadsNotFound(ValueError):
    """The unit's graph has no merge of a heads axis followed by an affine output map."""


@dataclass(frozen=True)
class HeadSplit:
    """An attention unit's graph split into one graph per head (and one for the bias, when the
    output map has an offset). ``merge`` names the merged-heads node the split was made at."""

    heads: tuple[fx.GraphModule, ...]
    bias: fx.GraphModule | None
    head_dim: int
    merge: str


def split_heads(graph_module: fx.GraphModule, unit: str = "") -> HeadSplit:
    """One GraphModule per head of ``graph_module`` (an attention unit's update ``γ(h, *side)``),
    each with the same signature, summing with the bias graph to ``γ``. Raises
    :class:`HeadsNotFound` naming what is missing."""
    graph = graph_module.graph
    stream = next(n for n in graph.nodes if n.op == "placeholder")
    output = next(n for n in graph.nodes if n.op == "output")
    result = output.args[0]
    if not isinstance(result, fx.Node):
        raise HeadsNotFound(f"{unit or 'the unit'}: its update is not a single tensor")
    depends = _dependents(graph, stream)
    for merge in reversed([n for n in graph.nodes if _merges_heads(n) and n in depends]):
        offset = _affine_tail(merge, result, depends)
        if offset is None:
            continue
        heads, head_dim = _val(merge.args[0]).shape[-2:]
        pieces = tuple(_head_graph(graph_module, merge.name, i, int(heads), int(head_dim), offset)
                       for i in range(int(heads)))
        bias = _bias_graph(graph_module, merge.name) if offset else None
        return HeadSplit(pieces, bias, int(head_dim), merge.name)
    raise HeadsNotFound(
        f"{unit or 'the unit'}: no heads found — head granularity needs the heads' outputs "
        "[..., heads, head_dim] merged into [..., heads·head_dim] by a reshape, followed only by an "
        "affine output map (projection, bias, reshapes) that reads nothing else from the stream")


def _val(node: object) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _dependents(graph: fx.Graph, stream: fx.Node) -> set[fx.Node]:
    """Nodes whose value depends on the stream's values (a size read from it does not)."""
    depends = {stream}
    for node in graph.nodes:
        if isinstance(node.meta.get("val"), (int, torch.SymInt)):
            continue
        if any(a in depends for a in node.all_input_nodes):
            depends.add(node)
    return depends


def _merges_heads(node: fx.Node) -> bool:
    """A reshape of ``[..., heads>1, head_dim]`` into ``[..., heads·head_dim]``."""
    if node.op != "call_function" or node.target not in _RESHAPES or not node.args:
        return False
    before, after = _val(node.args[0]), _val(node)
    if before is None or after is None or before.dim() < 3 or after.dim() != before.dim() - 1:
        return False
    heads, head_dim, merged = before.shape[-2], before.shape[-1], after.shape[-1]
    if not all(isinstance(s, int) for s in (heads, head_dim, merged)):
        return False
    return heads > 1 and merged == heads * head_dim


def _affine_tail(merge: fx.Node, result: fx.Node, depends: set[fx.Node]) -> bool | None:
    """None unless every stream-dependent node between ``merge`` and ``result`` is affine in
    ``merge`` and reads no other stream-dependent value; else whether the map has an offset."""
    tail = {merge}
    offset = False
    node = merge.next
    while node.op != "output":
        streamed = [a for a in node.all_input_nodes if a in depends]
        if streamed and any(a in tail for a in streamed):
            if any(a not in tail for a in streamed):
                return None  # mixes the merged heads with another stream-dependent value
            fixed = [a for a in node.args if not (isinstance(a, fx.Node) and a in tail)]
            if node.target in _SHAPE_ONLY or (node.target in _SCALE and len(streamed) == 1 and (
                    node.target is not aten.div.Tensor or node.args[0] in tail)):
                pass
            elif node.target in _PRODUCTS and len(streamed) == 1:
                offset |= node.target is aten.addmm.default or (
                    node.target is aten.linear.default and len(node.args) > 2 and node.args[2] is not None)
            elif node.target in _OFFSETS and len(streamed) == 1:
                offset |= any(isinstance(a, fx.Node) or a != 0 for a in fixed)
                if node.target in (aten.sub.Tensor, aten.sub.Scalar) and node.args[0] not in tail:
                    return None  # c − M is affine, but its sign would flip the heads
            else:
                return None
            tail.add(node)
        node = node.next
    return offset if result in tail else None


def _copy(graph_module: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, fx.Node]]:
    graph = copy.deepcopy(graph_module.graph)
    module = fx.GraphModule(graph_module, graph)
    module.meta = dict(getattr(graph_module, "meta", {}))
    return module, {n.name: n for n in graph.nodes}


def _emit(graph: fx.Graph, op: object, args: tuple, like: fx.Node | None = None) -> fx.Node:
    """A new node; its fake value is ``like``'s when given (a value only aids later passes)."""
    node = graph.call_function(op, args)
    if like is not None and _val(like) is not None:
        node.meta["val"] = _val(like)
    return node


def _tail_nodes(merge: fx.Node) -> list[fx.Node]:
    tail, nodes = {merge}, []
    node = merge.next
    while node.op != "output":
        if any(a in tail for a in node.all_input_nodes):
            tail.add(node)
            nodes.append(node)
        node = node.next
    return nodes


def _head_graph(graph_module: fx.GraphModule, merge_name: str, head: int, heads: int, head_dim: int,
                offset: bool) -> fx.GraphModule:
    module, nodes = _copy(graph_module)
    graph, merge = module.graph, nodes[merge_name]
    output = next(n for n in graph.nodes if n.op == "output")
    tail = _tail_nodes(merge)
    with graph.inserting_after(merge):
        piece = _emit(graph, aten.slice.Tensor, (merge, -1, head * head_dim, (head + 1) * head_dim))
    with graph.inserting_after(piece):
        padded = _emit(graph, aten.constant_pad_nd.default,
                       (piece, [head * head_dim, (heads - head - 1) * head_dim]), like=merge)
    merge.replace_all_uses_with(padded, delete_user_cb=lambda user: user in tail)
    if offset:  # subtract what a zero merged tensor gives (the bias), so heads + bias = γ
        result = output.args[0]
        with graph.inserting_before(output):
            zeros = _emit(graph, aten.zeros_like.default, (padded,), like=merge)
            copies = {padded: zeros}
            for node in _tail_nodes(padded):
                copies[node] = graph.node_copy(node, lambda n: copies.get(n, n))
            difference = _emit(graph, aten.sub.Tensor, (result, copies[result]), like=result)
        output.args = (difference,)
    graph.eliminate_dead_code()
    module.recompile()
    return module


def _bias_graph(graph_module: fx.GraphModule, merge_name: str) -> fx.GraphModule:
    module, nodes = _copy(graph_module)
    graph, merge = module.graph, nodes[merge_name]
    tail = _tail_nodes(merge)
    with graph.inserting_after(merge):
        zeros = _emit(graph, aten.zeros_like.default, (merge,), like=merge)
    merge.replace_all_uses_with(zeros, delete_user_cb=lambda user: user in tail)
    graph.eliminate_dead_code()
    module.recompile()
    return module


__all__ = ["HeadSplit", "HeadsNotFound", "split_heads"]
