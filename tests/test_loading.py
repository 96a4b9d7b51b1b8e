"""Loading models by name: hub ids in the local cache, fast offline failure, names that do not
exist, empty input ids, and arguments checked before the (slow) export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import jetgraph
from tests.conftest import GPT2_TOKENIZER, captured, require_gpt2_tokenizer

ROOT = Path(__file__).resolve().parents[1]


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
    require_gpt2_tokenizer()
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


@pytest.mark.parametrize("shape", [(1, 0), (0, 4), (0,)])
def test_empty_input_ids_are_refused(shape: tuple[int, ...]) -> None:
    _, prog = captured("gpt2")
    ids = torch.zeros(shape, dtype=torch.long)
    for call in (prog, prog.stream, prog.at("sublayer").stream):
        with pytest.raises(ValueError, match=r"input_ids is empty: shape \("):
            call(ids)


def test_granularity_is_checked_before_the_export(monkeypatch) -> None:
    import jetgraph.capture
    from jetgraph.capture.zoo import tiny_model

    def no_export(*_):
        raise AssertionError("exported before checking the granularity")

    monkeypatch.setattr(jetgraph.capture, "export_model", no_export)
    with pytest.raises(ValueError, match=r"granularity must be 'block' .*'sublayer' .*'head' .*got 'layer'"):
        jetgraph.capture(tiny_model("llama"), torch.zeros(1, 4, dtype=torch.long), granularity="layer")
