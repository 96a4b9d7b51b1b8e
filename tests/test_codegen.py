"""Codegen: the emitted GraphModule and standalone source agree with the interpreter.

Reference: ``Expansion.evaluate`` (term by term through the Taylor interpreter). Tolerance: every
term within 1e-5 of it, relative to the largest term magnitude of the expansion (the emitted code
batches centres and fuses LayerNorm/GELU kernels at order 0, which changes float32 rounding only).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jetgraph
from jetgraph.capture.zoo import FAMILIES, VOCAB, ResidualMLP
from jetgraph.codegen import CodegenError, emit, emit_source, plan
from tests.conftest import captured, random_ids

TOLERANCE = 1e-5
aten = torch.ops.aten


def assert_matches_interpreter(expansion: jetgraph.Expansion, ids: torch.Tensor, module=None,
                               dynamic: bool = False) -> None:
    """The emitted code against the interpreter on ``ids``; ``dynamic``: traced symbolically (the
    default of emit, twice as slow to trace) and checked on a second shape too."""
    module = module if module is not None else emit(expansion, ids, dynamic=dynamic)
    if dynamic:
        assert module.dynamic
        assert_matches_interpreter(expansion, random_ids(ids.shape[0] + 1, ids.shape[1] - 2, seed=9), module)
    with torch.no_grad():
        out = module(ids)
    reference = expansion.evaluate(ids)
    scale = max(v.abs().max().item() for v in reference.terms.values())
    for name, value in reference.terms.items():
        error = (out[name] - value).abs().max().item()
        assert error <= TOLERANCE * scale, f"{name}: {error:.3g} > {TOLERANCE} x {scale:.3g}"
    assert (out["target"] - reference.target).abs().max().item() <= TOLERANCE * scale
    assert (out["remainder"] - reference.remainder).abs().max().item() <= TOLERANCE * scale
    assert set(out) == set(reference.terms) | {"target", "remainder"}


# symbolic tracing costs ~4x the example's shape: at order 2 one family per kind of block
# (learned positions, rotary, parallel attention+MLP, sequential NeoX) traces symbolically
SYMBOLIC_AT_ORDER_2 = ("gpt2", "llama", "phi", "gpt_neox_sequential")


# orders 0 and 2 on every family (an order-2 expansion holds every unit's coefficients 0..2, so
# each family's ops are emitted at degrees 0, 1 and 2); order 1 on one family per kind of block
PATH_CASES = [(k, f) for k in (0, 1, 2) for f in FAMILIES if k != 1 or f in SYMBOLIC_AT_ORDER_2]


@pytest.mark.parametrize(("order", "family"), PATH_CASES)
def test_paths_match_interpreter_for_every_family(order: int, family: str) -> None:
    """Symbolic tracing (any shape) at order 2 for one family per kind of block, where a cached
    index table once made it wrong; the example's shape otherwise (tests/test_padding.py traces
    symbolically too)."""
    _, prog = captured(family)
    expansion = jetgraph.expand_paths(prog, order=order, granularity="sublayer", max_length=2).expansion()
    dynamic = order == 2 and family in SYMBOLIC_AT_ORDER_2
    assert_matches_interpreter(expansion, random_ids(2, 6, seed=order), dynamic=dynamic)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox", "opt"])
@pytest.mark.parametrize("order", [0, 1, 2])
def test_composed_expansions_and_lens_match_interpreter(family: str, order: int) -> None:
    _, prog = captured(family)
    ids = random_ids(2, 5, seed=3)
    first = jetgraph.expand(prog, 0, jetgraph.source_terms(prog), order=order, identity="jet")
    composed = jetgraph.expand(prog, 1, first, order=order)
    assert_matches_interpreter(composed, ids, dynamic=order == 2)
    states = [jetgraph.stream_term(prog, i) for i in range(len(prog.units) + 1)]
    lens = jetgraph.expand(prog, "decoder", states, order=order, weights="unit")
    assert_matches_interpreter(lens, ids, dynamic=order == 1)


def test_split_jets_and_tensor_weights_match_interpreter() -> None:
    _, prog = captured("gpt2")
    ids = random_ids(2, 5, seed=4)
    first = jetgraph.expand(prog, 0, jetgraph.source_terms(prog))
    split = jetgraph.expand(prog, 1, first, order=2, split=True)
    assert_matches_interpreter(split, ids)
    per_position = torch.rand(2, 5, 1, generator=torch.Generator().manual_seed(0))
    weighted = jetgraph.expand(prog, 0, jetgraph.source_terms(prog), order=1, weights=per_position)
    assert_matches_interpreter(weighted, ids)
    per_coordinate = torch.rand(2, prog.d_model, generator=torch.Generator().manual_seed(1))
    weighted = jetgraph.expand(prog, 1, jetgraph.source_terms(prog), order=1, weights=per_coordinate)
    assert_matches_interpreter(weighted, ids)


def test_same_unit_expanded_twice_in_a_chain() -> None:
    """A unit applied to its own terms: the schedule splits it into one step per DAG level."""
    _, prog = captured("llama")
    ids = random_ids(1, 6, seed=5)
    inner = jetgraph.expand(prog, 1, jetgraph.source_terms(prog), order=1)
    twice = jetgraph.expand(prog, 1, inner, order=1, identity="jet")
    schedule = plan(twice)
    assert sum(1 for s in schedule.steps if s.kind == "jet" and s.unit is prog.units[1]) == 2
    assert_matches_interpreter(twice, ids)


def test_one_batched_call_per_unit() -> None:
    """The exhaustive order-0 expansion: 2^N − 1 applications, but each unit's graph appears once."""
    _, prog = captured("gpt2")
    ids = random_ids(1, 8, seed=6)
    expansion = jetgraph.expand_stream(prog, centers=[jetgraph.stream_term(prog, 0)], weights="unit")
    schedule = plan(expansion)
    jets = [s for s in schedule.steps if s.kind == "jet"]
    assert [s.unit.name for s in jets] == [u.name for u in prog.units]
    assert [len(s.centers) for s in jets] == [2**i for i in range(len(prog.units))]
    module = emit(expansion, ids)
    matmuls = sum(1 for n in module.graph.nodes if n.target in (aten.addmm.default, aten.mm.default))
    per_forward = 4 * len(prog.units)  # c_attn, c_proj, c_fc, mlp c_proj per GPT-2 block
    assert matmuls == 2 * per_forward  # the model's own stream once, every unit once more
    assert_matches_interpreter(expansion, ids, module)


