"""``jetgraph.emit``: an expansion traced into one batched, straight-line FX GraphModule.

The batched evaluator (:mod:`jetgraph.codegen.execute`) is traced by ``make_fx`` on an example
input: the Taylor interpreter, the schedule and all Python control flow disappear, leaving aten
ops only. Each unit's jet appears once, on its centres stacked along the batch dimension, and
Taylor-mode arithmetic is inlined as plain tensor code. Weights become buffers named after the
model's parameters and factory ops follow the input's device.

The trace is symbolic in the batch and sequence length (the example is widened so that neither
is 0, 1 or equal to the other, which would specialise them), so one emitted module runs on any
``[batch, seq]`` up to the model's context, with an optional attention mask. A guard at the top
checks the input. Programs whose export had to fix the shapes (``prog.dynamic`` False) are traced
on the example as it is and refuse other shapes.
"""

from __future__ import annotations

import functools
import re

import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import get_proxy_mode, make_fx

from jetgraph.codegen.execute import BatchedRun
from jetgraph.codegen.fuse import fuse
from jetgraph.codegen.inline import InlineError, append_target
from jetgraph.codegen.modes import fell_back
from jetgraph.codegen.schedule import Step, plan
from jetgraph.cost import DEFAULT_MAX_SECONDS, expansion_plan
from jetgraph.ir import ResidualProgram, ResidualUnit, as_input_ids, parameter_name
from jetgraph.passes.expansion import Expansion

RESERVED = ("target", "remainder")
STEP_META = "jetgraph_step"


def check_input(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                shape: tuple[int | None, int | None]) -> torch.Tensor:
    """The emitted code's guard; returns the mask (all ones when None).

    ``shape`` is (batch, seq) for code specialised to one shape, or (None, max_seq) for code
    that runs on any batch and any sequence length up to ``max_seq`` (None: no limit).
    """
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be an integer tensor [batch, seq], got {input_ids.dtype} "
                         f"of shape {tuple(input_ids.shape)}")
    batch, seq = shape
    if batch is not None and tuple(input_ids.shape) != (batch, seq):
        raise ValueError(f"this expansion was emitted for input_ids of shape {(batch, seq)} (the model's "
                         f"export fixed the shape), got {tuple(input_ids.shape)}: emit it again for the "
                         "new shape")
    if batch is None and seq is not None and input_ids.shape[1] > seq:
        raise ValueError(f"input_ids has {input_ids.shape[1]} positions, more than the model's context "
                         f"of {seq}")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, the input ids "
                         f"{tuple(input_ids.shape)}: give one 0/1 entry per token")
    return attention_mask.long()



