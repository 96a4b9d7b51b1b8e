"""Jets of captured units and decoders against float64 oracles, rule coverage, LayerNorm contrast.

Stated tolerance: relative error ≤ 1e-5 per coefficient, our float32 jets against float64
nested torch.func.jvp on the same decomposed graphs (captured from a float64 copy of the model).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import jetgraph
from jetgraph.capture.zoo import FAMILIES, VOCAB
from jetgraph.taylor import has_rule
from tests.conftest import captured, random_ids, require_smollm2
from tests.taylor_oracles import finite_difference_coefficients, nested_jvp_coefficients, relative_error

RELATIVE_TOLERANCE = 1e-5
ORDER = 4


def _float64_program(family: str) -> jetgraph.ResidualProgram:
    """The same tiny model (same seed) in float64: the oracles' program (conftest's factory)."""
    return captured(family, torch.float64)[1]


def _assert_jet_matches_oracle(f32, f64, center: torch.Tensor, scale: float,
                               generator: torch.Generator, label: str) -> None:
    """Our float32 jet of f32 vs float64 nested jvp of f64 at ``center`` along a random v."""
    v = torch.randn(center.shape, generator=generator, dtype=torch.float64) * scale * center.std()
    expected = nested_jvp_coefficients(f64, center, v, ORDER)
    ours = jetgraph.jet(f32, center.float(), v.float(), order=ORDER, increment=True)
    for j in range(ORDER + 1):
        error = relative_error(ours.coefficients[j], expected[j])
        name = getattr(f32, "name", "decoder")
        assert error <= RELATIVE_TOLERANCE, f"{label} {name} order {j}: {error:.2e}"


def _functions(prog: jetgraph.ResidualProgram):
    view = prog.at("sublayer")
    return [*view.units, *prog.blocks, prog.decoder]


@pytest.mark.parametrize("family", FAMILIES)
def test_unit_and_decoder_jets_match_float64_oracle(family: str) -> None:
    _, prog32 = captured(family)
    prog64 = _float64_program(family)
    ids = random_ids(2, 7, seed=11)
    with torch.no_grad():
        sub_states = prog64.at("sublayer").stream(ids)
        block_states = prog64.stream(ids)
    generator = torch.Generator().manual_seed(0)
    for f32, f64 in zip(_functions(prog32), _functions(prog64), strict=True):
        if f64 is prog64.decoder:
            center = block_states[-1]
        elif f64 in prog64.blocks:
            center = block_states[f64.reads]
        else:
            center = sub_states[f64.reads]
        _assert_jet_matches_oracle(f32, f64, center, 0.5, generator, family)


def test_every_captured_op_has_a_rule() -> None:
    missing: dict[str, set[str]] = {}
    for family in FAMILIES:
        _, prog = captured(family)
        for fn in _functions(prog):
            for node in fn.graph_module.graph.nodes:
                if node.op == "call_function" and not has_rule(node.target):
                    missing.setdefault(str(node.target), set()).add(family)
    assert not missing, f"ops without a Taylor rule: {missing}"


def test_jets_are_exact_for_the_iterative_lens_identity() -> None:
    """The decoder's jet at h, evaluated at h itself, is the decoder's value: bit-identical at
    order 0 (the forward itself), to float32 rounding at higher orders (stacked matmuls may
    take other BLAS blockings), with higher coefficients exactly zero."""
    _, prog = captured("llama")
    ids = random_ids(1, 6)
    h = prog.stream(ids)[-1]
    torch.testing.assert_close(jetgraph.jet(prog.decoder, h, h, order=0).value, prog.decoder(h),
                               rtol=0, atol=0)
    for order in range(1, 4):
        result = jetgraph.jet(prog.decoder, h, h, order=order)
        assert (result.coefficients[1:] == 0).all()
        torch.testing.assert_close(result.value, prog.decoder(h), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ LayerNorm and SiLU contrast
def _gpt2_block_update():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval().double()
    block = model.transformer.h[0]

    def native(h: torch.Tensor) -> torch.Tensor:  # HF's MLP sublayer with torch's native LayerNorm
        return block.mlp(block.ln_2(h))

    prog = jetgraph.capture(model, random_ids(1, 6))
    unit = prog.at("sublayer").units[1]
    assert unit.name == "mlp0"
    return native, unit


def test_layer_norm_orders_2_and_3_match_finite_differences_where_nested_ad_is_wrong() -> None:
    native, unit = _gpt2_block_update()
    generator = torch.Generator().manual_seed(3)
    h = torch.randn(1, 6, 32, generator=generator, dtype=torch.float64)
    v = torch.randn(1, 6, 32, generator=generator, dtype=torch.float64)
    truth = finite_difference_coefficients(unit, h, v, 3)
    ours = jetgraph.jet(unit, h, v, order=3, increment=True)
    native_ad = [torch.autograd.functional.jvp(native, h, v)[1]]  # order 1
    for j in (2, 3):
        assert relative_error(ours.coefficients[j], truth[j]) < 1e-6, j
    # the same block through torch's native_layer_norm: nested autograd (the paper's method)
    import math

    def nested_autograd(order: int) -> torch.Tensor:
        fns = [native]
        for _ in range(order):
            prev = fns[-1]
            fns.append(lambda x, prev=prev: torch.autograd.functional.jvp(prev, x, v, create_graph=True)[1])
        return fns[order](h) / math.factorial(order)

    assert relative_error(native_ad[0], truth[1]) < 1e-6  # first order is right
    wrong = {j: relative_error(nested_autograd(j), truth[j]) for j in (2, 3)}
    assert wrong[2] > 1e-3 and wrong[3] > 1e-3, f"native layer norm nested AD errors: {wrong}"


def test_silu_jets_match_finite_differences() -> None:
    """SiLU keeps its own sympy-derived rule (aten.silu is not decomposed by capture).

    Note: the design brief reports nested torch.func.jvp failing through F.silu at order >= 2;
    with torch 2.13.0 on this machine it does not fail (checked here, so the note can be
    corrected), and it agrees with finite differences as our rule does.
    """
    f = torch.nn.functional.silu
    c, v = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    truth = finite_difference_coefficients(f, c, v, 4)
    ours = jetgraph.jet(f, c, v, order=4, increment=True)
    nested = nested_jvp_coefficients(f, c, v, 4)
    for j in range(5):
        assert relative_error(ours.coefficients[j], truth[j]) < 1e-6
        assert relative_error(ours.coefficients[j], nested[j]) < 1e-8


# ------------------------------------------------------------------------- property tests
UNARY = {
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "gelu": torch.nn.functional.gelu,
    "silu": lambda x: x * torch.sigmoid(x),  # decomposed, so the nested-jvp oracle works
    "exp": lambda x: torch.exp(0.3 * x), "softmax": lambda x: torch.softmax(x, -1),
    "square": lambda x: x * x, "norm": lambda x: (x - x.mean(-1, keepdim=True)) * torch.rsqrt(
        (x * x).mean(-1, keepdim=True) + 1.0),
}


@settings(max_examples=25, deadline=None)
@given(
    ops=st.lists(st.sampled_from(sorted(UNARY)), min_size=1, max_size=4),
    rows=st.integers(1, 4),
    width=st.integers(2, 6),
    order=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_random_compositions_match_nested_jvp(ops, rows, width, order, seed) -> None:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(width, width, generator=generator, dtype=torch.float64) / width**0.5

    def f(x: torch.Tensor) -> torch.Tensor:
        for name in ops:
            x = UNARY[name](x @ weight) + x
        return x

    c = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    v = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    ours = jetgraph.jet(f, c, v, order=order, increment=True)
    for j, expected in enumerate(nested_jvp_coefficients(f, c, v, order)):
        assert relative_error(ours.coefficients[j], expected) < 1e-9


# ---------------------------------------------------------------------------------- SmolLM2
def test_smollm2_units_and_decoder() -> None:
    require_smollm2()
    model, tokenizer = jetgraph.load_model("smollm2")
    ids = tokenizer("The capital of France is", return_tensors="pt", add_special_tokens=False).input_ids
    prog32 = jetgraph.capture(model, ids)
    prog64 = jetgraph.capture(jetgraph.load_model("smollm2")[0].double(), ids)
    states = prog64.at("sublayer").stream(ids)
    generator = torch.Generator().manual_seed(0)
    sub32, sub64 = prog32.at("sublayer").units, prog64.at("sublayer").units
    picks = [(sub32[i], sub64[i], states[sub64[i].reads]) for i in (0, 1, 30, 31, 58, 59)]
    picks.append((prog32.decoder, prog64.decoder, states[-1]))
    for f32, f64, center in picks:
        _assert_jet_matches_oracle(f32, f64, center, 0.2, generator, "SmolLM2")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_jets_run_on_cuda() -> None:
    w = torch.randn(8, 8, device="cuda")
    f = lambda x: torch.tanh(x @ w)  # noqa: E731
    c, v = torch.randn(3, 8, device="cuda"), torch.randn(3, 8, device="cuda")
    cuda = jetgraph.jet(f, c, v, order=3, increment=True)
    cpu = jetgraph.jet(lambda x: torch.tanh(x @ w.cpu()), c.cpu(), v.cpu(), order=3, increment=True)
    torch.testing.assert_close(cuda.coefficients.cpu(), cpu.coefficients, rtol=1e-4, atol=1e-5)
