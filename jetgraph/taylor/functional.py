"""Make an exported graph functional: in-place ops become pure ones, writes into views scatter.

``torch.export`` (non-strict) returns a graph that may still mutate tensors: MLA attention and
partial RoPE fill a ``new_empty`` buffer with ``copy_`` into slices, MoE dispatch accumulates
with ``index_add_``/``index_put_``, some blocks scale their stream with ``mul_``. The lift pass
cuts units by walking back from their outputs, so a write that fills a buffer would be lost.

This pass rewrites such a graph in one walk, in milliseconds (``run_decompositions({})`` retraces
the whole program, seconds even for a tiny model):

* an in-place op ``x.op_(...)`` becomes its functional twin ``y = op(x, ...)`` (``copy_`` becomes
  ``copy``), and every later reader of ``x`` reads ``y``;
* when ``x`` is a view of a base (slices, selects, reshapes, transposes, split pieces …), the
  new base is the old one with ``y`` scattered back (``slice_scatter``, ``select_scatter``, an
  inverse reshape …), and every other view of that base read later is replayed on the new base.

Aliasing follows the ops' schemas (a return that aliases its first argument is a view), so no
op list decides what is a view. A write through a view the pass cannot invert raises
:class:`Unsupported`; capture then falls back to ``run_decompositions({})``.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx
from torch._guards import detect_fake_mode

aten = torch.ops.aten


class Unsupported(Exception):
    """A mutation this pass cannot make functional (the caller falls back to a retrace)."""


def fake_mode_of(graph: fx.Graph) -> Any:
    """The fake mode export computed the graph's ``meta["val"]`` under (None if it has none)."""
    vals = [n.meta["val"] for n in graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    return detect_fake_mode(vals)


def node_emitter(graph: fx.Graph, source: fx.Node, fake_mode: Any):
    """``emit(op, *args)`` inserts a node at the graph's insertion point with ``source``'s module
    scope and computes its fake value."""
    stack = source.meta.get("nn_module_stack")

    def emit(op: Any, *args: Any, like: fx.Node | None = None, **kwargs: Any) -> fx.Node:
        """``like``: a node whose value has this one's shape, dtype and device (a scatter's base),
        so its fake value need not be computed (symbolic shape reasoning costs ~50 ms a node)."""
        if op is aten.ones.default:
            kwargs.setdefault("device", source.meta["val"].device)
        node = graph.call_function(op, tuple(args), kwargs)
        if stack is not None:
            node.meta["nn_module_stack"] = stack
        if like is not None and isinstance(like.meta.get("val"), torch.Tensor):
            node.meta["val"] = like.meta["val"]
        elif fake_mode is not None:
            fake_args, fake_kwargs = fx.node.map_aggregate(
                (args, kwargs), lambda a: a.meta.get("val") if isinstance(a, fx.Node) else a)
            try:
                with fake_mode:
                    node.meta["val"] = op(*fake_args, **fake_kwargs)
            except Exception:  # a value is only an aid for later passes, never required
                pass
        return node

    return emit


def is_mutation(node: fx.Node) -> bool:
    """True for an op that writes its first argument (``mul_``, ``copy_``, ``index_put_`` …)."""
    schema = _schema(node)
    if schema is None or not schema.arguments:
        return False
    alias = schema.arguments[0].alias_info
    return alias is not None and alias.is_write


def has_mutations(graph: fx.Graph) -> bool:
    return any(is_mutation(node) for node in graph.nodes)


def functionalize(graph_module: fx.GraphModule) -> int:
    """Rewrite every mutation of ``graph_module`` (in place); returns how many there were."""
    graph = graph_module.graph
    if not has_mutations(graph):
        return 0
    state = _Aliases(graph, fake_mode_of(graph))
    count = 0
    for node in list(graph.nodes):
        if node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "output" or not is_mutation(node):
            node.args = fx.node.map_arg(node.args, lambda a, n=node: state.current(a, n))
            node.kwargs = fx.node.map_arg(node.kwargs, lambda a, n=node: state.current(a, n))
            if node.op != "output" and _is_view(node):
                source = node.args[0].args[0] if node.target is operator.getitem else node.args[0]
                state.add_view(node, source, node)
            continue
        count += 1
        state.write(node)
    graph.eliminate_dead_code()
    graph.lint()
    graph_module.recompile()
    return count


class _Aliases:
    """Which nodes share memory, and which node holds each base's value after the writes so far.

    A *base* is a tensor that is no view (an op's fresh result, a parameter, an input); each has a
    version (the node holding its current value) and an epoch (how many writes it has seen). A
    view knows its source, its base and a *template*: the original view node whose op and
    arguments it repeats; it is valid while its epoch is its base's, and replayed otherwise.
    """

    def __init__(self, graph: fx.Graph, fake_mode: Any) -> None:
        self.graph, self.fake_mode = graph, fake_mode
        self.source: dict[fx.Node, fx.Node] = {}
        self.base: dict[fx.Node, fx.Node] = {}
        self.template: dict[fx.Node, fx.Node] = {}
        self.epoch_of: dict[fx.Node, int] = {}
        self.version: dict[fx.Node, fx.Node] = {}
        self.epoch: dict[fx.Node, int] = {}
        self.replayed: dict[fx.Node, fx.Node] = {}

    def base_of(self, node: fx.Node) -> fx.Node:
        return self.base.get(node, node)

    def add_view(self, view: fx.Node, source: fx.Node, template: fx.Node) -> None:
        base = self.base_of(source)
        self.source[view], self.base[view], self.template[view] = source, base, template
        self.epoch_of[view] = self.epoch.get(base, 0)

    def current(self, node: Any, before: fx.Node) -> Any:
        """The node holding ``node``'s value now, replaying a stale view before ``before``."""
        if not isinstance(node, fx.Node):
            return node
        base = self.base_of(node)
        if base not in self.version:
            return node
        if node not in self.source:  # the base, or one of its versions
            return self.version[base]
        if self.epoch_of[node] == self.epoch[base]:
            return node
        replay = self.replayed.get(node)
        if replay is not None and self.epoch_of[replay] == self.epoch[base]:
            return replay
        source = self.current(self.source[node], before)
        template = self.template[node]
        with self.graph.inserting_before(before):
            replay = _replay(node_emitter(self.graph, template, self.fake_mode), template, source)
        self.add_view(replay, source, template)
        self.replayed[node] = replay
        return replay

    def write(self, node: fx.Node) -> None:
        """Replace the in-place ``node`` by its functional twin and scatter the result back."""
        target = node.args[0]
        args = fx.node.map_arg(node.args[1:], lambda a: self.current(a, node))
        kwargs = fx.node.map_arg(node.kwargs, lambda a: self.current(a, node))
        with self.graph.inserting_before(node):
            emit = node_emitter(self.graph, node, self.fake_mode)
            current = self.current(target, node)  # an in-place op keeps its target's shape and dtype
            value = emit(_functional(node.target), current, *args, like=current, **kwargs)
            written, new_value = target, value
            while written in self.source:  # up the chain of views to the base
                parent = self.current(self.source[written], node)
                new_value = _invert(emit, self.template[written], parent, new_value)
                written = self.source[written]
        base = self.base_of(written)
        self.version[base] = new_value
        self.base[new_value] = base
        self.epoch[base] = self.epoch.get(base, 0) + 1
        if target in self.source:  # the written view's value is the functional result
            self.add_view(value, self.source[target], self.template[target])
        node.replace_all_uses_with(value)
        self.graph.erase_node(node)


# --------------------------------------------------------------------------- schemas
def _schema(node: fx.Node) -> Any:
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    return node.target._schema


def _is_view(node: fx.Node) -> bool:
    """A node whose value shares memory with its first argument (schema alias, not written);
    ``getitem`` of a split counts as a view of the split's input."""
    if node.target is operator.getitem:
        source = node.args[0]
        return isinstance(source, fx.Node) and _is_view(source) and source.target is not operator.getitem
    schema = _schema(node)
    if schema is None or not schema.returns or not schema.arguments:
        return False
    returned, first = schema.returns[0].alias_info, schema.arguments[0].alias_info
    if returned is None or first is None or first.is_write or not isinstance(node.args[0], fx.Node):
        return False
    if node.target in (aten.contiguous.default, aten.reshape.default):
        value = node.args[0].meta.get("val")  # these alias only an input they need not copy
        return isinstance(value, torch.Tensor) and value.is_contiguous()
    return True


def _functional(op: torch._ops.OpOverload) -> torch._ops.OpOverload:
    """The out-of-place twin of an in-place op: ``mul_.Tensor`` -> ``mul.Tensor``."""
    name = op._schema.name.split("::")[-1]
    packet = getattr(aten, name.rstrip("_"), None)
    overload = op._overloadname
    if packet is None or not name.endswith("_") or overload not in packet.overloads():
        raise Unsupported(f"no functional form of {op}")
    return getattr(packet, overload)


# --------------------------------------------------------------------------- view algebra
def _replay(emit: Any, view: fx.Node, source: fx.Node) -> fx.Node:
    """``view`` recomputed from its (new) source."""
    if view.target is operator.getitem:
        split = view.args[0]
        pieces = emit(split.target, source, *split.args[1:], **split.kwargs)
        return emit(operator.getitem, pieces, view.args[1])
    return emit(view.target, source, *view.args[1:], **view.kwargs)


def _invert(emit: Any, view: fx.Node, source: fx.Node, value: fx.Node) -> fx.Node:
    """``source`` with ``value`` written where ``view`` reads it."""
    op, args = view.target, view.args
    if op is aten.slice.Tensor:
        dim, start, end, step = (list(args[1:]) + [0, None, None, 1][len(args) - 1:])[:4]
        return emit(aten.slice_scatter.default, source, value, dim, start, end, step, like=source)
    if op is aten.select.int:
        return emit(aten.select_scatter.default, source, value, args[1], args[2], like=source)
    if op is aten.diagonal.default:
        return emit(aten.diagonal_scatter.default, source, value, *args[1:], like=source)
    if op is aten.as_strided.default:
        return emit(aten.as_strided_scatter.default, source, value, *args[1:], like=source)
    if op in (aten.alias.default, aten.contiguous.default, aten.detach.default):
        return value
    if op is aten.transpose.int:
        return emit(aten.transpose.int, value, args[1], args[2])
    if op is aten.t.default:
        return emit(aten.t.default, value)
    if op is aten.permute.default:
        dims = [d % len(args[1]) for d in args[1]]
        inverse = [dims.index(i) for i in range(len(dims))]
        return emit(aten.permute.default, value, inverse)
    if op in (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.unsqueeze.default,
              aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.flatten.using_ints,
              aten.unflatten.int):
        return emit(aten.reshape.default, value, _sizes(emit, source), like=source)
    if op is operator.getitem:
        return _invert_piece(emit, view, source, value)
    raise Unsupported(f"a write through a view made by {op}")


def _invert_piece(emit: Any, piece: fx.Node, source: fx.Node, value: fx.Node) -> fx.Node:
    """``source`` with piece ``i`` of a split/chunk/unbind replaced by ``value``."""
    split, index = piece.args[0], piece.args[1]
    if split.target is aten.unbind.int:
        dim = split.args[1] if len(split.args) > 1 else split.kwargs.get("dim", 0)
        return emit(aten.select_scatter.default, source, value, dim, index, like=source)
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    pieces = split.meta.get("val")
    if not isinstance(pieces, (list, tuple)):
        raise Unsupported(f"a write into a piece of {split.target} without shapes")
    sizes = [p.shape[dim] for p in pieces]
    if not all(isinstance(s, int) for s in sizes[: index + 1]):
        raise Unsupported(f"a write into a piece of {split.target} of symbolic size")
    start = sum(sizes[:index])
    return emit(aten.slice_scatter.default, source, value, dim, start, start + sizes[index], 1, like=source)


def _sizes(emit: Any, node: fx.Node) -> list[Any]:
    """``node``'s shape as op arguments: ints, and ``sym_size`` nodes for symbolic sizes."""
    shape = node.meta["val"].shape
    return [s if isinstance(s, int) else emit(aten.sym_size.int, node, d) for d, s in enumerate(shape)]
