"""The frozen linearisation of a stream function: its nonlinear factors held at their values.

A unit's update γ(h) is a composition of linear maps and a few nonlinear factors: norm scales
(``rsqrt`` of a variance), attention patterns (``softmax`` of scores), activation gates
(``gelu``, ``silu``, ``relu``). Holding those factors at their values on one input ``h*`` leaves a
map ``γ̃(x) = A x + c`` that is affine in ``x`` and equals γ at ``h*``: ``γ̃(h*) = γ(h*)``.

In the jet framework this is a named choice of expansion: the order-1 jet of ``γ̃`` centred at
0, whose order-0 term is the constant ``c`` and whose order-1 term ``A x`` is exact because
``γ̃`` is affine (no remainder). For ReLU networks it is the paper's Lemma 2 (an exact
first-order expansion). A network of frozen units is affine in its sources (the embeddings
at each position and each unit's constant), so any group of input-to-output paths has a total
that is one dot product with the target's gradient: :mod:`jetgraph.applications.explain`
searches paths with it.

:func:`freeze` rewrites an FX graph so that forward- and reverse-mode derivatives *at h** are
``A``: a factor that is held becomes ``detach``-ed, an activation ``f`` with ``f(0) = 0``
becomes ``detach(f(z)/z)·z`` (its gate held, the value unchanged). Rules:

* ops linear in each stream-dependent input (views, sums, matmuls with a constant, adds) stay;
* an elementwise ``f`` with ``f(0) = 0`` (gelu, silu, relu, tanh, erf, sin, pow > 0 …) is gated;
* any other op of a stream-dependent value (softmax, rsqrt, exp, sigmoid, comparisons, ops this
  module does not know) is held: its output is a constant of the frozen map (reported in
  :attr:`FrozenGraph.held`);
* a product of two stream-dependent factors holds one: the one computed through a nonlinearity
  (the gate of a GLU, the pattern of attention); if neither is, the second operand; a quotient
  holds its denominator.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
from torch import fx

aten = torch.ops.aten

_GATED = {
    aten.gelu.default, aten.silu.default, aten.relu.default, aten.tanh.default, aten.erf.default,
    aten.sin.default, aten.expm1.default, aten.log1p.default, aten.square.default,
    aten.leaky_relu.default, aten.elu.default, aten.hardtanh.default, aten.mish.default,
    aten.abs.default, aten.atan.default, aten.asinh.default, aten.sinh.default,
}
"""Elementwise ops with f(0) = 0: the value is ``gate · z`` with ``gate = f(z)/z`` held."""

_LINEAR = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.squeeze.default, aten.slice.Tensor, aten.select.int, aten.flatten.using_ints,
    aten.repeat_interleave.self_int, aten.mean.dim, aten.sum.dim_IntList, aten.sum.default,
    aten.mean.default, aten.neg.default, aten.contiguous.default, aten.clone.default,
    aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default, aten._to_copy.default,
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.type_as.default, aten.index.Tensor,
    aten.roll.default, aten.flip.default, aten.cumsum.default, aten.tril.default, aten.triu.default,
    aten.diagonal.default, aten.narrow.default, aten.view_as.default, aten.unflatten.int,
    aten.expand.default, aten.expand_as.default, aten.repeat.default, aten.split.Tensor,
    aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int, aten.cat.default,
    aten.concat.default, aten.stack.default, aten.constant_pad_nd.default, aten.pad.default,
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar,
    aten.rsub.Tensor, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.linear.default,
    aten.addmm.default, aten.baddbmm.default, aten.conv1d.default, aten.conv2d.default,
    aten.convolution.default, aten.embedding.default, operator.getitem, aten.copy.default,
    aten.where.self, aten.zeros_like.default,
}
"""Ops linear (or affine) in each stream-dependent input when the others are constant."""

_PRODUCTS = {aten.mul.Tensor, aten.matmul.default, aten.mm.default, aten.bmm.default,
             aten.einsum.default}
_QUOTIENTS = {aten.div.Tensor, aten.div.Tensor_mode}
_SHAPE_VALUES = (int, float, bool, torch.SymInt, torch.SymFloat)
_SIZES = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten.sym_storage_offset.default}


HELD = "jetgraph_held"
"""``node.meta`` key marking the ``detach`` nodes :func:`freeze` inserts (the held values)."""


@dataclass(frozen=True)
class FrozenGraph:
    """``values(h, *side)`` returns the original's value and the held values; its derivatives
    at any input are the frozen linear map there. ``linear(v, *side, *held)`` applies the frozen
    linear map ``A`` to ``v`` by plain forward ops on the held values, without the work that only
    fed them (``None`` when the graph has an op whose offset this module cannot drop: use a jvp
    of ``values`` then). ``held`` and ``gated`` name the ops, for the record."""

    values: fx.GraphModule
    linear: fx.GraphModule | None
    held: tuple[str, ...]
    gated: tuple[str, ...]


def freeze(graph_module: fx.GraphModule, hold_products: bool = True) -> FrozenGraph:
    """The frozen linearisation of ``graph_module`` (first placeholder: the stream).

    ``hold_products=False`` keeps both factors of a product live: the graph is then a polynomial
    in the stream with the other nonlinear factors held (an attention score is bilinear in its
    query and key rows with the norms held), and there is no linear graph (``linear`` is None)."""
    graph = copy.deepcopy(graph_module.graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    live = {placeholders[0]}  # stream-dependent after the rewrite
    through = set()  # live nodes computed through a nonlinearity
    held: list[str] = []
    gated: list[str] = []
    for node in list(graph.nodes):
        if node.op != "call_function" or _is_size(node):
            continue  # a size, not a value of the stream
        inputs = [a for a in node.all_input_nodes if a in live]
        if not inputs:
            continue
        target = node.target
        if target in _GATED or (target is aten.pow.Tensor_Scalar and float(node.args[1]) > 0):
            node = _gate(graph, node)  # the gated value stands for the op from here on
            gated.append(_op_name(target))
        elif target in _PRODUCTS or target in _QUOTIENTS:
            if target in _QUOTIENTS:
                if node.args[1] in live:
                    _hold_input(graph, node, node.args[1])
                if node.args[0] not in live:
                    continue
            else:
                operands = [a for a in _operands(node) if a in live]
                if len(operands) > 1 and hold_products:
                    nonlinear = [a for a in operands if a in through]
                    hold = nonlinear[0] if nonlinear else operands[-1]
                    _hold_input(graph, node, hold)
                    inputs = [a for a in inputs if a is not hold]
        elif target not in _LINEAR and target not in (aten.mul.Scalar, aten.div.Scalar):
            _hold_output(graph, node)  # a constant of the frozen map
            held.append(_op_name(target))
            continue
        live.add(node)
        if target in _GATED or target is aten.pow.Tensor_Scalar or any(a in through for a in inputs):
            through.add(node)
    graph.lint()
    linear = _linear_graph(graph_module, copy.deepcopy(graph)) if hold_products else None
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = ((output.args[0], *_held_nodes(graph)),)
    return FrozenGraph(_module(graph_module, graph), linear, tuple(held), tuple(gated))


def _held_nodes(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.meta.get(HELD)]


def _module(root: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    module = fx.GraphModule(root, graph)
    module.meta = dict(getattr(root, "meta", {}))
    return module


_OFFSET_FREE = {aten.linear.default: 2, aten.conv1d.default: 2, aten.conv2d.default: 2,
                aten.convolution.default: 2}
"""Ops whose bias argument (at this position) is an offset to drop."""


def _linear_graph(root: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule | None:
    """``(v, *side, *held) -> A v``: the held values as inputs, the work that fed them removed,
    every constant offset (biases, filled values, added constants) dropped."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    inputs = []
    for i in range(len(_held_nodes(graph))):
        with graph.inserting_after(inputs[-1] if inputs else placeholders[-1]):
            inputs.append(graph.placeholder(f"held_{i}"))
    for node, value in zip(_held_nodes(graph), inputs, strict=True):
        value.meta = {k: v for k, v in node.meta.items() if k != HELD}
        node.replace_all_uses_with(value)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    live = {placeholders[0]}
    for node in list(graph.nodes):
        if node.op != "call_function" or not any(a in live for a in node.all_input_nodes):
            continue
        if _is_size(node):
            continue
        if not _drop_offset(graph, node, live):
            return None
        live.add(node)
    graph.eliminate_dead_code()
    graph.lint()
    return _module(root, graph)