def emit(expansion: Expansion, input_ids: torch.Tensor | None = None, *,
         fuse_ops: bool = True, remainder: bool = True,
         max_seconds: float | None = DEFAULT_MAX_SECONDS, dynamic: bool | None = None) -> fx.GraphModule:
    """Lower ``expansion`` to one FX GraphModule ``forward(input_ids, attention_mask=None) -> dict``.

    The dict maps every term's path name to its tensor, plus ``"target"`` (the model's stream
    state or logits) and ``"remainder"`` (target − Σ terms). The code runs on any [batch, seq] up
    to the model's context (``gm.dynamic``; on the example's shape only when the program's export
    fixed it), padded as the optional ``attention_mask`` says. ``dynamic=False`` traces the
    example's shape only (about 2x faster to emit; the code then refuses other shapes).
    ``input_ids`` is the example it is traced on (default: the program's capture example);
    ``gm.to(device)`` moves it.
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

    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor, with_target: bool
                ) -> dict[str, torch.Tensor]:
        run = BatchedRun(schedule, input_ids, attention_mask)
        outputs, target, rest = run.run(on_step=mark, remainder=with_target)
        result = {name: outputs[i] for i, name in enumerate(names)}
        if with_target:
            result["target"] = target
            result["remainder"] = rest
        return result

    dynamic = prog.dynamic and (dynamic is None or dynamic)
    example = _symbolic_example(ids, prog.max_positions) if dynamic else ids
    # Without a jet that reads the stream, the target's forward is appended from the program's
    # own graphs (codegen.inline) instead of traced again: most of the trace's time otherwise.
    inline = remainder and not _reads_stream(expansion)
    appended: list[fx.Node] = []
    # Index tables are made inside the trace (none is cached under it). The fake-tensor cache
    # costs more than it saves here (most ops are traced once): without it tracing is 2x faster.
    with torch.no_grad(), torch._dynamo.config.patch(fake_tensor_cache_enabled=False), \
            prog.resident(_traced_units(expansion, remainder)):
        def trace(with_target: bool) -> fx.GraphModule:
            marks.clear()
            return make_fx(functools.partial(forward, with_target=with_target),
                           tracing_mode="symbolic" if dynamic else "real",
                           _allow_non_fake_inputs=True)(example, torch.ones_like(example))

        traced = trace(with_target=remainder and not inline)
        if inline:
            state = None if schedule.space == "logits" else schedule.target_state
            try:
                appended = append_target(traced, prog, state, names, example)
            except InlineError as error:
                fell_back("emit", "the model's forward could not be appended from its graphs and was "
                          "traced with the expansion", str(error))
                traced = trace(with_target=True)
        # the weights become buffers while still resident: a lazily read parameter released
        # afterwards holds NaN placeholders, not its values
        module = _with_named_buffers(traced, prog)
    _label_steps(module.graph, marks)
    for node in appended:
        node.meta[STEP_META] = "the model's own forward (target) and the remainder"
    module.fused = fuse(module.graph) if fuse_ops else {}
    module.graph.eliminate_dead_code()
    _follow_input_device(module.graph)
    guard = (None, prog.max_positions) if dynamic else tuple(ids.shape)
    _guard_input(module.graph, guard)
    module.recompile()
    module.term_names = tuple(names)
    module.dynamic = dynamic
    module.input_shape = guard
    module.has_remainder = remainder
    module.schedule_summary = [step.label for step in schedule.steps]  # one line per batched step
    return module


def _reads_stream(expansion: Expansion) -> bool:
    """Whether a term reads the model's own stream (a stream term, or a jet of order ≥ 1)."""
    return any(t.kind == "stream" or (t.kind != "source" and t.order >= 1) for t in expansion.nodes)


def _traced_units(expansion: Expansion, remainder: bool) -> list[ResidualUnit]:
    """The units whose weights the trace reads: every unit when it runs the model's own forward
    (the target, or the stream a jet of order ≥ 1 or a stream term reads), else the terms' own.
    A lazily read program holds them in memory for the whole trace: the emitted module keeps
    them as buffers, and weights cannot be swapped in and out while make_fx traces."""
    prog = expansion.prog
    if remainder or _reads_stream(expansion):
        return list(prog.units)
    units = {id(t.unit): t.unit for t in expansion.nodes if isinstance(t.unit, ResidualUnit)}
    return list(units.values())


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
        value = functools.reduce(getattr, node.target.split("."), traced)
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


def _symbolic_example(ids: torch.Tensor, max_positions: int | None) -> torch.Tensor:
    """``ids`` widened to a batch and a sequence length that are at least 2 and differ: make_fx
    specialises sizes 0 and 1, and gives equal sizes one symbol."""
    batch, seq = ids.shape
    if seq < 2:
        ids, seq = ids.repeat(1, 2), 2 * seq
    if max_positions is not None and seq > max_positions:
        ids, seq = ids[:, :max_positions], max_positions
    target = max(batch, 2)
    if target == seq:
        target += 1
    rows = ids.repeat((target + batch - 1) // batch, 1)[:target]
    return rows.contiguous()


def _guard_input(graph: fx.Graph, shape: tuple[int | None, int | None]) -> None:
    """Check the input first; the mask becomes optional (all ones when not given)."""
    ids, mask = [n for n in graph.nodes if n.op == "placeholder"]
    for node, name in ((ids, "input_ids"), (mask, "attention_mask")):
        node.target = name
        node._rename(name)
    mask.args = (None,)  # the placeholder's default value
    with graph.inserting_after(mask):
        guard = graph.create_node("call_function", check_input, (ids, mask, shape), name="mask")
    mask.replace_all_uses_with(guard, delete_user_cb=lambda user: user is not guard)
    guard.meta[STEP_META] = "check the input"

