"""Cut a region of an FX graph into its own GraphModule.

The region is every node that depends on the given inputs and feeds the given outputs. What the
region reads from outside is classified: parameters stay ``get_attr`` (shared, not copied),
constant and shape computations are copied in (shapes of ``input_ids`` and ``attention_mask`` are
re-derived from the new first input, whose leading dims are the same batch and sequence), and any other tensor
becomes a named side input. Reading the residual stream from outside the region is an error:
that is a unit that does not have the form h + γ(h).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import fx

from jetgraph.capture.export import strip_wrapper
from jetgraph.errors import CaptureError
from jetgraph.ir import PARAMETER_NAME, module_scope

aten = torch.ops.aten


@dataclass
class GraphIndex:
    """Topological positions and dependence sets of a captured graph, computed once."""

    graph_module: fx.GraphModule
    inputs: tuple[fx.Node, ...]  # input_ids, attention_mask
    order: dict[fx.Node, int]
    on_ids: set[fx.Node]  # every node that depends on an input

    @classmethod
    def build(cls, graph_module: fx.GraphModule) -> GraphIndex:
        nodes = list(graph_module.graph.nodes)
        placeholders = tuple(n for n in nodes if n.op == "placeholder")
        if len(placeholders) != 2:
            raise CaptureError(f"expected two inputs (input_ids, attention_mask), found {len(placeholders)}")
        return cls(graph_module, placeholders, {n: i for i, n in enumerate(nodes)},
                   descendants(nodes, placeholders))

    @property
    def input_ids(self) -> fx.Node:
        return self.inputs[0]

    @property
    def attention_mask(self) -> fx.Node:
        return self.inputs[1]

    def model_inputs(self) -> list[tuple[fx.Node, str]]:
        """The graph's inputs with their names, for regions that read the ids (encoder, side inputs)."""
        return [(self.input_ids, "input_ids"), (self.attention_mask, "attention_mask")]

    def is_ancestor(self, ancestor: fx.Node, node: fx.Node) -> bool:
        """Whether ``node`` depends on ``ancestor`` (walks back, pruned by topological order)."""
        return self._reaches(ancestor, node, lambda n: n.all_input_nodes)

    def depends_on_value(self, ancestor: fx.Node, node: fx.Node) -> bool:
        """Whether ``node``'s *value* depends on ``ancestor``: like :meth:`is_ancestor`, but an
        edge that reads only a shape (``sym_size``, ``new_zeros``, ``expand_as``'s sizes, the
        buffer ``copy`` overwrites) does not count."""
        return self._reaches(ancestor, node, value_inputs)

    def _reaches(self, ancestor: fx.Node, node: fx.Node,
                 inputs: Callable[[fx.Node], Sequence[fx.Node]]) -> bool:
        if ancestor is node:
            return True
        stop = self.order[ancestor]
        stack, seen = [node], {node}
        while stack:
            current = stack.pop()
            for parent in inputs(current):
                if parent is ancestor:
                    return True
                if parent not in seen and self.order[parent] > stop:
                    seen.add(parent)
                    stack.append(parent)
        return False

    def ancestors(self, outputs: Iterable[fx.Node], stop: set[fx.Node] | None = None) -> set[fx.Node]:
        stop = stop or set()
        found: set[fx.Node] = set()
        stack = list(outputs)
        while stack:
            node = stack.pop()
            if node in found:
                continue
            found.add(node)
            if node not in stop:
                stack.extend(node.all_input_nodes)
        return found


# Ops whose first argument gives only a shape, dtype or device, never values.
_SHAPE_READS = {
    aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten.new_empty.default,
    aten.new_zeros.default, aten.new_ones.default, aten.new_full.default, aten.empty_like.default,
    aten.zeros_like.default, aten.ones_like.default, aten.full_like.default, aten.copy.default,
}


def value_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs whose values ``node``'s value depends on (all, less a shape-only first one)."""
    inputs = node.all_input_nodes
    first = node.args[0] if node.args else None
    if node.op == "call_function" and node.target in _SHAPE_READS and isinstance(first, fx.Node):
        later: list[fx.Node] = []
        fx.node.map_arg((node.args[1:], node.kwargs), later.append)
        return [n for n in inputs if n is not first or n in later]
    return inputs


def descendants(nodes: Sequence[fx.Node], roots: Iterable[fx.Node]) -> set[fx.Node]:
    """Forward closure of ``roots`` over ``nodes`` (given in topological order)."""
    found = set(roots)
    for node in nodes:
        if node not in found and any(parent in found for parent in node.all_input_nodes):
            found.add(node)
    return found


class SideRegistry:
    """Names for the side-input tensors shared by all units of one program."""

    def __init__(self) -> None:
        self.nodes: dict[fx.Node, str] = {}

    def name(self, node: fx.Node) -> str:
        if node not in self.nodes:
            base = f"{_side_hint(node)}_{node.name}"
            self.nodes[node] = base
        return self.nodes[node]


