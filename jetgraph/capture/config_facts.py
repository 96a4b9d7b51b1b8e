"""What a model's config says about its size, in one place: layers, vocabulary, width and
context length, read from a loaded model's config or from a folder's ``config.json`` before
anything is loaded (so the command line can refuse hopeless work first).

Configs name these differently (GPT-2's ``n_layer``/``n_embd``/``n_positions``, Llama's
``num_hidden_layers``/``hidden_size``/``max_position_embeddings``, multimodal models nest them
in ``text_config``); :data:`CONFIG_KEYS` lists the names, the first found wins.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from torch import nn

CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "vocab": ("vocab_size",),
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "context": ("max_position_embeddings", "n_positions", "n_ctx"),
}


def config_facts(config: Mapping[str, object]) -> dict[str, int]:
    """Layers, vocabulary, width and context named by a config dict (its ``text_config`` too);
    what it does not name is left out."""
    facts: dict[str, int] = {}
    sections = [config]
    nested = config.get("text_config")
    if isinstance(nested, Mapping):
        sections.append(nested)
    for name, keys in CONFIG_KEYS.items():
        for section in sections:  # the model's own entry wins over its text_config's
            value = next((section[k] for k in keys if _positive_int(section.get(k))), None)
            if value is not None:
                facts[name] = int(value)
                break
    return facts


def folder_facts(model: str | Path) -> dict[str, int]:
    """:func:`config_facts` of a model name the loader accepts, without loading it: a folder's
    ``config.json``, or SmolLM2's converted copy once it exists; empty for a hub id, a GGUF file
    or a folder without a config (capture checks everything again)."""
    from jetgraph.capture.loading import SMOLLM2_NAMES, cache_dir

    name = str(model)
    folder = cache_dir() / "smollm2-135m-instruct-f32" if name.lower() in SMOLLM2_NAMES else Path(name)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config_facts(config) if isinstance(config, dict) else {}


def context_length(model: nn.Module) -> int | None:
    """The longest input a loaded model's config allows, or None when it names none."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    as_dict = config.to_dict() if hasattr(config, "to_dict") else vars(config)
    return config_facts(as_dict).get("context")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
