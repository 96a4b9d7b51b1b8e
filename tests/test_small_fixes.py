"""Small fixes of issue 10: hub ids in the local cache, fast offline failure, .gguf message, empty
input ids, the expansion picture's "more terms" count, emitted file modes, the version module,
and real_model_results.py writing only under --out."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch

import jetgraph
from jetgraph.passes.paths import expand_paths
from jetgraph.viz import expansion_graph
from tests.conftest import SHARED_MODELS, captured, random_ids

ROOT = Path(__file__).resolve().parents[1]
GPT2_TOKENIZER = SHARED_MODELS / "gpt2-tokenizer" / "tokenizer.json"


# ------------------------------------------------------------------ loading
def _fake_hub_cache(hub: Path) -> None:
    """A Hugging Face cache holding a tiny random GPT-2 under the slash-less id ``gpt2``."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / "models--gpt2"
    snapshot = repo / "snapshots" / commit
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=32, n_embd=8, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(snapshot)
    PreTrainedTokenizerFast(tokenizer_file=str(GPT2_TOKENIZER)).save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


_HUB_SCRIPT = textwrap.dedent("""
    import json, time
    from jetgraph.capture.loading import load_model, load_tokenizer
    from jetgraph.errors import ModelLoadError

    result = {}
    model, tokenizer = load_model("gpt2")
    result["cached"] = [type(model).__name__, model.config.n_layer, len(tokenizer)]
    result["tokenizer"] = len(load_tokenizer("gpt2"))
    for name in ("openai-community/not-cached-model", "not-cached-model"):
        start = time.perf_counter()
        try:
            load_model(name)
            result[name] = ["loaded", 0.0]
        except ModelLoadError as exc:
            result[name] = [str(exc), time.perf_counter() - start]
    print("RESULT " + json.dumps(result))
""")


def test_cached_hub_id_loads_and_uncached_fails_at_once(tmp_path) -> None:
    if not GPT2_TOKENIZER.is_file():
        pytest.skip(f"{GPT2_TOKENIZER} is absent (shared/models)")
    hub = tmp_path / "hf" / "hub"
    _fake_hub_cache(hub)
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    # a closed local port stands for "no network" on any machine, with or without one
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(hub), HF_ENDPOINT="http://127.0.0.1:9",
               PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", _HUB_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[0].removeprefix("RESULT "))
    assert result["cached"] == ["GPT2LMHeadModel", 1, 50257]
    assert result["tokenizer"] == 50257
    for name in ("openai-community/not-cached-model", "not-cached-model"):
        message, seconds = result[name]
        assert f"unknown model {name!r}" in message
        assert "not in the local Hugging Face cache" in message and "no network" in message
        assert seconds < 2.0, f"{name}: took {seconds:.1f} s to fail offline"


def test_paths_that_do_not_exist_are_unknown(tmp_path) -> None:
    with pytest.raises(jetgraph.ModelLoadError, match=r"unknown model .*no such folder"):
        jetgraph.load_model(str(tmp_path / "absent"))


# ------------------------------------------------------------------- ir
@pytest.mark.parametrize("shape", [(1, 0), (0, 4), (0,)])
def test_empty_input_ids_are_refused(shape: tuple[int, ...]) -> None:
    _, prog = captured("gpt2")
    ids = torch.zeros(shape, dtype=torch.long)
    for call in (prog, prog.stream, prog.at("sublayer").stream):
        with pytest.raises(ValueError, match=r"input_ids is empty: shape \("):
            call(ids)


# ------------------------------------------------------------------ viz
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


# -------------------------------------------------------------- codegen
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


def test_version_lives_in_its_own_module() -> None:
    from jetgraph._version import __version__

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert jetgraph.__version__ == __version__ == pyproject["project"]["version"]
    tree = ast.parse((ROOT / "jetgraph" / "codegen" / "source.py").read_text())
    top_level = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 and node.module == "jetgraph"]
    assert not top_level, "codegen must not import the top-level jetgraph package"


