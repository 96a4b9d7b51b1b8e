"""Models larger than memory: a folder read lazily from safetensors gives the same programs,
lens and tables as the model in memory, while holding only the weights a computation needs."""

from __future__ import annotations

import pytest
import torch

import jetgraph
from jetgraph.applications import iterative_lenses, ngram_table
from jetgraph.capture import shared
from jetgraph.capture.zoo import _configs, tiny_model
from jetgraph.errors import CaptureError, ModelLoadError


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def saved(request, tmp_path_factory):
    """(eager model, lazily loaded model, folder) of a 4-layer tiny model (GPT-2: tied weights)."""
    model = tiny_model(request.param, seed=0, layers=4)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return model, jetgraph.load_lazy(folder), folder


IDS = torch.tensor([[5, 17, 3, 9, 42, 7, 11, 2]])


def test_nothing_is_read_until_needed(saved) -> None:
    _, lazy, _ = saved
    store = lazy.jetgraph_weights
    parameters = list(lazy.parameters())
    assert all(p.untyped_storage().nbytes() <= p.element_size() for p in parameters)  # no memory
    assert all(torch.isnan(p.float()).all() for p in parameters)  # an absent weight reads as NaN
    assert store.loaded() == 0 and len(store) == len({id(p) for p in parameters})


def test_lazy_program_streams_blocks_and_equals_the_model(saved) -> None:
    model, lazy, _ = saved
    prog = jetgraph.capture(lazy, IDS)
    store = lazy.jetgraph_weights
    pinned = store.loaded()  # encoder, side inputs and decoder only
    assert 0 < pinned < len(store) / 2
    other = torch.tensor([[8, 1, 4, 30, 2, 2, 19, 6, 14, 3, 21]])
    with torch.no_grad():
        torch.testing.assert_close(prog(other), model(other).logits, rtol=1e-5, atol=1e-5)
        assert store.loaded() == pinned  # every block was released after its turn
        unit = prog.at("sublayer").units[-1]  # run outside `resident`: its weights are absent
        h = prog.stream(other)[-1]
        assert torch.isnan(unit(h, prog.side_inputs(other))).any()
        with prog.resident([unit]):
            assert torch.isfinite(unit(h, prog.side_inputs(other))).all()
        assert store.loaded() == pinned


def test_lazy_lens_and_table_equal_the_eager_ones(saved) -> None:
    model, lazy, _ = saved
    prog, eager = jetgraph.capture(lazy, IDS), jetgraph.capture(model, IDS)
    ours = iterative_lenses(prog, IDS, orders=(0, 1))
    theirs = iterative_lenses(eager, IDS, orders=(0, 1))
    for order in (0, 1):
        torch.testing.assert_close(ours[order].logits, theirs[order].logits, rtol=1e-5, atol=1e-5)
    path = f"E->{prog.at('sublayer').units[-1].name}->U"
    lazy_table = ngram_table(prog, path, top=20, progress=False)
    eager_table = ngram_table(eager, path, top=20, progress=False)
    pairs = [(e["context_ids"], e["next_id"]) for e in lazy_table.entries()]
    assert pairs == [(e["context_ids"], e["next_id"]) for e in eager_table.entries()]
    torch.testing.assert_close(lazy_table.top_values, eager_table.top_values, rtol=1e-5, atol=1e-5)
    assert lazy.jetgraph_weights.loaded() < len(lazy.jetgraph_weights) / 2


def test_lazy_loading_errors(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        jetgraph.load_lazy(tmp_path)
    tiny_model("llama", seed=0).config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="safetensors"):
        jetgraph.load_lazy(tmp_path)


# --------------------------------------------------------------------------- mixed attention
# Issue 27: blocks that look alike may differ in attention type, window and RoPE table, and a
# forward may pick each block's mask and RoPE table by its position in the stack from the config
# (Gemma 3: ``layer_types[i]``). Lazy programs are checked whole, and equal the eager ones.

SLIDING, FULL = "sliding_attention", "full_attention"
MIXED_TYPES = [SLIDING, SLIDING, FULL, SLIDING, FULL]
LONG_IDS = torch.tensor([[5, 17, 3, 9, 42, 7, 11, 2, 60, 33, 8, 21]])  # longer than the window (4)
TOLERANCE = dict(rtol=0, atol=1e-4)  # float32 logits


def _gemma3_mixed() -> torch.nn.Module:
    """A 5-layer Gemma 3 text model: sliding (window 4) and full attention, two RoPE bases."""
    import transformers

    config = transformers.Gemma3TextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8, max_position_embeddings=64,
        sliding_window=4, layer_types=MIXED_TYPES,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        bos_token_id=0, eos_token_id=1, pad_token_id=None)
    torch.manual_seed(0)
    return transformers.Gemma3ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """(eager model, its folder, the model's logits on LONG_IDS)."""
    model = _gemma3_mixed()
    folder = tmp_path_factory.mktemp("gemma3")
    model.save_pretrained(folder)
    with torch.no_grad():
        reference = model(LONG_IDS, use_cache=False).logits
    return model, folder, reference


