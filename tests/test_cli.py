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
