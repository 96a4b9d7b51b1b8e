"""``jetgraph.emit``: an expansion traced into one batched, straight-line FX GraphModule.

The batched evaluator (:mod:`jetgraph.codegen.execute`) is traced by ``make_fx`` on an example
input: the Taylor interpreter, the schedule and all Python control flow disappear, leaving aten
ops only. Each unit's jet appears once, on its centres stacked along the batch dimension, and
Taylor-mode arithmetic is inlined as plain tensor code. Weights become buffers named after the
model's parameters, factory ops follow the input's device, and a guard checks the input shape the
code was specialised to.
"""

from __future__ import annotations

import functools
import re

import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import get_proxy_mode, make_fx

from jetgraph.codegen.execute import BatchedRun
from jetgraph.codegen.fuse import fuse
from jetgraph.codegen.schedule import Step, plan
from jetgraph.cost import DEFAULT_MAX_SECONDS, expansion_plan
from jetgraph.ir import ResidualProgram, as_input_ids, parameter_name
from jetgraph.passes.expansion import Expansion

RESERVED = ("target", "remainder")
STEP_META = "jetgraph_step"


def check_input(input_ids: torch.Tensor, shape: tuple[int, int]) -> None:
    """The emitted code's guard: it was specialised to one [batch, seq] shape."""
    if tuple(input_ids.shape) != tuple(shape):
        raise ValueError(f"this expansion was emitted for input_ids of shape {tuple(shape)}, got "
                         f"{tuple(input_ids.shape)}: emit it again for the new shape")