def test_without_remainder_only_the_paths_weights_remain() -> None:
    _, prog = captured("gpt2")
    ids = random_ids(1, 6)
    expansion = jetgraph.expand_paths(prog.at("sublayer"), include={"mlp"}, max_length=1).expansion()
    full, lean = emit(expansion, ids), emit(expansion, ids, remainder=False)
    assert set(lean(ids)) == set(expansion_names(expansion))
    assert not any("attn" in name for name, _ in lean.named_buffers())
    assert sum(b.numel() for b in lean.buffers()) < sum(b.numel() for b in full.buffers())
    for name in lean.term_names:
        torch.testing.assert_close(lean(ids)[name], full(ids)[name])


@pytest.mark.parametrize("family", ["llama", "gptj"])
def test_the_target_of_order_zero_paths_is_appended_from_the_graphs(family: str, monkeypatch) -> None:
    """Order-0 paths read no stream, so the target's forward is copied from the program's graphs
    (codegen.inline), not traced: its nodes are labelled so, the code runs on another shape, and
    target and remainder equal the Hugging Face logits and target − Σ paths. When the copy fails
    the forward is traced as before, with one warning naming the reason, and the outputs agree."""
    model, prog = captured(family)
    ids, other = random_ids(2, 6), random_ids(3, 5, seed=4)
    expansion = jetgraph.expand_paths(prog.at("sublayer"), paths=["E→U", "E→MLP_last→U"]).expansion()
    module = emit(expansion, ids)
    labels = {n.meta.get("jetgraph_step") for n in module.graph.nodes}
    assert "the model's own forward (target) and the remainder" in labels
    for batch in (ids, other):
        out = module(batch)
        with torch.no_grad():
            reference = model(batch).logits
        torch.testing.assert_close(out["target"], reference, rtol=1e-5, atol=1e-5)
        paths = sum(out[name] for name in module.term_names)
        torch.testing.assert_close(out["remainder"], out["target"] - paths, rtol=1e-6, atol=1e-6)

    from jetgraph.codegen import inline, modes

    def refuse(self, root):
        raise RuntimeError("a node the proxy cannot follow")

    monkeypatch.setattr(inline._Tracer, "trace", refuse)
    monkeypatch.setattr(modes, "_TOLD", set())
    with pytest.warns(RuntimeWarning, match="could not be appended.*a node the proxy cannot follow"):
        traced = emit(expansion, ids)
    assert "the model's own forward (target) and the remainder" not in {
        n.meta.get("jetgraph_step") for n in traced.graph.nodes}
    for name, value in traced(other).items():
        torch.testing.assert_close(value, module(other)[name], rtol=1e-5, atol=1e-5)