def _drop_offset(graph: fx.Graph, node: fx.Node, live: set[fx.Node]) -> bool:
    """Make ``node`` homogeneous in its live inputs; False if this module does not know how."""
    target, args = node.target, list(node.args)

    def is_live(a: object) -> bool:
        return isinstance(a, fx.Node) and a in live

    if target in (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar):
        a, b = args[0], args[1]
        alpha = node.kwargs.get("alpha", 1)
        sign = -1 if target in (aten.sub.Tensor, aten.sub.Scalar) else 1
        if is_live(a) and not is_live(b):
            node.replace_all_uses_with(a)
            live.add(a)
        elif is_live(b) and not is_live(a):
            with graph.inserting_before(node):
                scaled = graph.call_function(aten.mul.Tensor, (b, sign * alpha))
            scaled.meta = dict(node.meta)
            node.replace_all_uses_with(scaled)
            live.add(scaled)
        return True
    if target in (aten.masked_fill.Scalar, aten.constant_pad_nd.default):
        if len(args) > 2:
            args[2] = 0.0
        node.args = tuple(args)
        return True
    if target in _OFFSET_FREE:
        if len(args) > _OFFSET_FREE[target]:
            args[_OFFSET_FREE[target]] = None
            node.args = tuple(args)
        return True
    if target is aten.addmm.default:
        node.target, node.args = aten.mm.default, (args[1], args[2])
        return not node.kwargs
    if target is aten.baddbmm.default:
        node.target, node.args = aten.bmm.default, (args[1], args[2])
        return not node.kwargs
    if target in (aten.cat.default, aten.concat.default, aten.stack.default):
        pieces = []
        for piece in args[0]:
            if is_live(piece) or not isinstance(piece, fx.Node):
                pieces.append(piece)
                continue
            with graph.inserting_before(node):
                zeros = graph.call_function(aten.zeros_like.default, (piece,))
            zeros.meta = dict(piece.meta)
            pieces.append(zeros)
        node.args = (pieces, *args[1:])
        return True
    if target is aten.where.self:
        cond, a, b = args
        if is_live(cond):
            return False
        with graph.inserting_before(node):
            for i in (1, 2):
                if not is_live(args[i]) and isinstance(args[i], fx.Node):
                    args[i] = graph.call_function(aten.zeros_like.default, (args[i],))
        node.args = tuple(args)
        return True
    if target is aten.masked_fill.Tensor:
        node.target, node.args = aten.masked_fill.Scalar, (args[0], args[1], 0.0)
        return True
    if target in (aten.rsub.Scalar, aten.rsub.Tensor, aten.pad.default):
        return False
    return target in _LINEAR or target in _PRODUCTS or target in _QUOTIENTS or target in (
        aten.mul.Scalar, aten.div.Scalar)


