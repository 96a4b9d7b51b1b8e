"""Save any result to a folder a user can share or upload, and load it back: ``result.json`` (its
type and every plain field) beside ``tensors.safetensors`` (every tensor field, by its path in
the result). Lens results, lens averages, path and score attributions, n-gram tables: each
round-trips to an equal object (``tests/test_report.py``).

The JSON names each object's class (a module of ``jetgraph`` only: loading never imports
anything else), and tensors by the path of the field that held them
(``paths.3.contribution`` is a float in the JSON; ``logits`` a tensor in the safetensors file).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT = "jetgraph-result"
VERSION = 1
JSON_NAME, TENSORS_NAME = "result.json", "tensors.safetensors"


def save_result(result: object, folder: str | Path, overwrite: bool = False) -> Path:
    """Write ``result`` (one of jetgraph's results: a lens result or average, a path or score
    attribution, an n-gram table, …) into ``folder``. An existing saved result there is replaced
    only with ``overwrite=True``, and then whole, never half: the files are written to a
    temporary folder beside it and moved in place."""
    folder = Path(folder)
    if not type(result).__module__.startswith("jetgraph.") or not hasattr(result, "__dict__"):
        raise ValueError(f"save_result saves jetgraph's results, got {type(result).__name__}")
    if (folder / JSON_NAME).exists() and not overwrite:
        raise ValueError(f"{folder} already holds a saved result; pass overwrite=True to replace it")
    if folder.exists() and not (folder / JSON_NAME).exists() and any(folder.iterdir()):
        raise ValueError(f"{folder} exists and holds something other than a saved result; "
                         "give a new or empty folder")
    tensors: dict[str, torch.Tensor] = {}
    document = {"format": FORMAT, "version": VERSION, "result": _encode(result, "", tensors)}
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        (staging / JSON_NAME).write_text(json.dumps(document, indent=1, allow_nan=False))
        # copies: safetensors refuses tensors that share storage (views of one buffer)
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()},
                  str(staging / TENSORS_NAME))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def load_result(folder: str | Path) -> object:
    """The result saved in ``folder`` by :func:`save_result`."""
    folder = Path(folder)
    if not (folder / JSON_NAME).is_file():
        raise ValueError(f"{folder} holds no saved result (no {JSON_NAME}); "
                         "save one with jetgraph.save_result")
    document = json.loads((folder / JSON_NAME).read_text())
    if document.get("format") != FORMAT or document.get("version") != VERSION:
        raise ValueError(f"{folder / JSON_NAME} is not a {FORMAT} version {VERSION} file")
    tensors = load_file(str(folder / TENSORS_NAME)) if (folder / TENSORS_NAME).exists() else {}
    return _decode(document["result"], tensors)


# ------------------------------------------------------------------------------------ codec
def _encode(value: object, path: str, tensors: dict[str, torch.Tensor]) -> object:
    if isinstance(value, torch.Tensor):
        key = path or "value"
        tensors[key] = value
        return {"__tensor__": key}
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, Path):
        return {"__path__": str(value)}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, f"{path}.{i}".lstrip("."), tensors) for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        return {"__dict__": [[_encode(k, "", {}), _encode(v, f"{path}.{k}".lstrip("."), tensors)]
                             for k, v in value.items()]}
    module = type(value).__module__
    if not module.startswith("jetgraph."):
        raise TypeError(f"cannot save a {type(value).__name__} (from {module}) inside a result")
    fields = ({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
              if dataclasses.is_dataclass(value) else dict(vars(value)))
    return {"__object__": f"{module}:{type(value).__qualname__}",
            "fields": {name: _encode(v, f"{path}.{name}".lstrip("."), tensors) for name, v in fields.items()}}


def _decode(value: object, tensors: dict[str, torch.Tensor]) -> object:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__float__" in value:
        return float(value["__float__"])
    if "__dtype__" in value:
        return getattr(torch, value["__dtype__"])
    if "__path__" in value:
        return Path(value["__path__"])
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__dict__" in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__dict__"]}
    if "__object__" in value:
        module, _, name = value["__object__"].partition(":")
        if not module.startswith("jetgraph."):
            raise ValueError(f"a saved result names {module!r}; only jetgraph's classes are loaded")
        cls = importlib.import_module(module)
        for part in name.split("."):
            cls = getattr(cls, part)
        obj = cls.__new__(cls)
        obj.__dict__.update({k: _decode(v, tensors) for k, v in value["fields"].items()})
        return obj
    raise ValueError(f"unknown entry in a saved result: {sorted(value)}")


__all__ = ["load_result", "save_result"]
