"""Which checkpoint tensors make each parameter of a model, the way transformers loads them.

transformers 5 renames and converts checkpoint tensors on load: legacy names (GPT-NeoX's
``embed_out.weight`` for ``lm_head.weight``) and per-expert MoE weights
(``experts.N.w1/w2/w3`` or ``experts.N.gate_proj/up_proj/down_proj``) that it stacks into one
``experts.gate_up_proj`` / ``experts.down_proj`` tensor; ``save_pretrained`` writes the legacy
layout back. A lazily read model (:mod:`jetgraph.capture.lazy`) reads one parameter at a time,
so it needs the same rules per parameter: :class:`CheckpointMap` applies transformers' own
conversion mapping (:mod:`transformers.conversion_mapping`) to the checkpoint's names once, and
:meth:`CheckpointMap.read` builds one parameter from its source tensors with transformers' own
conversion operations. A checkpoint already in the model's layout maps each name to itself.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable

import torch
from torch import nn

ReadTensor = Callable[[str], torch.Tensor]


@dataclasses.dataclass
class _Converted:
    """Checkpoint tensors that one transformers converter turns into a group of parameters."""

    first: str  # the parameter name transformers keys the group by
    converter: object  # a transformers WeightConverter, copied for every read
    sources: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (target, key, pattern)


class CheckpointMap:
    """For every parameter name of ``model``: the checkpoint key it is read from as is, or the
    converter group that builds it from several checkpoint tensors."""

    def __init__(self, model: nn.Module, checkpoint_keys: Iterable[str]) -> None:
        self.model = model
        self.direct: dict[str, str] = {}
        self.converted: dict[str, _Converted] = {}
        names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        names |= {name for name, _ in model.named_buffers()}
        keys = sorted(checkpoint_keys, key=_natural_key)
        renamings, converters, prefix = _conversion_rules(model)
        if not renamings and not converters:
            self.direct = {key: key for key in keys}
            return
        from transformers.core_model_loading import rename_source_key

        known = dict.fromkeys(names, True)  # rename_source_key reads membership with .get
        by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
        groups: dict[str, _Converted] = {}
        for key in keys:
            target, pattern = rename_source_key(key, renamings, converters, prefix, known)
            if target not in names and key in names:
                target, pattern = key, None
            if target not in names:
                continue  # a tensor the model does not use (transformers ignores it too)
            if pattern is None:
                self.direct.setdefault(target, key)
                continue
            group = groups.setdefault(target, _Converted(target, by_pattern[pattern]))
            group.sources.append((target, key, pattern))
        self._groups = list(groups.values())
        for group in self._groups:
            for target in _targets(group, names):
                self.converted.setdefault(target, group)

    def __contains__(self, name: str) -> bool:
        return name in self.direct or name in self.converted

    def read(self, name: str, read_tensor: ReadTensor) -> torch.Tensor:
        """Parameter ``name`` built from the checkpoint (``read_tensor(key)`` gives one stored tensor)."""
        if name in self.direct:
            return read_tensor(self.direct[name])
        group = self.converted[name]
        converter = copy.deepcopy(group.converter)
        for target, key, pattern in group.sources:
            converter.add_tensor(target, key, pattern, lambda key=key: read_tensor(key))
        built = converter.convert(group.first, model=self.model, config=getattr(self.model, "config", None))
        value = built[name]
        return value[0] if isinstance(value, list) else value


def _targets(group: _Converted, names: set[str]) -> list[str]:
    """The parameter names a converter group produces: its first target and the siblings its
    target patterns name (a one-to-many split)."""
    targets = [group.first]
    for pattern in getattr(group.converter, "target_patterns", []):
        for other in getattr(group.converter, "target_patterns", []):
            if other != pattern and pattern in group.first:
                sibling = group.first.replace(pattern, other)
                if sibling in names and sibling not in targets:
                    targets.append(sibling)
    return targets


def _conversion_rules(model: nn.Module) -> tuple[list, list, str | None]:
    """transformers' renamings and converters for ``model`` (none for other modules, or a
    transformers without conversion mappings)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
        from transformers.modeling_utils import PreTrainedModel
    except ImportError:
        return [], [], None
    if not isinstance(model, PreTrainedModel):
        return [], [], None
    rules = get_model_conversion_mapping(model)
    renamings = [rule for rule in rules if isinstance(rule, WeightRenaming)]
    converters = [rule for rule in rules if isinstance(rule, WeightConverter)]
    return renamings, converters, getattr(model, "base_model_prefix", None)


def _natural_key(key: str) -> list:
    """Sort ``layers.10`` after ``layers.9`` (expert order decides how tensors are stacked)."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in key.split(".")]
