"""Models larger than memory: a folder read lazily from safetensors gives the same programs,
lens and tables as the model in memory, while holding only the weights a computation needs."""

from __future__ import annotations

import pytest
import torch

import jetgraph
from jetgraph.applications import iterative_lenses, ngram_table
from jetgraph.capture.zoo import tiny_model
from jetgraph.errors import ModelLoadError


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
