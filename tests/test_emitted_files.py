"""Files jetgraph writes: emitted modules (ordinary file modes, a docstring that names non-unit
weights, a cost planned first), whole-or-nothing writes, the version module, and examples that
write only under their --out."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import tomllib
from pathlib import Path

import pytest

import jetgraph
from tests.conftest import captured, random_ids

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_emitted_files_get_ordinary_modes(tmp_path, umask: int) -> None:
    _, prog = captured("gpt2")
    expansion = jetgraph.expand_paths(prog, max_length=1).expansion()
    previous = os.umask(umask)
    try:
        module = jetgraph.emit_source(expansion, tmp_path / "expanded.py", random_ids(1, 3))
    finally:
        os.umask(previous)
    for path in (module, module.with_suffix(".safetensors")):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name
    assert f"emitted by jetgraph {jetgraph.__version__}" in module.read_text()


def test_emitted_docstring_names_non_unit_weights() -> None:
    from jetgraph.codegen.source import term_weights
    from tests.conftest import captured

    _, prog = captured("llama")
    sub = prog.at("sublayer")
    unit = jetgraph.expand_paths(sub, include={"mlp0"}, max_length=1).expansion()
    assert term_weights(unit).startswith("unit (each output is the path's own value")
    uniform = jetgraph.expand_paths(sub, include={"mlp0"}, max_length=1, weights="uniform").expansion()
    described = term_weights(uniform)
    assert described.startswith("not unit: the last step's weight is 0.0625")  # 1/16: 4 units, 1 source
    assert "earlier steps carry 0.5" in described  # mlp0 reads h1, where the stream has 2 terms
    assert jetgraph.expand_paths(sub, include="mlp0").count() == 2  # a name, not its letters


def test_emit_plans_its_cost_first() -> None:
    from jetgraph.cost import expansion_plan
    from jetgraph.errors import CostError
    from tests.conftest import captured, random_ids

    _, prog = captured("gpt2")
    ids = random_ids(1, 5)
    expansion = jetgraph.expand_paths(prog, max_length=1).expansion()
    with pytest.raises(CostError, match=r"refusing emitted code for \d+ terms: .*raise max_seconds"):
        jetgraph.emit(expansion, ids, max_seconds=1e-9)
    logits = expansion_plan(prog, len(expansion), ids, 0, "x")
    stream = expansion_plan(prog, len(expansion), ids, 0, "x", space="stream")
    # stream-space terms are narrower than logits (d < V): planned smaller in memory and work
    # (the plans themselves are held to measured runs in tests/test_plans.py)
    assert stream.peak_bytes < logits.peak_bytes and stream.flops < logits.flops
    assert jetgraph.emit(expansion, ids).term_names  # within the default limit it runs


def test_atomic_write_leaves_nothing_half_written(tmp_path) -> None:
    from jetgraph.files import atomic_write, check_writable

    target = tmp_path / "out" / "table.csv"
    atomic_write(target, "old\n")

    def crash(name: str) -> None:
        with open(name, "w") as handle:
            handle.write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, crash)
    assert target.read_text() == "old\n" and sorted(p.name for p in target.parent.iterdir()) == ["table.csv"]
    assert target.stat().st_mode & 0o777 == 0o644
    with pytest.raises(IsADirectoryError, match="is a folder"):
        check_writable(tmp_path / "out")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        check_writable(target / "x.csv")
    assert check_writable(tmp_path / "new" / "deeper" / "x.csv") == tmp_path / "new" / "deeper" / "x.csv"
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_version_lives_in_its_own_module() -> None:
    from jetgraph._version import __version__

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert jetgraph.__version__ == __version__ == pyproject["project"]["version"]
    tree = ast.parse((ROOT / "jetgraph" / "codegen" / "source.py").read_text())
    top_level = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 and node.module == "jetgraph"]
    assert not top_level, "codegen must not import the top-level jetgraph package"


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"_example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("out", ["folder", "file.md"])
def test_real_model_results_writes_only_under_out(tmp_path, monkeypatch, capsys, out: str) -> None:
    script = _load_example("real_model_results")
    fake_root = tmp_path / "repo"  # where the defaults would write
    (fake_root / "docs").mkdir(parents=True)
    models = tmp_path / "tinystories"
    models.mkdir()
    (models / "config.json").write_text("{}")
    monkeypatch.setattr(script, "ROOT", fake_root)
    monkeypatch.setattr(script, "TINYSTORIES", models)
    monkeypatch.setattr(script, "model_section", lambda name, source: ([f"## {name}"], {"source": source}))
    target = tmp_path / "out" / out
    script.main(["--models", "tinystories", "--out", str(target)])
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    expected = ([Path("out/folder/real_models.json"), Path("out/folder/results-real-models.md")]
                if out == "folder" else [Path("out/file.json"), Path("out/file.md")])
    assert written == sorted([*expected, Path("tinystories/config.json")])
    assert json.loads((tmp_path / expected[0]).read_text()) == {"TinyStories-656K": {"source": str(models)}}
    assert re.search(r"\[\s*\d+\.\d s\] wrote ", capsys.readouterr().err)