# ------------------------------------------------------------- examples
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


# ------------------------------------------------------- bounds checked before any work
def test_granularity_is_checked_before_the_export(monkeypatch) -> None:
    import jetgraph.capture
    from jetgraph.capture.zoo import tiny_model

    def no_export(*_):
        raise AssertionError("exported before checking the granularity")

    monkeypatch.setattr(jetgraph.capture, "export_model", no_export)
    with pytest.raises(ValueError, match=r"granularity must be 'block' .* or 'sublayer' .*got 'layer'"):
        jetgraph.capture(tiny_model("llama"), torch.zeros(1, 4, dtype=torch.long), granularity="layer")


def test_orders_are_bounded_with_a_reason() -> None:
    from jetgraph.taylor import MAX_ORDER
    from tests.conftest import captured, random_ids

    _, prog = captured("llama")
    states = prog.stream(random_ids(1, 4))
    with pytest.raises(ValueError, match=f"above the highest supported order {MAX_ORDER}: .*overflow int64"):
        jetgraph.jet(prog.decoder, states[0], states[-1], order=MAX_ORDER + 2)
    with pytest.raises(ValueError, match="above the highest supported order"):
        jetgraph.expand_paths(prog, order=MAX_ORDER + 1)
    with pytest.raises(ValueError, match="non-negative int"):
        jetgraph.count_paths(prog, order=-1)
    with pytest.raises(ValueError, match="non-negative int"):
        jetgraph.count_paths(prog, order=True)
    assert jetgraph.jet(prog.decoder, states[0], states[-1], order=MAX_ORDER).coefficients.isfinite().all()


def test_exhaustive_expansions_are_refused_before_building() -> None:
    from jetgraph.errors import CostError
    from tests.conftest import captured

    _, prog = captured("llama")
    sub = prog.at("sublayer")  # 4 units: 1·2^4 = 16 terms at order 0
    assert len(jetgraph.expand_stream(sub, max_terms=16)) == 16
    with pytest.raises(CostError, match=r"gives 16 terms, more than max_terms=15"):
        jetgraph.expand_stream(sub, max_terms=15)
    paths = jetgraph.expand_paths(sub)
    assert paths.count() == 16 == sum(1 for _ in paths)
    with pytest.raises(CostError, match="16 paths pass the filters, more than max_terms=10"):
        paths.expansion(max_terms=10)
    assert len(paths.expansion(limit=3, max_terms=10)) == 3


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
    vocab, hidden = prog.decoder.unembedding.shape
    assert logits.peak_bytes == len(expansion) * 5 * vocab * 4 * 2
    stream = expansion_plan(prog, len(expansion), ids, 0, "x", space="stream")
    assert stream.peak_bytes == len(expansion) * 5 * hidden * 4 * 2 and stream.flops < logits.flops
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


def test_keyword_ids_skip_the_bare_word_start_token() -> None:
    """SentencePiece encodes " dog" as ["▁", "dog"] on TinyStories: the keyword is "dog", not the
    word-start piece every word begins with."""
    from jetgraph.applications import keyword_ids
    from tests.conftest import require_tinystories

    _, tokenizer = jetgraph.load_model(str(require_tinystories()))
    ids = keyword_ids(tokenizer, ["dog", "cat", "happy"])
    assert len(ids) >= 3 and all(tokenizer.decode([i]).strip() for i in ids)  # no bare "▁"

    class Pieces:  # a SentencePiece-like tokenizer: id 0 is the bare word start
        def __call__(self, text, add_special_tokens=False):
            return type("Encoded", (), {"input_ids": [0, len(text.strip())]})()

        def decode(self, ids):
            return "" if ids == [0] else f"w{ids[0]}"

    assert keyword_ids(Pieces(), ["ab", "abc"]) == [2, 3]


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
