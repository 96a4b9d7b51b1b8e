"""A fast subset of the architecture sweep (benchmarks/sweep_architectures.py), in process: the
generic tiny-config recipe builds each model, and each lands in the class it must."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sweep_architectures.py"


def _sweep():
    spec = importlib.util.spec_from_file_location("sweep_architectures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model_type,outcome", [("llama", "expanded"), ("gpt2", "expanded"),
                                                ("roberta-prelayernorm", "expanded"), ("bert", "expanded"),
                                                ("doge", "expanded"), ("qwen2_moe", "expanded")])
def test_subset_lands_where_it_must(model_type: str, outcome: str) -> None:
    """Llama and GPT-2 capture exactly and every unit's order-1 jet equals torch.func.jvp of the
    unit; so does pre-LN RoBERTa, whose positions start at padding_idx + 1 (the wrapper once
    overrode them: wrong logits), Doge's scaled residual stream (a·h + f(h)) and Qwen2-MoE's
    top-k routing with shared experts, and post-LN BERT, whose stream is the sums before each
    norm (mixed steps x' = LN(x) + f(LN(x)))."""
    row = _sweep().run_one(model_type)
    assert row["outcome"] == outcome, row
    if outcome == "expanded":
        assert row["jet_error"] <= 1e-4 and row["logit_error"] <= 1e-4
        # RoBERTa-prelayernorm's and BERT's sublayers are blocks (their adds sit in separate modules)
        assert row["blocks"] == 2 or model_type in ("roberta-prelayernorm", "bert")
        assert row["dynamic"]


def test_tiny_config_is_generic() -> None:
    sweep = _sweep()
    config = sweep.tiny_config("qwen2")
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (2, 64, 256)
    assert config.num_key_value_heads <= config.num_attention_heads == 4
    assert config.intermediate_size > 128  # the minimal recipe keeps the config's inner sizes
    small = sweep.tiny_config("qwen2", sweep.SMALL)
    assert small.intermediate_size == 128 and small.num_attention_heads % small.num_key_value_heads == 0
    nested = sweep.tiny_config("llava")  # a text config inside a multimodal one is shrunk too
    assert nested.text_config.hidden_size == 64 and nested.text_config.vocab_size == 256
