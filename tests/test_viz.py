"""Pictures: program and expansion graphs as SVG, PNG and DOT; the no-`dot` error path."""

from __future__ import annotations

import re
import shutil

import pytest

from jetgraph.passes.paths import expand_paths
from jetgraph.viz import RenderError, expansion_graph, program_graph, render
from tests.conftest import captured, random_ids

needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="graphviz's dot is not installed (apt-get install graphviz)")


@needs_dot
@pytest.mark.parametrize("suffix", [".svg", ".png"])
def test_program_picture(tmp_path, suffix: str) -> None:
    _, prog = captured("gpt_neox")
    out = render(program_graph(prog.at("sublayer")), tmp_path / f"ir{suffix}")
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG") if suffix == ".png" else b"<svg" in data
    if suffix == ".svg":
        assert b"attn0" in data and b"parallel" in data


@needs_dot
def test_expansion_picture_with_norms_and_cap(tmp_path) -> None:
    _, prog = captured("residual_mlp")
    expansion = expand_paths(prog).expansion()
    graph = expansion_graph(expansion, random_ids(1, 4), max_nodes=6)
    assert "more terms" in graph.source and "‖·‖" in graph.source
    svg = render(graph, tmp_path / "paths.svg").read_text()
    assert "unembed" in svg


def test_program_collapses_repeated_blocks() -> None:
    _, prog = captured("llama")
    source = program_graph(prog.at("sublayer"), max_nodes=2).source
    assert "more units" in source and "mlp1" in source and "attn0" in source


def test_dot_text_and_errors(tmp_path, monkeypatch) -> None:
    _, prog = captured("gpt2")
    out = render(program_graph(prog), tmp_path / "ir.dot")
    assert out.read_text().startswith("digraph")
    with pytest.raises(RenderError, match="unsupported picture format"):
        render(program_graph(prog), tmp_path / "ir.jpg")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RenderError, match="apt-get install graphviz"):
        render(program_graph(prog), tmp_path / "nodot.svg")
    assert (tmp_path / "nodot.dot").read_text().startswith("digraph")
    assert not (tmp_path / "nodot.svg").exists()


@pytest.mark.parametrize("with_input", [True, False])
def test_collapsed_node_counts_terms_not_drawn(with_input: bool) -> None:
    _, prog = captured("residual_mlp")
    expansion = expand_paths(prog).expansion()
    graph = expansion_graph(expansion, random_ids(1, 4) if with_input else None, max_nodes=6)
    drawn = sum(1 for term in expansion.terms if re.search(rf"^\s*{term.uid} \[", graph.source, re.M))
    count = re.search(r"… (\d+) more terms \((smaller norms|not drawn)\) …", graph.source)
    assert count is not None and 0 < drawn < len(expansion)
    assert int(count.group(1)) == len(expansion) - drawn
    assert count.group(2) == ("smaller norms" if with_input else "not drawn")
