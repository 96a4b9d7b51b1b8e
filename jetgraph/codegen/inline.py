"""The model's own forward appended to emitted code as FX nodes, without tracing it again.

``emit`` traces the expansion with ``make_fx`` on symbolic shapes, where every op costs a
fake-tensor dispatch. When no jet reads the model's stream (order-0 paths), the only reason to
run the model's forward in that trace is the ``target`` (and so the ``remainder``), and tracing
it was most of the time ``emit`` took (3.5 of 4.5 s on a tiny model). The program's graphs are
already aten graphs from ``torch.export``, so here they are traced with plain ``torch.fx``
proxies (no fake tensors, no shape arithmetic: about 0.1 s) and their nodes copied into the
emitted graph. Anything the proxy trace cannot follow raises :class:`InlineError`, and ``emit``
traces the forward as before, with a warning that says why.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from jetgraph.ir import ResidualProgram

PREFIX = "_jetgraph_model"


# what else the program's graphs may call: indexing and arithmetic on sizes
SIZE_OPS = {operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod,
            operator.neg, operator.truediv, getattr}


class InlineError(RuntimeError):
    """The program's forward could not be traced with FX proxies."""


class _Forward(nn.Module):
    """``forward(input_ids, attention_mask)``: the program's logits (``state`` None) or its
    stream state ``state``, with every graph of the program registered as a submodule (the
    tracer follows calls only into installed modules)."""

    def __init__(self, prog: ResidualProgram, state: int | None) -> None:
        super().__init__()
        self.prog, self.state = prog, state
        for index, module in enumerate(prog.graph_modules()):
            self.add_module(f"graph{index}", module)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        prog = self.prog
        mask = attention_mask  # emitted code checks it first (int64, the ids' shape)
        side = {}
        if prog.side.names:
            values = prog.side.graph_module.forward(input_ids, mask)
            side = dict(zip(prog.side.names, values, strict=True))
        h = prog.encoder(input_ids, mask)
        states = [h]
        for block in prog.blocks:
            h = prog._run_block(block, h, side, prog.granularity, states)
        if self.state is not None:
            return states[self.state]
        return prog.decoder(h, side)


class _Tracer(fx.Tracer):
    """Traces into every module (the program's graphs are not leaves)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return False


# Python arithmetic the IR does on tensors (h + γ(h)), as the aten ops make_fx would record
TENSOR_OPS = {operator.add: torch.ops.aten.add.Tensor, operator.sub: torch.ops.aten.sub.Tensor,
              operator.mul: torch.ops.aten.mul.Tensor}


def forward_graph(prog: ResidualProgram, state: int | None, example: torch.Tensor) -> fx.GraphModule:
    """The program's forward (logits, or stream state ``state``) as one FX graph of aten ops.

    It is run once on ``example`` ids to tell tensors from sizes: Python arithmetic on tensors
    becomes aten ops, and anything else that is not an aten op, ``getitem`` or size arithmetic
    is refused (:class:`InlineError`), as the source printer would refuse it."""
    root = _Forward(prog, state)
    try:
        graph = _Tracer().trace(root)
        module = fx.GraphModule(root, graph)
        ShapeProp(module).propagate(example, torch.ones_like(example))
    except Exception as error:
        raise InlineError(f"{type(error).__name__}: {error}") from error
    for node in graph.nodes:
        if node.op == "call_method" or node.op == "call_module":
            raise InlineError(f"the trace holds a {node.op} node ({node.target})")
        if node.op != "call_function" or isinstance(node.target, torch._ops.OpOverload):
            continue
        if node.target in TENSOR_OPS and "tensor_meta" in node.meta:
            node.target = TENSOR_OPS[node.target]
        elif node.target not in SIZE_OPS:
            name = getattr(node.target, "__name__", node.target)
            raise InlineError(f"the trace calls {name}, not an aten op")
    module.recompile()
    return module


def append_target(module: fx.GraphModule, prog: ResidualProgram, state: int | None,
                  names: list[str], example: torch.Tensor) -> list[fx.Node]:
    """Add ``"target"`` (the program's logits or stream state) and ``"remainder"`` (target − the
    sum of the terms, in their order) to ``module``'s output dict; returns the nodes added.

    ``module`` is the ``make_fx`` trace of ``forward(input_ids, attention_mask) -> {term: tensor}``
    with the terms ``names`` in order; ``example`` is the ids it was traced on.
    Its weights (and the forward's) are read through ``get_attr`` nodes, as the trace's are."""
    forward = forward_graph(prog, state, example)
    graph = module.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    theirs = [n for n in forward.graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    outputs = dict(output.args[0])
    before = set(graph.nodes)
    module.add_module(PREFIX, forward)
    with graph.inserting_before(output):
        value_map: dict[fx.Node, fx.Node] = dict(zip(theirs, placeholders, strict=True))
        target = graph.graph_copy(forward.graph, value_map)
        for node in value_map.values():
            if node.op == "get_attr" and node not in before:
                node.target = f"{PREFIX}.{node.target}"
        terms = graph.call_function(torch.ops.aten.stack.default, ([outputs[name] for name in names],))
        total = graph.call_function(torch.ops.aten.sum.dim_IntList, (terms, [0]))
        rest = graph.call_function(torch.ops.aten.sub.Tensor, (target, total))
    output.args = ({**outputs, "target": target, "remainder": rest},)
    return [n for n in graph.nodes if n not in before]