def _spy_stack_captures(monkeypatch) -> list[list[int]]:
    """Record the representatives of every stack capture_shared exports."""
    calls: list[list[int]] = []
    original = shared._capture_stack

    def spy(model, stack, *args):
        calls.append(list(stack.representatives))
        return original(model, stack, *args)

    monkeypatch.setattr(shared, "_capture_stack", spy)
    return calls


def test_mixed_attention_lazy_equals_eager_equals_the_model(mixed, monkeypatch) -> None:
    model, folder, reference = mixed
    eager = jetgraph.capture(model, LONG_IDS)
    stack = shared.find_block_stack(model)
    assert stack.representatives == [0, 2] and stack.group_of == [0, 0, 1, 0, 1]
    assert "config.layer_types" in [entry.path for entry in stack.per_layer]
    calls = _spy_stack_captures(monkeypatch)
    lazy = jetgraph.load_lazy(folder)
    store, peak = lazy.jetgraph_weights, [0]
    acquire = store._acquire

    def counted(names):
        taken = acquire(names)
        peak[0] = max(peak[0], store.loaded())
        return taken

    monkeypatch.setattr(store, "_acquire", counted)
    prog = jetgraph.capture(lazy, LONG_IDS)
    assert calls == [[0, 2]]  # shared, checked whole (both forwards streamed), no fallback
    assert model.config.layer_types == MIXED_TYPES  # the config is restored after the export
    per_block = len(list(model.model.layers[0].parameters()))
    assert peak[0] <= store.loaded() + 2 * per_block  # the two representatives at most, never the model
    with torch.no_grad():
        torch.testing.assert_close(eager(LONG_IDS), reference, **TOLERANCE)
        torch.testing.assert_close(prog(LONG_IDS), reference, **TOLERANCE)
        torch.testing.assert_close(prog(LONG_IDS), eager(LONG_IDS), **TOLERANCE)


def _merge_all_blocks(monkeypatch) -> None:
    """Group every block with the first (sliding) one: a wrong grouping."""
    monkeypatch.setattr(shared, "structure_keys", lambda blocks, per_layer: [0] * len(blocks))


def test_misgrouped_blocks_fall_back_to_one_graph_per_block(mixed, monkeypatch) -> None:
    """The whole-model check catches the wrong grouping; capture exports every block instead."""
    model, folder, reference = mixed
    _merge_all_blocks(monkeypatch)
    assert shared.find_block_stack(model).representatives == [0]
    calls = _spy_stack_captures(monkeypatch)
    prog = jetgraph.capture(jetgraph.load_lazy(folder), LONG_IDS)
    assert calls == [[0], [0, 1, 2, 3, 4]]
    with torch.no_grad():
        torch.testing.assert_close(prog(LONG_IDS), reference, **TOLERANCE)


def test_misgrouped_blocks_never_give_a_wrong_program(mixed, monkeypatch) -> None:
    """When even the per-block capture is wrong (here: made wrong), lazy capture raises. (The
    eager path declines to share instead: tests/test_shared_capture.py.)"""
    _, folder, _ = mixed
    _merge_all_blocks(monkeypatch)
    find = shared.find_block_stack
    monkeypatch.setattr(shared, "find_block_stack", lambda model, per_block=False: find(model))
    with pytest.raises(CaptureError, match="not even with one exported graph per block"):
        jetgraph.capture(jetgraph.load_lazy(folder), LONG_IDS)


def _windowed_families() -> list[str]:
    """The zoo's families whose config has per-layer entries or a window."""
    families = []
    for family, make in _configs(4).items():
        config = vars(make())
        per_layer = any(isinstance(v, (list, tuple)) and len(v) == 4 for v in config.values())
        window = any("window" in key and value for key, value in config.items())
        if per_layer or window:
            families.append(family)
    return families


@pytest.mark.parametrize("family", _windowed_families())
def test_windowed_family_lazy_equals_eager(family: str, tmp_path) -> None:
    model = tiny_model(family, seed=0, layers=4)
    model.save_pretrained(tmp_path)
    prog, eager = jetgraph.capture(jetgraph.load_lazy(tmp_path), LONG_IDS), jetgraph.capture(model, LONG_IDS)
    with torch.no_grad():
        torch.testing.assert_close(prog(LONG_IDS), eager(LONG_IDS), **TOLERANCE)
        torch.testing.assert_close(prog(LONG_IDS), model(LONG_IDS, use_cache=False).logits, **TOLERANCE)
