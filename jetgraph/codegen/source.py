"""``jetgraph.emit_source``: an expansion as a standalone Python module plus a weights file.

The module imports only ``torch`` and ``safetensors``. It holds one ``nn.Module`` whose forward is
the emitted graph printed as straight-line aten calls, with a comment at every schedule step
(which unit, how many centres, which terms) and ``del`` where a value dies, so memory is freed as
early as in the GraphModule. The same expansion and input shape give the same bytes.
"""

from __future__ import annotations

import inspect
import math
import operator
from pathlib import Path

import torch
from torch import fx

from jetgraph._version import __version__
from jetgraph.codegen.trace import STEP_META, check_input, emit
from jetgraph.cost import DEFAULT_MAX_SECONDS
from jetgraph.errors import JetgraphError
from jetgraph.files import atomic_write
from jetgraph.passes.expansion import Expansion


class CodegenError(JetgraphError):
    """The emitted graph holds something the source printer cannot spell."""


def emit_source(expansion: Expansion, path: str | Path, input_ids: torch.Tensor | None = None, *,
                fuse_ops: bool = True, remainder: bool = True,
                max_seconds: float | None = DEFAULT_MAX_SECONDS, dynamic: bool | None = None) -> Path:
    """Write ``expansion`` as ``path`` (a .py module) and its weights as ``path`` with the
    suffix ``.safetensors``; returns the module's path.

    ``import`` the module and call ``load(device)``; the model maps ``input_ids`` [batch, seq]
    (and an optional ``attention_mask``) to a dict of term tensors plus ``"target"`` and
    ``"remainder"`` (unless ``remainder=False``, see :func:`jetgraph.emit`, which also plans the
    cost first and says which shapes the code accepts).
    """
    path = Path(path)
    if path.suffix != ".py":
        raise ValueError(f"emit_source writes a .py module, got {path.name!r}")
    if not path.stem.isidentifier():
        raise ValueError(f"{path.name!r} cannot be imported: the file name must be a Python identifier")
    module = emit(expansion, input_ids, fuse_ops=fuse_ops, remainder=remainder, max_seconds=max_seconds,
                  dynamic=dynamic)
    weights = _weights(module)
    source = render(module, expansion, weights_file=path.with_suffix(".safetensors").name)
    payload = _serialise(weights)  # everything is built before anything is written
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path.with_suffix(".safetensors"), payload)
    atomic_write(path, source.encode())
    return path


# ------------------------------------------------------------------ printing
def render(module: fx.GraphModule, expansion: Expansion, weights_file: str) -> str:
    """The module's source text."""
    graph = module.graph
    buffers = dict(module.named_buffers())
    last_use = _last_uses(graph)
    lines: list[str] = []
    step = None
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        label = node.meta.get(STEP_META)
        if label != step and label:
            lines.append("")
            lines.append(f"# ── {label}")
            step = label
        lines.append(_statement(node))
        dead = [n.name for n in last_use.get(node, []) if n.op not in ("get_attr",)]
        if not node.users and node.op == "call_function":
            dead.append(node.name)
        if dead:
            lines.append(f"del {', '.join(sorted(set(dead)))}")
    output = next(n for n in graph.nodes if n.op == "output")
    result = output.args[0]
    lines.append("")
    lines.append("# ── outputs: one tensor per term" + (", the model's own value and the remainder"
                                                       if module.has_remainder else ""))
    lines.append("return {")
    for name, value in result.items():
        lines.append(f"    {name!r}: {_expr(value)},")
    lines.append("}")
    body = "\n".join(f"        {line}" if line else "" for line in lines)
    return _TEMPLATE.format(
        doc=_docstring(module, expansion, weights_file, buffers),
        shape=tuple(module.input_shape),
        terms="\n".join(f"    {name!r}," for name in module.term_names),
        weights_file=weights_file,
        check=inspect.getsource(check_input).strip(),
        inputs=", ".join(f"{n.name}: torch.Tensor" + (" | None = None" if n.args else "")
                         for n in graph.nodes if n.op == "placeholder"),
        body=body,
    )


_TEMPLATE = '''"""{doc}"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

INPUT_SHAPE = {shape}  # (batch, seq) it was specialised to, or (None, the longest seq allowed)
TERMS = (
{terms}
)


{check}


class ExpandedModel(torch.nn.Module):
    """The expansion as one straight-line forward:
    (input_ids, attention_mask=None) -> {{term: tensor, "target", "remainder"}}."""

    def __init__(self, weights: str | None = None) -> None:
        super().__init__()
        path = weights or os.path.join(os.path.dirname(os.path.abspath(__file__)), {weights_file!r})
        for name, tensor in load_file(path).items():
            self.register_buffer(name, tensor)

    def forward(self, {inputs}) -> dict[str, torch.Tensor]:
{body}


def load(device: str | torch.device = "cpu", weights: str | None = None) -> ExpandedModel:
    """The model with its weights (from the .safetensors file beside this module) on ``device``."""
    return ExpandedModel(weights).to(device).eval()
'''


