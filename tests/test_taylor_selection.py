"""Taylor rules added for the architecture sweep, each against a float64 oracle (nested
torch.func.jvp of the same function, i.e. torch's own derivative rules) at order 3.

Selections (topk, max, sort, clamp …) are piecewise constant in which entry they choose: the
oracle differentiates the same choice at the centre, so agreement means the chosen entries
carry their whole series. Random centres have no ties."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from taylor_oracles import nested_jvp_coefficients, relative_error

import jetgraph

F64 = torch.float64
ORDER = 3
G = torch.Generator().manual_seed(0)
W = torch.randn(6, 1, 3, dtype=F64, generator=G)  # depthwise conv1d weights (SSM-style)
B = torch.randn(6, dtype=F64, generator=G)
ROUTER = torch.randn(4, 5, dtype=F64, generator=G)
FREQS = torch.polar(torch.ones(3, 2, dtype=F64), torch.randn(3, 2, dtype=F64, generator=G))
IDX = torch.tensor([[2, 0, 1, 3], [1, 1, 0, 2], [3, 2, 2, 0]])


def _moe(x: torch.Tensor) -> torch.Tensor:
    """Router softmax, top-2 experts, dispatch with index_add: an MoE block in miniature."""
    tokens = x.reshape(-1, 4)
    weights, experts = torch.softmax(tokens @ ROUTER, -1).topk(2, -1)
    out = torch.zeros_like(tokens)
    for slot in range(2):
        for expert in range(5):
            rows = (experts[:, slot] == expert).nonzero().squeeze(-1)
            contribution = (tokens[rows] * (expert + 1)).tanh() * weights[rows, slot, None]
            out.index_add_(0, rows, contribution)
    return out.reshape(x.shape)


def _rope_complex(x: torch.Tensor) -> torch.Tensor:
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * FREQS).flatten(-2).sin()


def _partial_rope(x: torch.Tensor) -> torch.Tensor:
    out = x.new_empty(x.shape)
    out[..., :2].copy_(x[..., :2].cos())
    out[..., 2:].copy_(x[..., 2:] * x[..., :2])
    return out


def _masked_write(x: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    keep = x > 0
    out[keep] = x[keep] ** 2
    return out + x.exp()


FUNCTIONS = {
    "topk": lambda x: torch.topk(x.tanh() * 3, 2, dim=-1).values.exp(),
    "max.dim": lambda x: x.sin().max(dim=-1).values * x.sum(-1),
    "min.dim keepdim": lambda x: x.cos().min(dim=1, keepdim=True).values + x,
    "amax": lambda x: torch.amax(x.exp(), dim=(0, 2)),
    "max": lambda x: x.sin().max() * x,
    "maximum/minimum": lambda x: torch.maximum(x, x.flip(-1) * 0.5) + torch.minimum(x.cos(), 0.3 * x),
    "max.other": lambda x: torch.max(x.sin(), x.cos()),
    "clamp": lambda x: torch.clamp(x * 2, -1, 1) ** 3 + x.clamp(min=0.1),
    "sort": lambda x: torch.sort(x.sin(), dim=-1, descending=True).values * torch.arange(1.0, 5.0, dtype=F64),
    "argsort+gather": lambda x: x.gather(-1, x.cos().argsort(-1)).exp(),
    "abs": lambda x: x.abs() ** 1.5,
    "logsumexp": lambda x: torch.logsumexp(x * 2, dim=-1),
    "softplus": lambda x: F.softplus(3 * x, beta=2) + F.softplus(x * 30),
    "logsigmoid": lambda x: F.logsigmoid(2 * x),
    "square": lambda x: torch.square(x.sin()),
    "conv1d": lambda x: F.conv1d(x.reshape(2, 6, 2).repeat(1, 1, 3), W, B, padding=2, groups=6).tanh(),
    "repeat": lambda x: x.repeat(2, 1, 3).tanh(),
    "baddbmm": lambda x: torch.baddbmm(x[..., :3].cos(), x, x.transpose(1, 2), beta=0.5, alpha=2),
    "view_as_complex (RoPE)": _rope_complex,
    "copy into slices": _partial_rope,
    "index_put (masked write)": _masked_write,
    "scatter / scatter_add": lambda x: torch.zeros_like(x).scatter(-1, IDX.expand(2, 3, 4), x.sin())
                                      + torch.zeros_like(x).scatter_add(-1, IDX.expand(2, 3, 4), x ** 2),
    "cumsum/tril/flip": lambda x: (x.cumsum(-1).flip(1) * x).tril().exp(),
    "moe routing": _moe,
    "einsum (one series)": lambda x: torch.einsum("bij,jk->bik", x, ROUTER[:, :3]).tanh(),
    "einsum (two series)": lambda x: torch.einsum("bij,bkj->bik", x.sin(), x.exp()),
    "einsum (two series, ranks differ)": lambda x: torch.einsum("bij,j->bi", x.sin(), x.sum((0, 1))),
    "expm1/log1p": lambda x: torch.expm1(x.sin()) + torch.log1p(x.exp()),
    "concat": lambda x: torch.concat([x, x.sin()], -1).exp(),
    "expand_as": lambda x: x[:1].expand_as(x).tanh() * x + B[:4].expand_as(x),
    "select/diagonal_scatter": lambda x: torch.select_scatter(x.exp(), x[:, 1].sin(), 1, 0)
                                        + torch.diagonal_scatter(x, x.diagonal(0, 1, 2).cos(), 0, 1, 2),
    "scatter (value)": lambda x: x.sin().scatter(-1, IDX.expand(2, 3, 4), 0.5) * x,
    "index_select/narrow/triu": lambda x: x.index_select(2, torch.tensor([3, 0])).exp()
                                          + x.narrow(2, 1, 2).triu() ** 2,
    "amin/fmax/fmin": lambda x: torch.amin(x.exp(), dim=1, keepdim=True) * torch.fmax(x, x.cos())
                                + torch.fmin(x, -x.sin()),
    "clamp (tensor bounds)": lambda x: x.clamp(min=x.cos() - 0.5, max=x.sin() + 0.5) ** 2,
    "where (scalar)": lambda x: torch.where(x > 0, x.exp(), 0.25) + torch.where(x < 0.3, 1.5, x),
    "real/imag": lambda x: (lambda z: z.real * z.imag)(torch.view_as_complex(
        x.reshape(2, 3, 2, 2).contiguous()) * FREQS[:, :2]),
    "conv2d": lambda x: F.conv2d(x.unsqueeze(1), W[:2].reshape(2, 1, 1, 3), B[:2], padding=(0, 1)).tanh(),
    "view_as": lambda x: x.reshape(2, 12).view_as(x).exp(),
    "pad (reflect)": lambda x: F.pad(x, (1, 2), mode="reflect").sin(),
    "unflatten": lambda x: x.flatten(1).unflatten(1, (4, 3)).tanh(),
}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_rule_matches_nested_jvp(name: str) -> None:
    f = FUNCTIONS[name]
    generator = torch.Generator().manual_seed(1)
    center = torch.randn(2, 3, 4, dtype=F64, generator=generator)
    direction = torch.randn(2, 3, 4, dtype=F64, generator=generator)
    ours = jetgraph.jet(f, center, direction, order=ORDER, increment=True)
    expected = nested_jvp_coefficients(f, center, direction, ORDER)
    for j, coefficient in enumerate(expected):
        assert relative_error(ours.coefficients[j], coefficient) < 1e-10, (name, j)


def test_routing_indices_are_constants_of_the_jet() -> None:
    """topk's indices are decided on the centre: a direction that would change the top-2 at
    t = 1 does not change the jet's choice, whose order-1 term is the chosen entries' slope."""
    center = torch.tensor([[3.0, 2.0, 0.0, -1.0]], dtype=F64)
    direction = torch.tensor([[0.0, 0.0, 5.0, 0.0]], dtype=F64)  # entry 2 overtakes at t = 1
    result = jetgraph.jet(lambda x: x.topk(2, -1).values, center, direction, order=1, increment=True)
    torch.testing.assert_close(result.coefficients[0], torch.tensor([[3.0, 2.0]], dtype=F64))
    torch.testing.assert_close(result.coefficients[1], torch.zeros(1, 2, dtype=F64))


def test_transformers_grouped_mm_rule() -> None:
    """transformers' MoE grouped matmul (an opaque custom op) against the same computation
    written as one matmul per expert's row block, differentiated by nested jvp."""
    pytest.importorskip("transformers.integrations.moe")
    import transformers.integrations.moe  # noqa: F401  (registers the op)

    op = torch.ops.transformers.grouped_mm_fallback.default
    weight = torch.randn(3, 4, 5, dtype=F64, generator=torch.Generator().manual_seed(2))
    offsets = torch.tensor([2, 2, 6])

    def by_blocks(x: torch.Tensor) -> torch.Tensor:
        rows = x.tanh()
        return torch.cat([rows[:2] @ weight[0], rows[2:6] @ weight[2]]).exp()

    generator = torch.Generator().manual_seed(3)
    center = torch.randn(6, 4, dtype=F64, generator=generator)
    direction = torch.randn(6, 4, dtype=F64, generator=generator)
    ours = jetgraph.jet(lambda x: op(x.tanh(), weight, offsets).exp(), center, direction,
                        order=ORDER, increment=True)
    for j, expected in enumerate(nested_jvp_coefficients(by_blocks, center, direction, ORDER)):
        assert relative_error(ours.coefficients[j], expected) < 1e-10, j
