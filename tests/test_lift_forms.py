"""Residual forms beyond ``h + f(h)`` that the lift pass represents: scaled and rescaled streams,
sums a submodule returns, shape-only addends, blocks mixing parallel and sequential steps, and
in-place writes. Each unit's update is compared with the same update composed by hand from the
model's own submodules (not with the program's own sum)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import jetgraph

VOCAB, D, LAYERS = 40, 16, 3


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(self.norm(h))))


class TwoExperts(nn.Module):
    """Returns a sum of two stream-dependent terms (routed + shared experts)."""

    def __init__(self) -> None:
        super().__init__()
        self.routed, self.shared = Mlp(), Mlp()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.routed(h) + self.shared(h)


class Block(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.mlp = TwoExperts() if form == "sum" else Mlp()
        self.second = Mlp()
        self.scale = nn.Parameter(torch.rand(D) + 0.5)
        self.shift = nn.Parameter(torch.randn(D) * 0.1)
        self.bias = nn.Parameter(torch.randn(D) * 0.1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.form == "scaled":  # a·h + f(h)
            return self.scale * h + self.mlp(h)
        if self.form == "shifted":  # (h + b)·a + f(h)
            return (h + self.shift) * self.scale + self.mlp(h)
        if self.form == "rescaled":  # c·(h + f(h)), written in place
            out = h + self.mlp(h)
            out.mul_(self.scale)
            return out
        if self.form == "bias":  # h + f(h) + a bias that reads only h's shape
            return h + self.mlp(h) + self.bias.expand_as(h)
        if self.form == "mixed":  # parallel branches, then a sequential one
            h = h + (self.mlp(h) + self.second(h))
            return h + self.second(h)
        return h + self.mlp(h)  # "sum": the submodule returns routed + shared


class Model(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(Block(form) for _ in range(LAYERS))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h))


IDS = torch.tensor([[3, 7, 1, 30, 12, 5]])


@pytest.mark.parametrize("form", ["scaled", "shifted", "rescaled", "bias", "sum", "mixed"])
def test_form_is_captured_with_exact_units(form: str) -> None:
    model = Model(form).eval()
    prog = jetgraph.capture(model, IDS)
    with torch.no_grad():
        torch.testing.assert_close(prog(IDS), model(IDS))
        states = prog.stream(IDS)
        side = prog.side_inputs(IDS)
        assert len(prog.blocks) == LAYERS
        for layer, block in enumerate(model.layers):
            h = states[layer]
            torch.testing.assert_close(prog.blocks[layer](h, side), block(h) - h, rtol=1e-5, atol=1e-6)
    if form == "sum":  # one update per block, not two parallel branches
        assert [len(b.children) for b in prog.blocks] in ([0] * LAYERS, [1] * LAYERS)
    if form == "mixed":  # the parallel pair is one unit, then the sequential one
        assert [len(b.children) for b in prog.blocks] == [2] * LAYERS
        first = model.layers[0]
        h = states[0]
        with torch.no_grad():
            torch.testing.assert_close(prog.blocks[0].children[0](h, side), first.mlp(h) + first.second(h),
                                       rtol=1e-5, atol=1e-6)


def test_scaled_units_expand_at_order_one() -> None:
    """The order-1 jet of a scaled-stream unit against torch.func.jvp of the block itself."""
    model = Model("shifted").eval()
    prog = jetgraph.capture(model, IDS)
    states, side = prog.stream_with_side_inputs(IDS)
    h = states[1]
    center = h + 0.1 * torch.randn(h.shape, generator=torch.Generator().manual_seed(0))
    jet = jetgraph.jet(prog.blocks[1], center, h, order=1, side=side)
    with torch.no_grad():
        value, tangent = torch.func.jvp(lambda x: model.layers[1](x) - x, (center,), (h - center,))
    torch.testing.assert_close(jet.coefficients[0], value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(jet.coefficients[1], tangent, rtol=1e-5, atol=1e-6)


class Scan(nn.Module):
    """A recurrence over positions written as a Python loop: export unrolls it, fixing the length."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(D, D)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        state, outputs = torch.zeros_like(h[:, 0]), []
        for t in range(h.shape[1]):
            state = torch.tanh(self.mix(state) + h[:, t])
            outputs.append(state)
        return torch.stack(outputs, 1)


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(Scan() for _ in range(2))
        self.head = nn.Linear(D, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for layer in self.layers:
            h = h + layer(h)
        return self.head(h)


def test_an_export_that_fixed_the_length_is_not_dynamic() -> None:
    """prog.dynamic says what the export kept symbolic; another shape is refused in one line."""
    model = Recurrent().eval()
    prog = jetgraph.capture(model, IDS)
    assert not prog.dynamic and prog.fixed_sizes == (None, 6)  # the batch stays free
    other = torch.tensor([[9, 8, 7, 6, 5, 4], [1, 1, 2, 3, 5, 8], [3, 1, 4, 1, 5, 9]])
    with torch.no_grad():
        torch.testing.assert_close(prog(other), model(other))
    with pytest.raises(ValueError, match=r"accepts only sequence length 6, as captured"):
        prog(torch.tensor([[1, 2, 3]]))
