"""examples/train_tiny.py: a tiny GPT-2 trained on a known Markov chain has jet bigram tables that
recover the chain's most likely successors far above chance (and above its own untrained self)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_tiny.py"
JET_PATHS = ("E→U", "E→mlp0→U", "E→mlp1→U", "E→mlp0→mlp1→U")


def load_example():
    """Import the example script as a module (it is not part of the package)."""
    spec = importlib.util.spec_from_file_location("train_tiny_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_markov_jet_bigrams_beat_chance() -> None:
    example = load_example()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = example.RunConfig(vocab=16, n_embd=32, n_layer=2, n_head=2, seq=32, batch=16, steps=150,
                                lr=1e-2, k=16)
        result = example.run_markov(cfg, sequences=400, at=[0, cfg.steps])
    finally:
        torch.set_num_threads(threads)
    chance = result["baselines"]["random table (chance)"]["top1_hit_ratio"]
    untrained, trained = result["checkpoints"][0], result["checkpoints"][cfg.steps]
    best = max(JET_PATHS, key=lambda path: trained[path]["top1_hit_ratio"])
    best_top1 = trained[best]["top1_hit_ratio"]
    before = max(untrained[path]["top1_hit_ratio"] for path in JET_PATHS)
    assert result["capture_reuse_gap"] < 1e-4
    assert best_top1 >= chance + 0.4, (best, best_top1, chance)
    assert best_top1 >= before + 0.3, (best, best_top1, before)
    assert trained[best]["mean_kl"] < result["baselines"]["random table (chance)"]["mean_kl"]