def expansion_names(expansion: jetgraph.Expansion) -> list[str]:
    return [t.name for t in expansion.terms]


def test_fusion_is_exact_to_rounding() -> None:
    _, prog = captured("gpt2")
    ids = random_ids(2, 6, seed=7)
    expansion = jetgraph.expand_paths(prog, order=1, max_length=1).expansion()
    fused, plain = emit(expansion, ids), emit(expansion, ids, fuse_ops=False)
    assert fused.fused["layer_norm"] > 0 and fused.fused["gelu_tanh"] > 0
    assert not any(n.target is aten.native_layer_norm.default for n in plain.graph.nodes)
    a, b = fused(ids), plain(ids)
    for name in fused.term_names:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5)


def test_emitted_graph_follows_the_input_device() -> None:
    """No device constant is baked in: the module runs on the meta device once moved there."""
    _, prog = captured("llama")
    ids = random_ids(1, 6)
    module = emit(jetgraph.expand_paths(prog, order=1, max_length=1).expansion(), ids)
    for node in module.graph.nodes:
        assert not any(isinstance(v, torch.device) for v in node.kwargs.values()), node.format_node()
    out = module.to("meta")(ids.to("meta"))
    assert out["remainder"].device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_emitted_graph_runs_on_cuda() -> None:
    _, prog = captured("gpt2")
    ids = random_ids(1, 6)
    expansion = jetgraph.expand_paths(prog, order=1, max_length=1).expansion()
    module = emit(expansion, ids)
    cpu = module(ids)
    gpu = module.to("cuda")(ids.cuda())
    for name in module.term_names:
        torch.testing.assert_close(gpu[name].cpu(), cpu[name], rtol=1e-4, atol=1e-4)


def test_code_of_a_fixed_shape_program_refuses_other_shapes() -> None:
    """A program whose export had to fix the shapes is traced on the example as it is."""
    _, prog = captured("gpt2")
    static = prog.replace(dynamic=False, example_input_ids=random_ids(1, 6))  # as if export fixed (1, 6)
    expansion = jetgraph.expand_paths(static, max_length=1).expansion()
    module = emit(expansion, random_ids(1, 6))
    assert not module.dynamic and module.input_shape == (1, 6)
    torch.testing.assert_close(module(random_ids(1, 6))["remainder"],
                               expansion.evaluate(random_ids(1, 6)).remainder, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"emitted for input_ids of shape \(1, 6\) \(the model's export "
                                         r"fixed the shape\), got \(1, 7\)"):
        module(random_ids(1, 7))


def test_bad_arguments_are_refused(tmp_path) -> None:
    _, prog = captured("gpt2")
    expansion = jetgraph.expand_paths(prog, max_length=1).expansion()
    with pytest.raises(TypeError, match="emit takes an Expansion"):
        emit(prog)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="integer tensor"):
        emit(expansion, torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"writes a \.py module"):
        emit_source(expansion, tmp_path / "expanded.txt")
    with pytest.raises(ValueError, match="must be a Python identifier"):
        emit_source(expansion, tmp_path / "my-model.py")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------- source