def _side_hint(node: fx.Node) -> str:
    """A readable prefix for a side input: mask, rope_cos, rope_sin or side."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor) and val.dtype == torch.bool:
        return "mask"
    stack, seen = [node], {node}
    while stack and len(seen) < 64:
        current = stack.pop()
        if current.target in (aten.cos.default, aten.sin.default):
            return "rope_" + str(current.target).split(".")[1]
        for parent in current.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    if isinstance(val, torch.Tensor) and val.dim() >= 2 and val.shape[-1] == val.shape[-2]:
        return "mask"
    return "side"


Combine = Callable[[fx.Graph, list[fx.Node]], fx.Node | tuple[fx.Node, ...]]


def combine_sum(graph: fx.Graph, values: list[fx.Node]) -> fx.Node:
    return functools.reduce(
        lambda a, b: graph.call_function(aten.add.Tensor, (a, b)), values
    )


def combine_sum_minus_input(graph: fx.Graph, values: list[fx.Node]) -> fx.Node:
    """Σ values − h (h the region's first input): the pure update of a scaled step."""
    h = next(node for node in graph.nodes if node.op == "placeholder")
    return graph.call_function(aten.sub.Tensor, (combine_sum(graph, values), h))


def combine_tuple(graph: fx.Graph, values: list[fx.Node]) -> tuple[fx.Node, ...]:
    return tuple(values)


def extract(
    index: GraphIndex,
    inputs: Sequence[tuple[fx.Node, str]],
    outputs: Sequence[fx.Node],
    *,
    combine: Combine = combine_sum,
    stream: set[fx.Node] | None = None,
    side: SideRegistry | None = None,
    stream_shape: torch.Size | None = None,
    stream_outputs: bool = False,
    what: str = "",
    extra: set[fx.Node] | None = None,
) -> tuple[fx.GraphModule, tuple[str, ...]]:
    """Cut ``inputs -> outputs`` out of the captured graph; return the module and its side inputs.

    ``stream`` is the set of nodes that depend on the residual stream; a region that reads one of
    them other than through ``inputs`` raises :class:`CaptureError`. ``side=None`` forbids side
    inputs (used for the side-input graph itself and the encoder, whose only input is the ids).
    ``extra``: values of the encoder's output that later units read (per-layer inputs): side
    inputs of every region that reads them, never recomputed from a region's own input.
    With ``stream_shape`` (the shape of h_0), the first input is a stream tensor of that shape
    even where the model flattened the stream to [batch*seq, d] (OPT's MLP), and stream-shaped
    outputs are reshaped back to it when ``stream_outputs`` is set.
    """
    input_nodes = [node for node, _ in inputs]
    nodes = list(index.graph_module.graph.nodes)
    reach = descendants(nodes, input_nodes)
    copied, side_nodes = _classify(index, input_nodes, outputs, reach, stream, what, extra or set())
    if side_nodes and side is None:
        node = side_nodes[0]
        raise CaptureError(f"{what} needs tensor '{node.name}' from outside its region",
                           module=module_scope(node), node=node.name)
    new_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = []
    for node, name in inputs:
        placeholders.append(new_graph.placeholder(name))
        placeholders[-1].meta = dict(node.meta)
        env[node] = placeholders[-1]
    if stream_shape is not None:
        env[input_nodes[0]] = _as_node_shape(new_graph, placeholders[0], input_nodes[0], stream_shape, what)
    side_names = tuple(side.name(node) for node in side_nodes) if side is not None else ()
    for node, name in zip(side_nodes, side_names, strict=True):
        env[node] = new_graph.placeholder(name)
        env[node].meta = dict(node.meta)
    first_input = placeholders[0]
    for node in nodes:
        if node not in copied or node in env:
            continue
        if _is_ids_size(index, node):
            env[node] = new_graph.call_function(aten.sym_size.int, (first_input, node.args[1]))
            env[node].meta = dict(node.meta)
        else:
            env[node] = new_graph.node_copy(node, lambda parent: env[parent])
    values = [env[node] for node in outputs]
    if stream_shape is not None and stream_outputs:
        values = [_as_stream_shape(new_graph, v, node, first_input, stream_shape)
                  for v, node in zip(values, outputs, strict=True)]
    result = combine(new_graph, values)
    new_graph.output(result)
    new_graph.eliminate_dead_code()
    module = fx.GraphModule(index.graph_module, new_graph, class_name="JetgraphModule")
    module.meta[PARAMETER_NAME] = {node.target: strip_wrapper(node.target) or node.target
                                   for node in new_graph.nodes if node.op == "get_attr"}
    return module, side_names


def _shape(node: fx.Node) -> torch.Size | None:
    val = node.meta.get("val")
    return val.shape if isinstance(val, torch.Tensor) else None


def _as_node_shape(graph: fx.Graph, h: fx.Node, node: fx.Node, stream_shape: torch.Size,
                   what: str) -> fx.Node:
    """View the canonical stream placeholder in the shape the region expects."""
    shape = _shape(node)
    if shape is None or shape == stream_shape:
        return h
    if len(shape) == 2 and shape[-1] == stream_shape[-1]:
        return graph.call_function(aten.reshape.default, (h, [-1, shape[-1]]))
    raise CaptureError(f"{what} reads the stream in shape {tuple(shape)}, which is neither the "
                       f"stream's shape {tuple(stream_shape)} nor its [batch*seq, d] flattening",
                       module=module_scope(node), node=node.name)


def _as_stream_shape(graph: fx.Graph, value: fx.Node, node: fx.Node, h: fx.Node,
                     stream_shape: torch.Size) -> fx.Node:
    """Reshape a flattened stream-sized output back to the stream's shape, or expand one that
    broadcasts against it (a bias added to the stream)."""
    shape = _shape(node)
    if shape is None or shape == stream_shape:
        return value
    sizes = [graph.call_function(aten.sym_size.int, (h, dim)) for dim in range(len(stream_shape))]
    if _broadcasts(shape, stream_shape):
        return graph.call_function(aten.expand.default, (value, sizes))
    return graph.call_function(aten.reshape.default, (value, sizes))


def _broadcasts(shape: Sequence[object], target: Sequence[object]) -> bool:
    """Whether ``shape`` broadcasts to ``target`` without being a flattening of it."""
    if len(shape) > len(target):
        return False
    pairs = zip(reversed(list(shape)), reversed(list(target)), strict=False)
    return all(s == 1 or s is t or s == t for s, t in pairs)


def _is_ids_size(index: GraphIndex, node: fx.Node) -> bool:
    """A batch or sequence size read off ``input_ids`` or the mask (both [batch, seq])."""
    return (
        node.op == "call_function"
        and node.target is aten.sym_size.int
        and node.args[0] in index.inputs
    )


# Cheap ops that only reshape or relabel one side tensor; copying them into each unit lets
# units share one side input (one mask, one cos/sin table) instead of one per layer.
_HOISTABLE = {
    aten.unsqueeze.default,
    aten.view.default,
    aten.reshape.default,
    aten.expand.default,
    aten.slice.Tensor,
    aten.logical_not.default,
    aten.bitwise_not.default,
    aten._to_copy.default,
    aten.alias.default,
    aten.clone.default,
    aten.squeeze.dim,
    aten.repeat_interleave.self_int,
    aten.split.Tensor,
    aten.select.int,
    aten.permute.default,
    aten.transpose.int,
    operator.getitem,
}


def _hoistable(index: GraphIndex, node: fx.Node, reach: set[fx.Node]) -> bool:
    """A side tensor made by a cheap op from another side tensor: use the parent instead."""
    if node.op != "call_function" or node.target not in _HOISTABLE:
        return False
    tensors = [p for p in node.all_input_nodes if p.op != "get_attr"]
    return (
        len(tensors) == 1
        and tensors[0] not in reach
        and tensors[0].op not in ("get_attr", "placeholder")
        and tensors[0] in index.on_ids
    )


def _classify(
    index: GraphIndex,
    inputs: Sequence[fx.Node],
    outputs: Sequence[fx.Node],
    reach: set[fx.Node],
    stream: set[fx.Node] | None,
    what: str,
    extra: set[fx.Node],
) -> tuple[set[fx.Node], list[fx.Node]]:
    """Walk back from ``outputs``: nodes to copy, and tensors that become side inputs."""
    copied: set[fx.Node] = set()
    side: set[fx.Node] = set()
    stack = list(outputs)
    while stack:
        node = stack.pop()
        if node in copied or node in side or node in inputs:
            continue
        if node in extra:  # a value of the encoder's output: an input of its own, held
            side.add(node)
            continue
        val = node.meta.get("val")
        external_tensor = (
            node not in reach
            and node.op != "get_attr"
            and node in index.on_ids
            and isinstance(val, torch.Tensor)
        )
        if external_tensor and _hoistable(index, node, reach):
            copied.add(node)
            stack.extend(node.all_input_nodes)
            continue
        if external_tensor or node in index.inputs:
            if stream is not None and node in stream:
                raise CaptureError(
                    f"{what} reads the residual stream at a second depth (through node "
                    f"'{node.name}'), so it is not a residual unit h + γ(h) of one stream",
                    module=module_scope(node),
                    node=node.name,
                )
            side.add(node)
            continue
        copied.add(node)
        if not _is_ids_size(index, node):
            stack.extend(node.all_input_nodes)
    return copied, sorted(side, key=index.order.__getitem__)


def is_add(node: fx.Node) -> bool:
    return (
        node.op == "call_function"
        and node.target in (aten.add.Tensor, operator.add)
        and len(node.args) == 2
        and node.kwargs.get("alpha", 1) == 1
    )
