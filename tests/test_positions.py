"""A unit's graph run at the last position with the earlier positions once per group
(jetgraph.codegen.positions), against the whole graph run on every context."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import jetgraph
from jetgraph.capture.zoo import FAMILIES, VOCAB, tiny_model
from jetgraph.codegen.positions import Groups, LastPosition, PositionSplitError
from tests.conftest import captured

ATTENTION_FAMILIES = [f for f in FAMILIES if f != "residual_mlp"]
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def _grouped_inputs(view, groups: int = 3, per_group: int = 7, seed: int = 0, length: int = 2):
    """Contexts in runs sharing their earlier tokens, and stream values that do too (a random
    stream, not the embedding: the earlier positions carry no special structure)."""
    generator = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, VOCAB, (groups, length - 1), generator=generator)
    ids = torch.cat([prefix.repeat_interleave(per_group, 0),
                     torch.randint(0, VOCAB, (groups * per_group, 1), generator=generator)], 1)
    dtype = view.decoder.unembedding.dtype
    earlier = torch.randn(groups, length - 1, view.d_model, generator=generator, dtype=dtype)
    last = torch.randn(groups * per_group, 1, view.d_model, generator=generator, dtype=dtype)
    x = torch.cat([earlier.repeat_interleave(per_group, 0), last], 1)
    return ids, x


def _check_units(view, dtype: torch.dtype, length: int = 2) -> list[str]:
    ids, x = _grouped_inputs(view, length=length)
    side = view.side(ids)
    checked = []
    for unit in view.units:
        if unit.kind != "attn":
            continue
        inputs = [side[name] for name in unit.side_inputs]
        whole = unit.graph_module(x, *inputs)[:, -1:]
        split = LastPosition(unit.graph_module)(x, inputs, Groups.of(ids))
        assert split.shape == whole.shape
        torch.testing.assert_close(split, whole, **TOLERANCE[dtype])
        checked.append(unit.name)
    return checked


@pytest.mark.parametrize("family", ATTENTION_FAMILIES)
def test_every_family_splits_and_equals_the_whole_graph(family: str) -> None:
    _, prog = captured(family)
    for view in (prog.at("sublayer"), prog):  # attention alone, and a whole block with its MLP
        assert _check_units(view, torch.float32)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_float64_agreement_and_longer_contexts(family: str) -> None:
    model = tiny_model(family).double()
    prog = jetgraph.capture(model, torch.randint(0, VOCAB, (1, 8))).at("sublayer")
    for length in (2, 3, 5):
        assert _check_units(prog, torch.float64, length) == ["attn0", "attn1"]


def test_groups_are_runs_of_the_same_earlier_tokens() -> None:
    ids = torch.tensor([[1, 5], [1, 6], [2, 5], [2, 2], [1, 9]])
    groups = Groups.of(ids)
    assert groups.first.tolist() == [0, 2, 4] and groups.inverse.tolist() == [0, 0, 1, 1, 2]
    stacked = Groups.of(ids, copies=2)
    assert stacked.first.tolist() == [0, 2, 4, 5, 7, 9]
    assert stacked.inverse.tolist() == [0, 0, 1, 1, 2, 3, 3, 4, 4, 5]


@pytest.mark.parametrize("traced_first", [False, True])
def test_a_group_whose_earlier_positions_differ_is_refused(traced_first: bool) -> None:
    _, prog = captured("llama")
    view = prog.at("sublayer")
    ids, x = _grouped_inputs(view)
    unit = view.units[0]
    side = [view.side(ids)[n] for n in unit.side_inputs]
    split = LastPosition(unit.graph_module)
    if traced_first:  # the replay traced on good inputs checks the claim on every call
        torch.testing.assert_close(split(x, side, Groups.of(ids)), unit.graph_module(x, *side)[:, -1:])
    x[1, 0] += 1.0  # context 1 claims group 0's first position but holds another value
    with pytest.raises(PositionSplitError, match="differ at earlier positions"):
        split(x, side, Groups.of(ids))
    with pytest.raises(PositionSplitError, match="differ at earlier positions"):
        split.interpret(x, side, Groups.of(ids))


class _Mixing(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how, self.proj = how, nn.Linear(8, 8)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.proj(h)
        if self.how == "cumsum":  # mixes positions in a way the interpreter does not know
            return y.cumsum(1)
        return y + y.mean(1, keepdim=True)  # a reduction over positions: joined, then exact


def _exported(how: str):
    seq = torch.export.Dim("seq", min=2, max=64)
    batch = torch.export.Dim("batch", min=2, max=1 << 20)
    program = torch.export.export(_Mixing(how), (torch.randn(3, 4, 8),), dynamic_shapes=({0: batch, 1: seq},))
    return program.module()


def test_an_unknown_position_mixing_op_is_refused_and_a_reduction_is_exact() -> None:
    ids = torch.tensor([[1, 2, 3], [1, 2, 4], [5, 6, 7]])
    x = torch.randn(3, 3, 8)
    x[1, :2] = x[0, :2]
    with pytest.raises(PositionSplitError, match="cumsum"):
        LastPosition(_exported("cumsum"))(x, [], Groups.of(ids))
    graph = _exported("mean")
    torch.testing.assert_close(LastPosition(graph)(x, [], Groups.of(ids)), graph(x)[:, -1:])


def test_a_graph_without_symbolic_positions_is_refused() -> None:
    with pytest.raises(PositionSplitError, match="shape"):
        LastPosition(torch.fx.symbolic_trace(nn.Linear(4, 4)))
