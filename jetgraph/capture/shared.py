"""Capture in time independent of depth: blocks with the same code share one exported graph.

``torch.export`` of a whole model costs time in proportion to its depth, yet a transformer's
blocks are usually one class run with different weights. Here the model's stack of blocks (the
``nn.ModuleList`` of one class holding most parameters, found from the module tree) is grouped
by *structure*: class, every plain attribute of every submodule (a sliding window, an attention
type), and parameter shapes and dtypes; an attribute that equals the block's own index in every
block (its ``layer_idx``) is not structure. The model is exported with one representative block per group,
lifted, and every block becomes a copy of its representative's graph bound to its own weights.

The result must reproduce the full model's logits on the example, like any capture; when it
does not (code that branches on the layer index, a forward that indexes per-layer config by
position) or the model has no such stack, :func:`capture_shared` returns None and the caller
exports the whole model.

A model read lazily from safetensors (:mod:`.lazy`) is captured the same way with only the
representatives and the parts outside the stack in memory; its full-model check would read
every weight, so the check is the truncated model's (the binding is structural), and the
encoder and decoder weights stay in memory while the blocks stream.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import re
from collections.abc import Hashable

import torch
from torch import fx, nn

from jetgraph.capture.export import LogitsWrapper, export_model
from jetgraph.capture.lazy import lazy_weights
from jetgraph.capture.lift import lift, name_units, verify
from jetgraph.errors import CaptureError
from jetgraph.ir import PARAMETER_NAME, ResidualProgram, ResidualUnit, parameter_names, unit_name
from jetgraph.padding import mask_or_full

WRAPPER_PREFIX = "m."  # what LogitsWrapper puts before the model's own parameter names


@dataclasses.dataclass
class BlockStack:
    """The model's stack of blocks: where it is, and each block's representative."""

    path: str  # "model.layers"
    blocks: nn.ModuleList
    representatives: list[int]  # block indices exported, one per structure group
    group_of: list[int]  # block i -> position of its representative in ``representatives``


def find_block_stack(model: nn.Module) -> BlockStack | None:
    """The ``nn.ModuleList`` of one module class with the most parameters, grouped by structure;
    None when there is none, or when every block differs (nothing to share)."""
    best: tuple[str, nn.ModuleList, int] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2 and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > 0 and (best is None or size > best[2]):
                best = (name, module, size)
    if best is None:
        return None
    path, blocks, _ = best
    described = [_describe(block) for block in blocks]
    counters = {key for key in described[0] if all(d.get(key) == i for i, d in enumerate(described))}
    groups: dict[Hashable, int] = {}
    representatives: list[int] = []
    group_of: list[int] = []
    for index, (block, attributes) in enumerate(zip(blocks, described, strict=True)):
        tensors = tuple((name, tuple(t.shape), t.dtype)
                        for name, t in [*block.named_parameters(), *block.named_buffers()])
        key = (tuple(sorted((k, v) for k, v in attributes.items() if k not in counters)), tensors)
        if key not in groups:
            groups[key] = len(representatives)
            representatives.append(index)
        group_of.append(groups[key])
    if len(representatives) == len(blocks):
        return None
    return BlockStack(path, blocks, representatives, group_of)


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


def capture_shared(model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   granularity: str) -> ResidualProgram | None:
    """Capture ``model`` exporting one block per structure group (see the module docstring), or
    None when the model has no stack of repeated blocks or the shared program is not exact."""
    stack = find_block_stack(model)
    if stack is None:
        return None
    wrapper = LogitsWrapper(model)
    parent_path, _, attribute = stack.path.rpartition(".")
    parent = model.get_submodule(parent_path)
    weights = lazy_weights(model)
    needed = _representative_weights(model, stack) if weights is not None else []
    with weights.resident(needed) if weights is not None else contextlib.nullcontext():
        try:
            truncated = nn.ModuleList([stack.blocks[i] for i in stack.representatives])
            setattr(parent, attribute, truncated)
            captured = export_model(model, ids, attention_mask)
            program = lift(captured)
        except CaptureError:
            if weights is not None:
                raise
            return None
        finally:
            setattr(parent, attribute, stack.blocks)
        if len(program.blocks) != len(stack.representatives):
            return None
        full = _bind_blocks(program, stack, wrapper)
        name_units(full)  # kinds are the representatives' (the same code)
        if weights is not None:  # the encoder, side inputs and decoder stay in memory
            weights.pin(_names_outside_blocks(full))
            full.weights = weights
    if weights is None:
        mask = captured.example_attention_mask
        wrapper.takes_positions = captured.passes_positions  # as the export decided
        with torch.no_grad():
            reference = wrapper(captured.example_input_ids, mask_or_full(mask, captured.example_input_ids))
        try:
            verify(full, dataclasses.replace(captured, reference_logits=reference))
        except CaptureError:
            return None
    return full.at(granularity)  # type: ignore[arg-type]


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
    return ResidualProgram(program.encoder, blocks, program.decoder, program.side, granularity="block",
                           model_class=program.model_class, dynamic=program.dynamic,
                           fixed_sizes=program.fixed_sizes,
                           example_input_ids=program.example_input_ids, reads_mask=program.reads_mask,
                           max_positions=program.max_positions)


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
