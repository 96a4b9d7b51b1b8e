"""Capture in time independent of depth: blocks with the same code share one exported graph.

``torch.export`` of a whole model costs time in proportion to its depth, yet a transformer's
blocks are usually one class run with different weights. Here the model's stack of blocks (the
``nn.ModuleList`` of one class holding most parameters, found from the module tree) is grouped
by *structure*: everything that differs between blocks and that jetgraph can see, namely class,
every plain attribute of every submodule (a sliding window, an attention type), parameter
shapes and dtypes, and every *per-layer config entry*: any list or tuple in a ``config`` of the
model (nested dicts and sub-configs included) whose length is the number of blocks holds block
i's value at entry i (``layer_types``). An attribute or entry that equals the block's own index
in every block (its ``layer_idx``) is not structure. The model is exported with one
representative block per group; while it is, each per-layer config list reads, at position j
of the truncated stack, the entry of representative j's own layer (restored afterwards), since
a forward may pick a block's mask or RoPE table by its position in the stack. The program is
lifted, and every block becomes a copy of its representative's graph bound to its own weights.

The result is checked whole: it must reproduce the full model's logits on the example, like
any capture. When it does not (code that branches on the layer index, per-layer state the key
cannot see) or the model has no such stack, :func:`capture_shared` returns None and the caller
exports the whole model.

A model read lazily from safetensors (:mod:`.lazy`) is captured the same way with only the
representatives and the parts outside the stack in memory. Its check is whole too: the model's
own forward and the program's each stream every block through memory once
(:meth:`.lazy.LazyWeights.streaming`), so capture costs two forwards that read every weight,
with one block plus the encoder and decoder in memory at a time. On a mismatch it is captured
again with one group per block (each block its own exported graph; every weight is resident
during that export) and checked again; if that fails too, :class:`CaptureError` says by how
much. It never binds a program that computes another model.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import re
from collections.abc import Hashable, Iterator

import torch
from torch import fx, nn

from jetgraph.capture.export import CapturedGraph, LogitsWrapper, export_model
from jetgraph.capture.lazy import lazy_weights
from jetgraph.capture.lift import lift, name_units
from jetgraph.errors import CaptureError
from jetgraph.ir import (
    PARAMETER_NAME,
    ResidualProgram,
    ResidualUnit,
    parameter_name,
    parameter_names,
    unit_name,
)
from jetgraph.padding import mask_or_full
from jetgraph.precision import capture_tolerance, dtype_name

WRAPPER_PREFIX = "m."  # what LogitsWrapper puts before the model's own parameter names


@dataclasses.dataclass
class BlockStack:
    """The model's stack of blocks: where it is, and each block's representative."""

    path: str  # "model.layers"
    blocks: nn.ModuleList
    representatives: list[int]  # block indices exported, one per structure group
    group_of: list[int]  # block i -> position of its representative in ``representatives``
    per_layer: list[PerLayerEntry] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class PerLayerEntry:
    """A config list with one entry per block: ``holder[key]`` (a dict) or ``holder.key``."""

    holder: object
    key: str
    path: str  # "config.layer_types", "config.rope_parameters.factors" (for messages)

    def get(self) -> list | tuple:
        return self.holder[self.key] if isinstance(self.holder, dict) else getattr(self.holder, self.key)

    def set(self, value: list | tuple) -> None:
        if isinstance(self.holder, dict):
            self.holder[self.key] = value
        else:
            setattr(self.holder, self.key, value)


def per_layer_config(model: nn.Module, layers: int) -> list[PerLayerEntry]:
    """Every list or tuple of length ``layers`` in the configs of ``model``'s modules (their
    ``config`` attributes, nested dicts and sub-configs included): block i's entry is its value."""
    found: list[PerLayerEntry] = []
    seen: set[int] = set()

    def walk(holder: object, items: Iterator[tuple[object, object]], path: str) -> None:
        for key, value in items:
            if not isinstance(key, str) or key.startswith("_"):
                continue
            if isinstance(value, (list, tuple)) and len(value) == layers:
                found.append(PerLayerEntry(holder, key, f"{path}.{key}"))
            elif isinstance(value, dict) or _config_like(value):
                visit(value, f"{path}.{key}")

    def visit(value: object, path: str) -> None:
        if id(value) in seen:
            return
        seen.add(id(value))
        walk(value, iter(list(value.items() if isinstance(value, dict) else vars(value).items())), path)

    for module in model.modules():
        config = getattr(module, "config", None)
        if _config_like(config):
            visit(config, "config")
    return found