def emit(expansion: Expansion, input_ids: torch.Tensor | None = None, *,
         fuse_ops: bool = True, remainder: bool = True,
         max_seconds: float | None = DEFAULT_MAX_SECONDS) -> fx.GraphModule:
    """Lower ``expansion`` to one FX GraphModule ``forward(input_ids) -> dict``.

    The dict maps every term's path name to its tensor, plus ``"target"`` (the model's stream
    state or logits) and ``"remainder"`` (target − Σ terms). The code is specialised to the shape
    of ``input_ids`` (default: the program's capture example); ``gm.to(device)`` moves it.
    ``fuse_ops`` puts fused kernels back where the code runs decomposed LayerNorm or tanh-GELU
    forward (:mod:`jetgraph.codegen.fuse`); ``gm.fused`` counts them. ``remainder=False`` drops
    ``"target"`` and ``"remainder"`` and, where no jet needs it, the model's own forward (and its
    weights): order-0 paths then carry only the weights on the paths.

    Tracing runs the expansion once, so its cost is planned first (:func:`jetgraph.cost.
    expansion_plan`): past ``max_seconds`` (None: no limit) or the memory available it is refused
    with the estimate before anything runs.
    """
    if not isinstance(expansion, Expansion):
        raise TypeError(f"emit takes an Expansion (jetgraph.expand or expand_paths(...).expansion()), "
                        f"got {type(expansion).__name__}")
    prog = expansion.prog
    ids = _example_ids(prog, input_ids)
    what = f"emitted code for {len(expansion):,} terms"
    cost = expansion_plan(prog, len(expansion), ids, expansion.order, what, expansion.space)
    cost.check(max_seconds, "max_seconds (None: no limit)",
               memory_option="emit fewer terms or a shorter input")
    schedule = plan(expansion)
    names = [term.name for term in schedule.outputs]
    clash = set(names) & set(RESERVED)
    if clash:
        raise ValueError(f"term names {sorted(clash)} collide with the reserved outputs {RESERVED}")
    marks: list[tuple[fx.Node | None, Step]] = []

    def mark(step: Step) -> None:
        graph = get_proxy_mode().tracer.graph
        marks.append((next(iter(reversed(graph.nodes)), None), step))

    def forward(input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs, target, rest = BatchedRun(schedule, input_ids).run(on_step=mark, remainder=remainder)
        result = {name: outputs[i] for i, name in enumerate(names)}
        if remainder:
            result["target"] = target
            result["remainder"] = rest
        return result

    with torch.no_grad():  # index tables are made inside the trace (none is cached under it)
        traced = make_fx(forward, tracing_mode="real")(ids)
    _label_steps(traced.graph, marks)
    module = _with_named_buffers(traced, prog)
    module.fused = fuse(module.graph) if fuse_ops else {}
    module.graph.eliminate_dead_code()
    _follow_input_device(module.graph)
    _guard_shape(module.graph, tuple(ids.shape))
    module.recompile()
    module.term_names = tuple(names)
    module.input_shape = tuple(ids.shape)
    module.has_remainder = remainder
    module.schedule_summary = [step.label for step in schedule.steps]  # one line per batched step
    return module


def _example_ids(prog: ResidualProgram, input_ids: torch.Tensor | None) -> torch.Tensor:
    ids = input_ids if input_ids is not None else prog.example_input_ids
    if ids is None:
        raise ValueError("give input_ids: the program has no capture example to specialise the code to")
    return as_input_ids(ids)


def _label_steps(graph: fx.Graph, marks: list[tuple[fx.Node | None, Step]]) -> None:
    """Tag every node with the schedule step that produced it (for comments in emitted source)."""
    boundaries = {id(node): step for node, step in marks if node is not None}
    current = "side inputs and the model's own stream h_0..h_N"
    for node in graph.nodes:
        node.meta[STEP_META] = current
        if id(node) in boundaries:
            current = boundaries[id(node)].label
    for node in graph.nodes:  # the tail after the last step: gathering outputs and the remainder
        if node.op == "output":
            node.meta[STEP_META] = "outputs"


def _parameter_names(prog: ResidualProgram) -> dict[int, str]:
    """id(tensor) -> the model's own name for it, from every graph of the program (first wins)."""
    names: dict[int, str] = {}
    for module in prog.graph_modules():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            names.setdefault(id(tensor), parameter_name(module, name))
        for node in module.graph.nodes:
            if node.op == "get_attr":
                value = functools.reduce(getattr, node.target.split("."), module)
                if isinstance(value, torch.Tensor):
                    names.setdefault(id(value), parameter_name(module, node.target))
    return names


def _identifier(name: str) -> str:
    ident = re.sub(r"\W", "_", name).strip("_") or "const"
    return ident if not ident[0].isdigit() else f"w_{ident}"


def _with_named_buffers(traced: fx.GraphModule, prog: ResidualProgram) -> fx.GraphModule:
    """Rebuild the GraphModule with every constant as a buffer named after its parameter."""
    known = _parameter_names(prog)
    root = torch.nn.Module()
    taken: dict[str, int] = {}
    by_tensor: dict[int, str] = {}
    constants = 0
    for node in traced.graph.nodes:
        if node.op != "get_attr":
            continue
        value = getattr(traced, node.target)
        if id(value) not in by_tensor:
            if id(value) in known:
                base = _identifier(known[id(value)])
            else:
                base, constants = f"const{constants}", constants + 1
            name = base if base not in taken else f"{base}_{taken[base]}"
            taken[base] = taken.get(base, 0) + 1
            taken.setdefault(name, 1)
            tensor = value.detach() if isinstance(value, torch.Tensor) else value
            if isinstance(tensor, torch.Tensor):
                root.register_buffer(name, tensor)
            else:
                setattr(root, name, tensor)
            by_tensor[id(value)] = name
        node.target = by_tensor[id(value)]
    return fx.GraphModule(root, traced.graph, class_name="EmittedExpansion")


def _follow_input_device(graph: fx.Graph) -> None:
    """Replace device constants recorded while tracing by ``input_ids.device``."""
    placeholder = next(n for n in graph.nodes if n.op == "placeholder")
    device_node: fx.Node | None = None
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.kwargs.get("device"), torch.device):
            continue
        if device_node is None:
            with graph.inserting_after(placeholder):
                device_node = graph.call_function(getattr, (placeholder, "device"))
        node.kwargs = {**node.kwargs, "device": device_node}


def _guard_shape(graph: fx.Graph, shape: tuple[int, int]) -> None:
    placeholder = next(n for n in graph.nodes if n.op == "placeholder")
    with graph.inserting_after(placeholder):
        guard = graph.call_function(check_input, (placeholder, shape))
    guard.meta[STEP_META] = "check the input shape"

