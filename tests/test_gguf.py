"""GGUF files load like model folders (dequantised once, cached), and text is tokenised with
the tokenizer's own special-token rules (a BOS where the tokenizer adds one)."""

from __future__ import annotations

import time

import pytest
import torch

import jetgraph
from jetgraph.capture import loading
from jetgraph.cli import main
from tests.conftest import require_smollm2, require_tinystories


def test_bad_gguf_inputs_are_one_line_errors(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("JETGRAPH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(jetgraph.ModelLoadError, match="no GGUF file at"):
        jetgraph.load_model(str(tmp_path / "absent.gguf"))
    broken = tmp_path / "broken" / "model.Q4_0.gguf"
    broken.parent.mkdir()
    broken.write_bytes(b"GGUF")
    with pytest.raises(jetgraph.ModelLoadError, match=r"could not read .* as a GGUF causal LM"):
        jetgraph.load_model(str(broken))
    leftovers = list((tmp_path / "cache").rglob("*")) if (tmp_path / "cache").exists() else []
    assert all(p.is_dir() for p in leftovers), leftovers  # nothing half-written
    (broken.parent / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(jetgraph.ModelLoadError, match="holds 2 GGUF files"):
        jetgraph.load_model(str(broken.parent))


def test_a_gguf_file_or_its_folder_loads_like_smollm2(tmp_path, monkeypatch) -> None:
    require_smollm2()
    gguf = loading.smollm2_gguf_path()
    reference, _ = jetgraph.load_model("smollm2")
    model, tokenizer = jetgraph.load_model(str(gguf))  # converted once into the cache
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)

    def no_conversion(*_):
        raise AssertionError("a cached GGUF was converted again")

    monkeypatch.setattr(loading, "_dequantise", no_conversion)
    folder = tmp_path / "holding"
    folder.mkdir()
    (folder / gguf.name).symlink_to(gguf)
    start = time.perf_counter()
    again, _ = jetgraph.load_model(str(folder))
    assert time.perf_counter() - start < 30
    assert type(again).__name__ == type(reference).__name__


def test_text_keeps_the_tokenizers_bos(tmp_path, capsys) -> None:
    path = require_tinystories()
    model, tokenizer = jetgraph.load_model(path)
    assert tokenizer("Once").input_ids[0] == tokenizer.bos_token_id  # this tokenizer adds a BOS
    ids = loading.encode(model, tokenizer, "Once upon a time")
    assert ids[0, 0].item() == tokenizer.bos_token_id
    lens = jetgraph.lens(model, "Once upon a time", orders=(0,), tokenizer=tokenizer)[0]
    assert lens.logits.shape[2] == ids.shape[1]
    assert main(["capture", str(path), "--text", "Once upon a time"]) == 0
    assert f"({ids.shape[1]} tokens;" in capsys.readouterr().out