def _config_like(value: object) -> bool:
    """A configuration object (a Hugging Face config, anything with ``to_dict`` and attributes)."""
    return (hasattr(value, "to_dict") and hasattr(value, "__dict__")
            and not isinstance(value, (type, nn.Module)))


def _hashable(value: object) -> Hashable:
    """``value`` as a hashable key (dicts and lists as sorted tuples; others by ``repr``)."""
    if isinstance(value, dict):
        return tuple(sorted((repr(k), _hashable(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value if _plain(value) else repr(value)


def structure_keys(blocks: nn.ModuleList, per_layer: list[PerLayerEntry]) -> list[Hashable]:
    """One key per block; blocks with equal keys share one exported graph (the module docstring
    says what goes into it)."""
    described = [_describe(block) for block in blocks]
    for entry in per_layer:
        for i, value in enumerate(entry.get()):
            described[i][("config", entry.path)] = _hashable(value)
    counters = {key for key in described[0] if all(d.get(key) == i for i, d in enumerate(described))}
    keys: list[Hashable] = []
    for block, attributes in zip(blocks, described, strict=True):
        tensors = tuple((name, tuple(t.shape), t.dtype)
                        for name, t in [*block.named_parameters(), *block.named_buffers()])
        keys.append((tuple(sorted((k, v) for k, v in attributes.items() if k not in counters)), tensors))
    return keys


def streamed_forward(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """A context in which ``model``'s own forward runs right when it was read lazily
    (:func:`~jetgraph.capture.lazy.load_lazy`): its block stack streams one block at a time and
    the rest stays in memory. For a model in memory, nothing to do."""
    weights = lazy_weights(model)
    if weights is None:
        return contextlib.nullcontext()
    stack = find_block_stack(model, per_block=True)
    return weights.streaming(model, stack.blocks if stack is not None else [])


def find_block_stack(model: nn.Module, *, per_block: bool = False) -> BlockStack | None:
    """The ``nn.ModuleList`` of one module class with the most parameters, grouped by structure
    (:func:`structure_keys`), or with one group per block when ``per_block``; None when there is
    none, or when every block differs and not ``per_block`` (nothing to share)."""
    best: tuple[str, nn.ModuleList, int] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2 and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > 0 and (best is None or size > best[2]):
                best = (name, module, size)
    if best is None:
        return None
    path, blocks, _ = best
    per_layer = per_layer_config(model, len(blocks))
    if per_block:
        return BlockStack(path, blocks, list(range(len(blocks))), list(range(len(blocks))), per_layer)
    groups: dict[Hashable, int] = {}
    representatives: list[int] = []
    group_of: list[int] = []
    for index, key in enumerate(structure_keys(blocks, per_layer)):
        if key not in groups:
            groups[key] = len(representatives)
            representatives.append(index)
        group_of.append(groups[key])
    if len(representatives) == len(blocks):
        return None
    return BlockStack(path, blocks, representatives, group_of, per_layer)


def _describe(block: nn.Module) -> dict[tuple[str, str], Hashable]:
    """(submodule, attribute) -> value for every submodule's class and plain attributes."""
    attributes: dict[tuple[str, str], Hashable] = {}
    for name, module in block.named_modules():
        attributes[(name, "__class__")] = type(module).__qualname__
        for key, value in vars(module).items():
            if not key.startswith("_") and _plain(value):
                attributes[(name, key)] = value  # type: ignore[assignment]
    return attributes


def _plain(value: object) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, tuple) and all(_plain(v) for v in value)


class Mismatch(CaptureError):
    """The bound program does not compute the model (its logits differ from the whole model's)."""


def capture_shared(model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   granularity: str) -> ResidualProgram | None:
    """Capture ``model`` exporting one block per structure group (see the module docstring), or
    None when the model has no stack of repeated blocks or the shared program is not exact.

    A lazily read model is checked by streaming (two forwards over every weight), falls back to
    one graph per block on a mismatch, and raises :class:`CaptureError` when that is not exact
    either; it gives None only when it has no stack of blocks at all."""
    weights = lazy_weights(model)
    stack = find_block_stack(model)
    if weights is None:
        if stack is None:
            return None
        try:
            return _capture_stack(model, stack, ids, attention_mask, granularity)
        except CaptureError:
            return None  # the caller exports the whole model
    per_block = find_block_stack(model, per_block=True)
    if per_block is None:
        return None
    if stack is None:  # every block differs: one group per block from the start
        return _capture_stack(model, per_block, ids, attention_mask, granularity)
    try:
        return _capture_stack(model, stack, ids, attention_mask, granularity)
    except Mismatch as grouped:  # grouped wrongly: one graph per block, checked again
        try:
            return _capture_stack(model, per_block, ids, attention_mask, granularity)
        except CaptureError as exc:
            raise CaptureError(
                "the model read lazily could not be captured exactly: with blocks shared by "
                f"structure, {_reason(grouped)}; and not even with one exported graph per block: "
                f"{_reason(exc)}",
                model_class=type(model).__name__) from exc


def _capture_stack(model: nn.Module, stack: BlockStack, ids: torch.Tensor,
                   attention_mask: torch.Tensor | None, granularity: str) -> ResidualProgram:
    """Export ``model`` with ``stack``'s representatives, bind every block, and check the program
    against the whole model (:func:`_check_whole`): :class:`Mismatch` when the program is not
    the model, CaptureError when the export or lift fails."""
    wrapper = LogitsWrapper(model)
    parent_path, _, attribute = stack.path.rpartition(".")
    parent = model.get_submodule(parent_path)
    weights = lazy_weights(model)
    needed = _representative_weights(model, stack) if weights is not None else []
    with weights.resident(needed) if weights is not None else contextlib.nullcontext():
        try:
            with _representatives_config(stack):
                setattr(parent, attribute, nn.ModuleList([stack.blocks[i] for i in stack.representatives]))
                captured = export_model(model, ids, attention_mask)
                program = lift(captured)
        finally:
            setattr(parent, attribute, stack.blocks)
    if len(program.blocks) != len(stack.representatives):
        raise Mismatch(f"the exported stack of {len(stack.representatives)} blocks lifted into "
                       f"{len(program.blocks)} blocks", model_class=type(model).__name__)
    if len(stack.representatives) < len(stack.blocks):  # some block will be bound to another's graph
        _check_own_weights(program, stack, type(model).__name__)
    full = name_units(_bind_blocks(program, stack, wrapper))  # kinds are the representatives' (same code)
    outside = _names_outside_blocks(full)
    if weights is not None:
        full = full.replace(weights=weights)
    with weights.resident(outside) if weights is not None else contextlib.nullcontext():
        _check_whole(model, stack, full, captured)
    if weights is not None:  # the encoder, side inputs and decoder stay in memory
        weights.pin(outside)
    return full.at(granularity)  # type: ignore[arg-type]


@contextlib.contextmanager
def _representatives_config(stack: BlockStack) -> Iterator[None]:
    """Inside, position j of each per-layer config list holds representative j's own entry
    (the others are unchanged), so that a forward that picks a block's mask or RoPE table by
    its position in the truncated stack picks its original layer's; restored on the way out."""
    originals = [(entry, entry.get()) for entry in stack.per_layer]
    try:
        for entry, values in originals:
            replaced = list(values)
            for position, layer in enumerate(stack.representatives):
                replaced[position] = values[layer]
            entry.set(type(values)(replaced))
        yield
    finally:
        for entry, values in reversed(originals):
            entry.set(values)


def _check_whole(model: nn.Module, stack: BlockStack, program: ResidualProgram,
                 captured: CapturedGraph) -> None:
    """The bound program must give the whole model's logits on the example, within the bound
    :func:`verify` uses (:func:`capture_tolerance` of the logits' scale), else :class:`Mismatch`.
    A lazily read model's forward streams its blocks (:meth:`LazyWeights.streaming`), and so does
    the program's: two forwards over every weight, one block resident at a time."""
    wrapper = LogitsWrapper(model)
    wrapper.takes_positions = captured.passes_positions  # as the export decided
    weights = lazy_weights(model)
    ids, mask = captured.example_input_ids, captured.example_attention_mask
    streaming = weights.streaming(model, stack.blocks) if weights is not None else contextlib.nullcontext()
    with torch.no_grad(), streaming:
        reference = wrapper(ids, mask_or_full(mask, ids))
    with torch.no_grad():
        logits = program(ids, mask)
    same_shape = logits.shape == reference.shape
    error = (logits.float() - reference.float()).abs().max().item() if same_shape else float("inf")
    tolerance = capture_tolerance(reference.dtype) * max(1.0, reference.float().abs().max().item())
    if not error <= tolerance:  # verify's bound
        raise Mismatch(f"the bound program's {dtype_name(reference.dtype)} logits differ from the whole "
                       f"model's on the example (max abs error {error:.3g} > {tolerance:.3g})",
                       model_class=captured.model_class)


def _reason(exc: CaptureError) -> str:
    """The error's message without its ``[model …]`` prefix (for quoting it in another)."""
    text = str(exc)
    return text.split("] ", 1)[1] if text.startswith("[") and "] " in text else text


def _check_own_weights(program: ResidualProgram, stack: BlockStack, model_class: str) -> None:
    """Each lifted block reads the weights of its own block of the stack only, and nothing else
    reads the stack's: binding copies block j's graph onto layer ℓ's weights, which is wrong for
    a unit that also reads another layer's (a post-norm skip whose norm belongs to the layer
    before) even when the logits come out close. :class:`Mismatch` names the first one."""
    inside = re.compile(re.escape(f"{WRAPPER_PREFIX}{stack.path}.") + r"(\d+)\.|" +
                        re.escape(f"{stack.path}.") + r"(\d+)\.")

    def layers(names: list[str]) -> set[int]:
        found = (inside.match(name) for name in names)
        return {int(m.group(1) or m.group(2)) for m in found if m}

    for position, block in enumerate(program.blocks):
        others = layers(parameter_names(block.graph_module)) - {position}
        if others:
            raise Mismatch(f"block {position} of the exported stack reads the weights of another block "
                           f"({sorted(others)})", model_class=model_class)
    side = program.side.graph_module
    # a side input may read a block's buffers (GPT-Neo's per-group causal masks: equal within a
    # group), never its learned weights (attention sinks: one per layer)
    learned_side = [parameter_name(side, n.target) for n in side.graph.nodes
                    if n.op == "get_attr" and isinstance(_attribute(side, n.target), nn.Parameter)]
    for names in (parameter_names(program.encoder.graph_module),
                  parameter_names(program.decoder.graph_module), learned_side):
        if layers(names):
            raise Mismatch("a part outside the blocks reads the weights of the block stack",
                           model_class=model_class)


def _representative_weights(model: nn.Module, stack: BlockStack) -> list[str]:
    """Names of the parameters outside the block stack and in its representative blocks."""
    keep = tuple(f"{stack.path}.{i}." for i in stack.representatives)
    inside = f"{stack.path}."
    return [name for name, _ in model.named_parameters(remove_duplicate=False)
            if not name.startswith(inside) or name.startswith(keep)]


def _names_outside_blocks(program: ResidualProgram) -> list[str]:
    modules = [program.encoder.graph_module, program.encoder.addends_module, program.side.graph_module,
               program.decoder.graph_module]
    if program.decoder.norm is not None:
        modules.append(program.decoder.norm.graph_module)
    return [name for module in modules for name in parameter_names(module)]


def _bind_blocks(program: ResidualProgram, stack: BlockStack, wrapper: nn.Module) -> ResidualProgram:
    """Every block of the stack as its representative's units, bound to its own weights."""
    templates: dict[int, _Template] = {}

    def bound(unit: ResidualUnit, group: int, layer: int) -> fx.GraphModule:
        if id(unit) not in templates:
            templates[id(unit)] = _Template(unit.graph_module, stack.path, group)
        return templates[id(unit)].bind(layer, wrapper)

    blocks: list[ResidualUnit] = []
    leaf_index = 0
    for layer, group in enumerate(stack.group_of):
        source = program.blocks[group]
        rename = _Renamer(stack.path, group, layer)
        children = []
        first = leaf_index
        for child in source.children:
            children.append(ResidualUnit(bound(child, group, layer), child.side_inputs, program.side,
                                         kind=child.kind, layer=layer,
                                         module_path=rename.path(child.module_path), index=leaf_index,
                                         reads=first if source.parallel else leaf_index))
            leaf_index += 1
        blocks.append(ResidualUnit(bound(source, group, layer), source.side_inputs, program.side,
                                   name=unit_name("block", layer), kind=source.kind, layer=layer,
                                   module_path=rename.path(source.module_path), index=layer, reads=layer,
                                   children=tuple(children), parallel=source.parallel))
    return program.replace(blocks=tuple(blocks), granularity="block")


def _attribute(root: nn.Module, target: str) -> object:
    """``root``'s attribute at the dotted ``target``, or None."""
    try:
        return functools.reduce(getattr, target.split("."), root)
    except AttributeError:
        return None


@dataclasses.dataclass
class _Renamer:
    """Moves names of the exported representative (position ``group`` of the truncated stack)
    to block ``layer`` of the model."""

    stack_path: str
    group: int
    layer: int

    def path(self, path: str) -> str:
        """A model module path: ``model.layers.<group>…`` -> ``model.layers.<layer>…``."""
        old, new = f"{self.stack_path}.{self.group}", f"{self.stack_path}.{self.layer}"
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
        return path

    def target(self, target: str) -> str:
        if target.startswith(WRAPPER_PREFIX):
            return WRAPPER_PREFIX + self.path(target[len(WRAPPER_PREFIX):])
        return target


class _Template:
    """One representative unit's graph and code, shared by every block of its group.

    The graph is copied once with each ``get_attr`` renamed to a flat name relative to the block
    (``m.model.layers.0.mlp.c_fc.weight`` -> ``mlp_c_fc_weight``), so that its generated code reads
    the same for every layer. :meth:`bind` makes a module per layer that runs that code on the
    layer's own tensors, without copying the graph or compiling it again (a copy per layer cost
    10 ms a unit: 1.4 s of a 48-layer capture). Each module's ``meta`` names its own layer's
    parameters; the shared nodes' module scopes are the representative's.
    """

    def __init__(self, module: fx.GraphModule, stack_path: str, group: int) -> None:
        graph = fx.Graph()
        graph.output(graph.graph_copy(module.graph, {}))
        prefix = f"{WRAPPER_PREFIX}{stack_path}.{group}."
        self.targets: dict[str, str] = {}  # flat name -> the representative's target
        values: dict[str, object] = {}
        for node in graph.nodes:
            if node.op != "get_attr":
                continue
            relative = node.target[len(prefix):] if node.target.startswith(prefix) else node.target
            flat = re.sub(r"\W", "_", relative).strip("_") or "constant"
            while flat in self.targets and self.targets[flat] != node.target:
                flat += "_"
            self.targets[flat] = node.target
            values[flat] = _attribute(module, node.target)
            node.target = flat
        self.module = fx.GraphModule(values, graph, class_name="JetgraphModule")
        self.names = module.meta.get(PARAMETER_NAME, {})
        self.stack_path, self.group = stack_path, group

    def bind(self, layer: int, wrapper: nn.Module) -> fx.GraphModule:
        """The template's code on block ``layer``'s tensors (the representative's constants where
        the block has no attribute of that name: the full-model check catches a difference)."""
        rename = _Renamer(self.stack_path, self.group, layer)
        unit = object.__new__(type(self.module))  # the same class, hence the same compiled forward
        # the template's state, with containers of its own (parameters, buffers, hooks) so that
        # nothing registered on one layer's module reaches another's; the graph is shared
        unit.__dict__.update({key: copy.copy(value) if isinstance(value, (dict, set)) else value
                              for key, value in self.module.__dict__.items()})
        unit._parameters, unit._buffers = {}, {}
        names = {}
        for flat, target in self.targets.items():
            own = _attribute(wrapper, rename.target(target))  # the model's own object (lazy weights swap it)
            value = own if own is not None else getattr(self.module, flat)
            if flat in self.module._parameters:
                unit._parameters[flat] = value
            elif flat in self.module._buffers:
                unit._buffers[flat] = value
            else:
                unit.__dict__[flat] = value
            names[flat] = rename.path(self.names.get(target, target))
        unit.meta = {PARAMETER_NAME: names}
        return unit