def _is_size(node: fx.Node) -> bool:
    """A shape computation (``sym_size``, arithmetic on sizes), not a value of the stream."""
    if isinstance(node.meta.get("val"), _SHAPE_VALUES) or node.target in _SIZES:
        return True
    return getattr(node.target, "__module__", "") == "_operator" and node.target is not operator.getitem


def _op_name(target: object) -> str:
    return getattr(target, "__name__", str(target)).split(".")[0]


def _operands(node: fx.Node) -> list[fx.Node]:
    if node.target is aten.einsum.default:
        return [a for a in node.args[1] if isinstance(a, fx.Node)]
    return [a for a in node.args[:2] if isinstance(a, fx.Node)]


def _detach(graph: fx.Graph, node: fx.Node) -> fx.Node:
    detached = graph.call_function(aten.detach.default, (node,))
    detached.meta = dict(node.meta)  # the same value
    detached.meta[HELD] = True
    return detached


def _hold_input(graph: fx.Graph, node: fx.Node, operand: fx.Node) -> None:
    with graph.inserting_before(node):
        detached = _detach(graph, operand)
    node.replace_input_with(operand, detached)


def _hold_output(graph: fx.Graph, node: fx.Node) -> None:
    users = list(node.users)
    if users and all(u.op == "call_function" and u.target is operator.getitem for u in users):
        for user in users:  # an op of several outputs (topk): hold each output read
            _hold_output(graph, user)
        return
    with graph.inserting_after(node):
        detached = _detach(graph, node)
    node.replace_all_uses_with(detached, delete_user_cb=lambda user: user is not detached)


def _gate(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """``f(z)`` -> ``g·z + detach(f(z) − g·z)`` with ``g = detach(f(z)/z')``, ``z' = 1`` where
    ``z = 0`` (there f(z) = 0): the derivative is the held gate, the value is ``f(z)`` exactly."""
    z = node.args[0]
    with graph.inserting_before(node.next):
        zero = graph.call_function(aten.eq.Scalar, (z, 0))
        safe = graph.call_function(aten.masked_fill.Scalar, (z, zero, 1.0))
        gate = graph.call_function(aten.div.Tensor, (node, safe))
        held = graph.call_function(aten.detach.default, (gate,))
        gated = graph.call_function(aten.mul.Tensor, (held, z))
        error = graph.call_function(aten.sub.Tensor, (node, gated))
        correction = graph.call_function(aten.detach.default, (error,))
        value = graph.call_function(aten.add.Tensor, (gated, correction))
    new = (zero, safe, gate, held, gated, error, correction, value)
    for created in new:
        created.meta = {k: v for k, v in node.meta.items() if k != "val"} | {
            HELD: created is held or created is correction}
    value.meta["val"] = node.meta.get("val")
    node.replace_all_uses_with(value, delete_user_cb=lambda user: user not in new)
    return value


__all__ = ["FrozenGraph", "freeze"]
