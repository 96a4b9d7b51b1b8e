"""Shared block graphs: capture exports one block per structure group and binds the others.

The reference is an independent capture of the whole model (``share_blocks=False``), which
exports every block, and the model itself: the shared program must give the same logits, stream,
unit names, kinds and module paths, on its own weights (no copies).
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch
from torch import nn

import jetgraph
from jetgraph.capture import shared
from jetgraph.capture.shared import capture_shared, find_block_stack
from jetgraph.capture.zoo import FAMILIES, VOCAB, tiny_model
from tests.conftest import random_ids, reference_logits


def _same_programs(shared: jetgraph.ResidualProgram, full: jetgraph.ResidualProgram,
                   ids: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(shared(ids), full(ids), rtol=0, atol=0)
        for a, b in zip(shared.at("sublayer").stream(ids), full.at("sublayer").stream(ids), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    for view in ("block", "sublayer"):
        described = [[(u.name, u.kind, u.layer, u.module_path, u.index, u.reads) for u in p.at(view).units]
                     for p in (shared, full)]
        assert described[0] == described[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_capture_equals_the_whole_model_export(family: str) -> None:
    torch.manual_seed(0)
    model = tiny_model(family, layers=4)
    example = random_ids(1, 8, seed=1)
    shared = capture_shared(model, example, None, "block")
    assert shared is not None, "the model's blocks were not shared"
    full = jetgraph.capture(model, example, share_blocks=False)
    ids = random_ids(2, 6, seed=2)
    _same_programs(shared, full, ids)
    torch.testing.assert_close(shared(ids), reference_logits(model, ids), rtol=0, atol=1e-5)
    weights = {p.data_ptr() for p in model.parameters()}
    stack = find_block_stack(model).path
    for unit in shared.blocks:  # every block reads the model's own tensors, its own layer's
        tensors = [*unit.graph_module.parameters(), *unit.graph_module.buffers()]
        assert tensors and all(t.data_ptr() in weights for t in tensors if t.dim() >= 2)
        names = set(unit.graph_module.meta[jetgraph.ir.PARAMETER_NAME].values())
        layers = {name[len(stack) + 1:].split(".")[0] for name in names if name.startswith(stack + ".")}
        assert layers == {str(unit.layer)}


def test_alternating_layers_get_one_graph_each() -> None:
    """GPT-Neo alternates global and local attention: two groups, one exported block each."""
    model = tiny_model("gpt_neo", layers=4)
    stack = find_block_stack(model)
    assert stack is not None and stack.representatives == [0, 1] and stack.group_of == [0, 1, 0, 1]
    full = jetgraph.capture(model, random_ids(1, 8), share_blocks=False)
    _same_programs(jetgraph.capture(model, random_ids(1, 8)), full, random_ids(2, 7, seed=3))


class _Scaled(nn.Module):
    """A block whose code depends on its index through an option object, which structure cannot
    see (only plain attributes are structure) and export bakes into the graph as a number:
    sharing its graph would be wrong."""

    def __init__(self, index: int, d: int = 8) -> None:
        super().__init__()
        self.linear = nn.Linear(d, d)
        self.options = types.SimpleNamespace(scale=float(index + 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.options.scale * torch.tanh(self.linear(h))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.layers = nn.ModuleList(_Scaled(i) for i in range(3))
        self.head = nn.Linear(8, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def test_blocks_that_differ_unseen_fall_back_to_the_whole_export() -> None:
    torch.manual_seed(0)
    model = _Net().eval()
    ids = random_ids(1, 6)
    assert find_block_stack(model) is not None  # structure alone cannot tell them apart
    assert capture_shared(model, ids, None, "block") is None  # ... but the logits can
    prog = jetgraph.capture(model, ids)  # the whole model, exported
    with torch.no_grad():
        torch.testing.assert_close(prog(ids), model(ids), rtol=0, atol=1e-5)


class _Config:
    """A config (anything with ``to_dict``): a per-layer list the forward reads by the block's
    position in the stack, a nested per-layer tuple, and a dict keyed by the list's values."""

    def __init__(self, kinds: list[str]) -> None:
        self.kinds = kinds
        self.rope = {"factors": tuple(1.0 for _ in kinds), "theta": 10.0}
        self.scales = {"a": 1.0, "b": -2.0}

    def to_dict(self) -> dict:
        return dict(vars(self))


class _Block(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.linear = nn.Linear(d, d)

    def forward(self, h: torch.Tensor, scale: float) -> torch.Tensor:
        return h + scale * torch.tanh(self.linear(h))


class _ByPosition(nn.Module):
    """Blocks alike in every attribute; the forward picks each one's scale from the config by
    position (as Gemma 3 picks a layer's mask and RoPE table from ``layer_types[i]``)."""

    def __init__(self, kinds: list[str]) -> None:
        super().__init__()
        self.config = _Config(kinds)
        self.embed = nn.Embedding(VOCAB, 8)
        self.layers = nn.ModuleList(_Block() for _ in kinds)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, self.config.scales[self.config.kinds[i]])
        return self.head(h)


KINDS = ["a", "a", "b", "a", "b"]


def test_per_layer_config_entries_are_structure() -> None:
    torch.manual_seed(0)
    model = _ByPosition(list(KINDS)).eval()
    stack = find_block_stack(model)
    assert [entry.path for entry in stack.per_layer] == ["config.kinds", "config.rope.factors"]
    assert stack.representatives == [0, 2] and stack.group_of == [0, 0, 1, 0, 1]
    ids = random_ids(1, 6)
    prog = capture_shared(model, ids, None, "block")
    assert prog is not None and model.config.kinds == KINDS  # shared, and the config restored
    with torch.no_grad():
        torch.testing.assert_close(prog(random_ids(2, 7, seed=3)), model(random_ids(2, 7, seed=3)),
                                   rtol=0, atol=1e-5)


def test_truncated_export_without_the_layers_own_config_is_caught(monkeypatch) -> None:
    """Without giving each representative its own layer's entries, the full-attention-like block
    (layer 2, at position 1 of the truncated stack) would be exported as kind "a": the whole
    model's check refuses the program."""
    torch.manual_seed(0)
    model = _ByPosition(list(KINDS)).eval()
    monkeypatch.setattr(shared, "_representatives_config", lambda stack: contextlib.nullcontext())
    assert capture_shared(model, random_ids(1, 6), None, "block") is None
