"""The fast functionalisation pass: in-place ops and writes through views, each pattern the
architecture sweep met, against the eager module on inputs of another shape."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.export import Dim

from jetgraph.taylor.functional import Unsupported, functionalize, has_mutations, is_mutation
from jetgraph.taylor.lowering import core_module


class PartialRope(nn.Module):
    """MLA / partial RoPE: a new_empty buffer filled with copy_ into two slices."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(x.shape[0], x.shape[1], 2 * x.shape[2])
        out[..., : x.shape[2]].copy_(x.sin())
        out[..., x.shape[2]:].copy_(x * 2)
        return out + 1


class TransposedWrite(nn.Module):
    """A write through a chain of views (transpose, then select), read back through the base
    and through a view taken before the write."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        buf = torch.zeros_like(x)
        early = buf[:, 0]  # a view taken before the write, read after it
        buf.transpose(1, 2).select(1, 0).copy_(x[:, :, 0] * 3)
        buf.add_(1)
        return buf * 2 + early.sum(-1, keepdim=True).unsqueeze(1)


class Dispatch(nn.Module):
    """MoE-style dispatch: index_add_ into zeros and index_put_ of a masked selection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = torch.zeros_like(flat)
        index = torch.arange(flat.shape[0]).flip(0)
        out.index_add_(0, index, flat.exp())
        out[flat > 0] = 0.5
        return out.view_as(x)


class ScaledStream(nn.Module):
    """A stream scaled in place (gemma4's per-layer scalar) and a write into a split piece."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + x.tanh()
        h.mul_(self.scale)
        left, right = h.clone().split(2, dim=-1)
        right.copy_(left * 5)
        return h * 1.5 + torch.cat([left, right], -1) + right.sum()


@pytest.mark.parametrize("module", [PartialRope(), TransposedWrite(), Dispatch(), ScaledStream()],
                         ids=lambda m: type(m).__name__)
def test_functional_graph_matches_eager(module: nn.Module) -> None:
    example = torch.randn(2, 3, 4)
    with torch.no_grad():  # a split piece can be written in place only without autograd
        exported = torch.export.export(module, (example,), dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},),
                                       strict=False)
    graph_module = exported.module(check_guards=False)
    assert has_mutations(graph_module.graph)  # the pattern survives export
    count = functionalize(graph_module)
    assert count > 0 and not any(is_mutation(n) for n in graph_module.graph.nodes)
    other = torch.randn(3, 5, 4)
    with torch.no_grad():
        torch.testing.assert_close(graph_module(other), module(other), rtol=0, atol=1e-6)
        torch.testing.assert_close(graph_module(example), module(example), rtol=0, atol=1e-6)


def test_core_module_is_functional_and_equal() -> None:
    module = PartialRope()
    example = torch.randn(2, 3, 4)
    lowered = core_module(torch.export.export(module, (example,), strict=False))
    assert not has_mutations(lowered.graph)
    torch.testing.assert_close(lowered(example), module(example))


def test_uninvertible_write_is_reported() -> None:
    """A write through a view the pass cannot invert raises Unsupported (core_module then
    retraces with run_decompositions and is still right)."""

    class Diagonalish(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            buf = torch.zeros(x.shape[0], 4, 4)
            buf.unfold(1, 2, 2).copy_(torch.ones(x.shape[0], 2, 4, 2) * x.sum())
            return buf

    module = Diagonalish()
    example = torch.randn(2, 3)
    exported = torch.export.export(module, (example,), strict=False)
    with pytest.raises(Unsupported, match="unfold"):
        functionalize(exported.module(check_guards=False))
    torch.testing.assert_close(core_module(exported)(example), module(example))