def _docstring(module: fx.GraphModule, expansion: Expansion, weights_file: str,
               buffers: dict[str, torch.Tensor]) -> str:
    prog = expansion.prog
    size = sum(t.numel() * t.element_size() for t in buffers.values())
    unit_lines = [f"    {u.name:<10} {u.kind:<4} {u.module_path}" for u in prog.units]
    step_lines = [f"    {line}" for line in module.schedule_summary]
    fused = ", ".join(f"{k} x{v}" for k, v in module.fused.items() if v) or "none"
    return "\n".join([
        f"{expansion!r} of {prog.model_class}, emitted by jetgraph {__version__}. Do not edit.",
        "",
        f"{len(module.term_names)} terms in {expansion.space} space; " + _shapes(module) + ".",
        f"Term weights: {term_weights(expansion)}.",
        f"Weights: {weights_file} beside this file ({len(buffers)} tensors, {size / 1e6:.1f} MB).",
        "",
        "Usage:",
        "    model = load('cpu')  # or 'cuda'",
        "    out = model(input_ids)  # {term name: tensor, 'target': ..., 'remainder': ...}",
        "    out = model(input_ids, attention_mask)  # a padded batch (1 = token, 0 = padding)",
        "'remainder' is target - sum of the outputs: the exact Taylor remainder when the terms",
        "expand the model (e.g. a full expansion), a plain difference for a selection of paths.",
        "",
        f"Units of the {prog.granularity} view (name, kind, module):",
        *unit_lines,
        "",
        "Schedule (each step is one batched call):",
        *step_lines,
        f"Fused forward kernels: {fused}.",
        "",
    ])


def _shapes(module: fx.GraphModule) -> str:
    batch, seq = module.input_shape
    if batch is not None:
        return f"specialised to input_ids of shape {(batch, seq)} (the model's export fixed the shape)"
    limit = f"up to the model's context of {seq}" if seq is not None else "of any length"
    return f"runs on input_ids [batch, seq] of any batch and sequence length {limit}"


# Python operators on sizes (the trace is symbolic in batch and sequence length).
_OPERATORS = {operator.mul: "*", operator.add: "+", operator.sub: "-", operator.floordiv: "//",
              operator.mod: "%", operator.truediv: "/"}


# min/max of sizes (a window clipped to the sequence length): Python's own on plain ints.
_SIZE_FUNCTIONS = {torch.sym_min: "min", torch.sym_max: "max"}


def _statement(node: fx.Node) -> str:
    target = node.target
    args, kwargs = node.args, node.kwargs
    if target is operator.getitem:
        return f"{node.name} = {_expr(args[0])}[{_expr(args[1])}]"
    if target is getattr:
        return f"{node.name} = {_expr(args[0])}.{args[1]}"
    if target in _OPERATORS:
        return f"{node.name} = {_expr(args[0])} {_OPERATORS[target]} {_expr(args[1])}"
    if target in _SIZE_FUNCTIONS:
        return f"{node.name} = {_SIZE_FUNCTIONS[target]}({', '.join(_expr(a) for a in args)})"
    if target is check_input:
        return f"{node.name} = check_input({', '.join(_expr(a) for a in args)})"
    if isinstance(target, torch._ops.OpOverload):
        parts = [_expr(a) for a in args] + [f"{k}={_expr(v)}" for k, v in kwargs.items()]
        return f"{node.name} = torch.ops.{target}({', '.join(parts)})"
    raise CodegenError(f"cannot print node {node.name!r} calling {target!r}: the source printer "
                       "handles aten ops, getitem, getattr, arithmetic on sizes and the input check")


def _expr(value: object) -> str:
    if isinstance(value, fx.Node):
        return f"self.{value.target}" if value.op == "get_attr" else value.name
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return repr(value)
    if isinstance(value, float):
        if math.isinf(value):
            return 'float("inf")' if value > 0 else '-float("inf")'
        return 'float("nan")' if math.isnan(value) else repr(value)
    if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
        return str(value)
    if isinstance(value, torch.device):
        return f"torch.device({str(value)!r})"
    if isinstance(value, list):
        return "[" + ", ".join(_expr(v) for v in value) + "]"
    if isinstance(value, tuple):
        inner = ", ".join(_expr(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    raise CodegenError(f"cannot print a constant of type {type(value).__name__} ({value!r})")


def _last_uses(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """node -> the values whose last use is that node (the output keeps its own)."""
    seen: set[fx.Node] = set()
    dying: dict[fx.Node, list[fx.Node]] = {}
    for node in reversed(graph.nodes):
        if node.op == "output":
            fx.node.map_arg(node.args, seen.add)
            continue
        for used in node.all_input_nodes:
            if used not in seen:
                seen.add(used)
                dying.setdefault(node, []).append(used)
    return dying


# ------------------------------------------------------------------- weights
def _weights(module: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Buffers as contiguous CPU tensors that share no memory (safetensors refuses aliases)."""
    weights: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in module.named_buffers():
        tensor = tensor.detach().cpu()
        key = tensor.untyped_storage().data_ptr()
        if key in storages or not tensor.is_contiguous() or tensor.storage_offset() or \
                tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.contiguous().clone()
        storages.add(tensor.untyped_storage().data_ptr())
        weights[name] = tensor
    return weights


def _serialise(weights: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(weights, metadata={"format": "pt"})  # one key: safetensors orders a map at random


def term_weights(expansion: Expansion) -> str:
    """What the outputs' scale means: unit weights (each output is the path's own value) or the
    weights each term was built with (its last step's, and those inside it)."""
    last, inner = set(), set()
    for term in expansion.terms:
        chain = term.chain()  # the path's terms, source first
        if any(isinstance(node.weight, torch.Tensor) for node in chain):
            return "tensor weights (each output is its term computed with the given weights)"
        last.add(float(chain[-1].weight))
        inner.update(float(node.weight) for node in chain[:-1])
    if last == {1.0} and inner <= {1.0}:
        return "unit (each output is the path's own value: a bigram path's logits as ngram_table reads them)"
    described = f"the last step's weight is {_span(last)}"
    if inner - {1.0}:
        described += (f", and earlier steps carry {_span(inner)} inside the later units (a norm "
                      "undoes such a scale, so outputs are not simply their product)")
    return f"not unit: {described}; e.g. uniform weights 1/N per unit"


def _span(values: set[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.4g}" if low == high else f"{low:.4g}..{high:.4g}"