def test_source_is_deterministic_and_imports_only_torch(tmp_path) -> None:
    _, prog = captured("gpt2")
    ids = random_ids(2, 5, seed=8)
    expansion = jetgraph.expand(prog, 1, jetgraph.expand(prog, 0, jetgraph.source_terms(prog), order=1),
                                order=2)
    first = emit_source(expansion, tmp_path / "a" / "expanded.py", ids)
    second = emit_source(expansion, tmp_path / "b" / "expanded.py", ids)
    assert first.read_bytes() == second.read_bytes()
    weights = first.with_suffix(".safetensors")
    assert weights.read_bytes() == second.with_suffix(".safetensors").read_bytes()
    source = first.read_text()
    lines = source.splitlines()
    imports = sorted({line.split()[1] for line in lines if line.startswith(("import ", "from "))})
    assert imports == ["__future__", "os", "safetensors.torch", "torch"]
    assert "# ── block1: order-2 jet at 6 centre(s), 18 term(s)" in source
    assert "embed.position→block0^1→block1^2" in source

    reference = expansion.evaluate(ids)
    torch.save({"ids": ids, "terms": reference.terms, "remainder": reference.remainder},
               tmp_path / "reference.pt")
    script = textwrap.dedent(f"""
        import json, sys, torch
        sys.path.insert(0, {str(first.parent)!r})
        import expanded
        data = torch.load({str(tmp_path / 'reference.pt')!r})
        model = expanded.load("cpu")
        out = model(data["ids"])
        compiled = torch.compile(model, backend="aot_eager")(data["ids"])
        errors = [(out[k] - v).abs().max().item() for k, v in data["terms"].items()]
        errors += [(compiled[k] - v).abs().max().item() for k, v in data["terms"].items()]
        errors.append((out["remainder"] - data["remainder"]).abs().max().item())
        shorter = model(data["ids"][:, :3])["remainder"].shape
        try:
            model(torch.zeros(1, 65, dtype=torch.long))
            shape_error = ""
        except ValueError as exc:
            shape_error = str(exc)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("jetgraph", "transformers"))
        print(json.dumps({{"error": max(errors), "loaded": loaded, "shape_error": shape_error,
                          "shorter": list(shorter)}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    scale = max(v.abs().max().item() for v in reference.terms.values())
    assert report["error"] <= TOLERANCE * scale
    assert report["loaded"] == []
    assert "65 positions, more than the model's context of 64" in report["shape_error"]
    assert report["shorter"] == [2, 3, prog.d_model]  # one file runs on any [batch, seq]


def test_source_compiles_with_inductor(tmp_path) -> None:
    """torch.compile's default backend on the generated module (a small MLP network, CPU)."""
    torch.manual_seed(0)
    model = ResidualMLP(d=16, hidden=32, layers=2).eval()
    ids = random_ids(1, 4)
    prog = jetgraph.capture(model, ids)
    expansion = jetgraph.expand_paths(prog, order=1).expansion()
    path = emit_source(expansion, tmp_path / "mlp_paths.py", ids)
    reference = expansion.evaluate(ids)
    torch.save({"ids": ids, "terms": reference.terms}, tmp_path / "reference.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(path.parent)!r})
        import mlp_paths
        data = torch.load({str(tmp_path / 'reference.pt')!r})
        out = torch.compile(mlp_paths.load())(data["ids"])
        print(max((out[k] - v).abs().max().item() for k, v in data["terms"].items()))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    scale = max(v.abs().max().item() for v in reference.terms.values())
    assert float(result.stdout.strip().splitlines()[-1]) <= TOLERANCE * scale


def test_unprintable_constant_is_a_codegen_error() -> None:
    from jetgraph.codegen.source import _expr

    with pytest.raises(CodegenError, match="cannot print a constant of type object"):
        _expr(object())


# --------------------------------------------------------------- hypothesis
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=st.integers(1, 3),
    width=st.sampled_from([4, 8]),
    activation=st.sampled_from([torch.nn.GELU, torch.nn.Tanh, torch.nn.SiLU, torch.nn.Sigmoid]),
    order=st.integers(0, 2),
    identity=st.sampled_from(["pass", "jet"]),
    weights=st.sampled_from(["uniform", "unit", 0.5]),
    seed=st.integers(0, 2**16),
)
def test_random_residual_networks(layers, width, activation, order, identity, weights, seed) -> None:
    torch.manual_seed(seed)
    model = ResidualMLP(vocab=VOCAB, d=width, hidden=2 * width, layers=layers, activation=activation).eval()
    ids = random_ids(1, 3, seed=seed)
    prog = jetgraph.capture(model, ids)
    expansion = jetgraph.expand_stream(prog, order=order, weights=weights, identity=identity)
    if order <= 1:  # also decode every stream term: a logit-space expansion on top
        expansion = jetgraph.expand(prog, "decoder", expansion, order=order, weights="unit")
    assert_matches_interpreter(expansion, ids)
