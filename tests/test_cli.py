"""The command line: help, exit codes, capture output."""

from __future__ import annotations

import pytest

from jetgraph.cli import main
from tests.conftest import require_tinystories


def test_help_exits_zero(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "capture" in capsys.readouterr().out


def test_no_command_prints_help_and_returns_2(capsys) -> None:
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out


def test_unknown_model_returns_1(capsys) -> None:
    assert main(["capture", "no-such-model"]) == 1
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


def test_capture_tinystories_writes_summary(tmp_path, capsys) -> None:
    path = require_tinystories()
    out = tmp_path / "summary.txt"
    assert main(["capture", str(path), "--text", "Once upon a time", "--out", str(out)]) == 0
    text = out.read_text()
    assert "LlamaForCausalLM" in text and "block1" in text
    assert "eager attention)| = 0" in text or "eager attention)| = " in text
    assert text.strip() in capsys.readouterr().out


def test_emit_writes_an_importable_module(tmp_path, capsys) -> None:
    import importlib.util

    import torch

    path = require_tinystories()
    out = tmp_path / "expanded_tiny.py"
    assert main(["emit", str(path), "-o", str(out), "--text", "Once upon a time", "--order", "1",
                 "--exclude", "attn", "--granularity", "sublayer"]) == 0
    assert "wrote" in capsys.readouterr().out
    spec = importlib.util.spec_from_file_location("expanded_tiny", out)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ids = torch.zeros(module.INPUT_SHAPE, dtype=torch.long)
    result = module.load()(ids)
    assert set(module.TERMS) | {"target", "remainder"} == set(result)
    assert all("attn" not in name for name in module.TERMS)


def test_emit_lens(tmp_path) -> None:
    path = require_tinystories()
    out = tmp_path / "lens.py"
    assert main(["emit", str(path), "-o", str(out), "--expansion", "lens", "--order", "1"]) == 0
    assert "'h0→unembed^1'," in out.read_text()


def test_emit_usage_errors(tmp_path, capsys) -> None:
    path = require_tinystories()
    assert main(["emit", str(path), "-o", str(tmp_path / "x.txt")]) == 2
    assert "--out must name a .py file" in capsys.readouterr().err
    assert main(["emit", str(path), "-o", str(tmp_path / "x.py"), "--max-length", "2", "--limit", "3"]) == 2
    assert "more than --limit 3" in capsys.readouterr().err
    assert main(["emit", str(path), "-o", str(tmp_path / "x.py"), "--exclude", "nonsense"]) == 1
    assert "unknown units or kinds" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_lens_command(tmp_path, capsys) -> None:
    path = require_tinystories()
    png, table = tmp_path / "lens.png", tmp_path / "lens.csv"
    assert main(["lens", str(path), "Once upon a time", "--order", "2", "--out", str(png),
                 "--csv", str(table)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "cos@i2" in capsys.readouterr().out
    assert table.read_text().startswith("centre,cosine")


def test_ngrams_command_with_keywords(tmp_path, capsys) -> None:
    path = require_tinystories()
    out = tmp_path / "bigrams.csv"
    assert main(["ngrams", str(path), "--paths", "E→U", "E→MLP_last→U", "--top", "20",
                 "--keywords", "toxic", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "keyword mass (toxic" in printed
    assert (tmp_path / "bigrams-0.csv").read_text().count("\n") == 21
    assert (tmp_path / "bigrams-1.csv").is_file()
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    assert main(["ngrams", str(path), "--keywords", str(empty), "--out", str(out)]) == 1
    assert "is empty" in capsys.readouterr().err


def test_paths_command(tmp_path, capsys) -> None:
    path = require_tinystories()
    out = tmp_path / "paths.dot"
    assert main(["paths", str(path), "--render", str(out)]) == 0
    assert "paths at sublayer granularity" in capsys.readouterr().out
    assert out.read_text().startswith("digraph")


def test_mismatched_tokenizer_and_long_text(capsys) -> None:
    from tests.conftest import SHARED_MODELS

    path = require_tinystories()
    gpt2_tokenizer = SHARED_MODELS / "gpt2-tokenizer" / "tokenizer.json"
    if not gpt2_tokenizer.is_file():
        pytest.skip("shared/models/gpt2-tokenizer is absent")
    assert main(["lens", str(path), "Hello there", "--tokenizer", str(gpt2_tokenizer)]) == 1
    assert "do not belong together" in capsys.readouterr().err
    assert main(["lens", str(path), "once upon a time " * 400]) == 1
    assert "the model's context holds" in capsys.readouterr().err


def test_demo_writes_every_output(tmp_path, capsys) -> None:
    path = require_tinystories()
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(path), "--text", "Once upon a time", "--out", str(out)]) == 0
    expected = {"program.txt", "program.svg", "lens.png", "lens_order1.csv", "bigrams_0.csv", "bigrams_1.csv",
                "bigrams_2.csv", "paths.svg", "bigram_paths.py", "bigram_paths.safetensors", "summary.txt"}
    assert expected <= {p.name for p in out.iterdir()}
    printed = capsys.readouterr().out
    assert "toxic-word mass" in printed and "logits reproduced to" in printed
