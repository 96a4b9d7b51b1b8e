"""Models larger than memory: the module tree on the meta device, weights read from safetensors
only while a computation needs them.

:func:`load_lazy` builds a Hugging Face causal LM from a folder's ``config.json`` with every
parameter on the meta device (buffers computed at construction, such as RoPE frequencies, are
real) and attaches a :class:`LazyWeights` store. A parameter not in memory holds no storage: it
reads as NaN everywhere (one value broadcast to its shape), so a computation that forgot to load
it shows NaN, never plausible numbers. ``LazyWeights.resident(names)`` sets the named
parameters' data to tensors memory-mapped from the safetensors files (``param.data``: every
module and graph holding the parameter object sees it) and sets it back afterwards, which
unmaps the pages. Capture
(:func:`jetgraph.capture`) exports such a model with one block per structure group in memory and
binds the other blocks to their own (meta) parameters; running the program then streams one
block at a time (:meth:`jetgraph.ir.ResidualProgram.resident`). ``LazyWeights.streaming`` runs
the model's own forward the same way (capture checks the program against it, whole).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from jetgraph.capture.checkpoint_names import CheckpointMap
from jetgraph.errors import ModelLoadError

INDEX_FILE = "model.safetensors.index.json"


class LazyWeights:
    """Parameters of ``model`` (on the meta device) and where their data is on disk.

    Tied parameters (an unembedding shared with the embedding) are one object under several
    names; each is loaded from whichever of its names the files hold. Loading is reference
    counted, so nested ``resident`` blocks and pinned names (:meth:`pin`) compose.
    """

    def __init__(self, model: nn.Module, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        self.folder = Path(folder)
        self.dtype = dtype
        self.files = _weight_files(self.folder)
        self.checkpoint = CheckpointMap(model, self.files)  # transformers' renamings and merges
        _make_absent(model)
        self.tensors: dict[str, nn.Parameter] = dict(model.named_parameters(remove_duplicate=False))
        aliases: dict[int, list[str]] = {}
        for name, parameter in self.tensors.items():
            aliases.setdefault(id(parameter), []).append(name)
        self.aliases = aliases
        self.counts: dict[int, int] = {}
        missing = [names[0] for names in aliases.values() if not any(n in self.checkpoint for n in names)]
        if missing:
            raise ModelLoadError(f"{self.folder}: the safetensors files hold no tensor for "
                                 f"{len(missing)} parameters (first: {missing[0]})")

    def __len__(self) -> int:
        return len(self.aliases)

    def loaded(self) -> int:
        """How many distinct parameters are in memory now."""
        return sum(1 for count in self.counts.values() if count > 0)

    @contextlib.contextmanager
    def resident(self, names: Iterable[str]) -> Iterator[None]:
        """The named parameters in memory inside the block (names it does not know are ignored:
        buffers and constants are always in memory)."""
        taken = self._acquire(names)
        try:
            yield
        finally:
            self._release(taken)

    @contextlib.contextmanager
    def streaming(self, model: nn.Module, streamed: Iterable[nn.Module]) -> Iterator[None]:
        """Inside the block, ``model``'s own forward runs with each module of ``streamed`` (its
        blocks) in memory only while that module's forward runs, and every other parameter of
        ``model`` in memory throughout: peak memory is one block plus the rest, not the model.
        The modules' weights are made resident by forward pre-hooks and released by post-hooks
        (and on the way out, when a forward fails)."""
        prefixes: dict[int, str] = {}
        for name, module in model.named_modules():
            prefixes.setdefault(id(module), f"{name}." if name else "")
        streamed = list(streamed)
        inside = tuple(prefixes[id(m)] for m in streamed)
        names: dict[int, list[str]] = {id(m): [] for m in streamed}
        rest = []
        for name, _ in model.named_parameters(remove_duplicate=False):
            owner = next((m for m, prefix in zip(streamed, inside, strict=True) if name.startswith(prefix)),
                         None)
            if owner is None:
                rest.append(name)
            else:
                names[id(owner)].append(name)
        held: list[list[nn.Parameter]] = []  # what the running modules hold, innermost last
        handles = []
        for module in streamed:
            own = names[id(module)]
            handles.append(module.register_forward_pre_hook(
                lambda *_, own=own: held.append(self._acquire(own))))
            handles.append(module.register_forward_hook(lambda *_: self._release(held.pop())))
        try:
            with self.resident(rest):
                yield
        finally:
            for handle in handles:
                handle.remove()
            while held:
                self._release(held.pop())

    def pin(self, names: Iterable[str]) -> None:
        """Keep the named parameters in memory for the store's life (the encoder, the decoder)."""
        self._acquire(names)

    def _acquire(self, names: Iterable[str]) -> list[nn.Parameter]:
        taken = []
        for name in dict.fromkeys(names):
            parameter = self.tensors.get(name)
            if parameter is None:
                continue
            key = id(parameter)
            if self.counts.get(key, 0) == 0:
                parameter.data = self._read(key)
            self.counts[key] = self.counts.get(key, 0) + 1
            taken.append(parameter)
        return taken

    def _release(self, taken: list[nn.Parameter]) -> None:
        for parameter in taken:
            key = id(parameter)
            self.counts[key] -= 1
            if self.counts[key] == 0:
                parameter.data = _absent(parameter.shape, parameter.dtype)

    def _read(self, key: int) -> torch.Tensor:
        name = next(n for n in self.aliases[key] if n in self.checkpoint)
        tensor = self.checkpoint.read(name, self._stored)
        return tensor if self.dtype is None or tensor.dtype == self.dtype else tensor.to(self.dtype)

    def _stored(self, name: str) -> torch.Tensor:
        """One tensor of the safetensors files, memory-mapped: pages are read when touched."""
        from safetensors import safe_open

        with safe_open(self.files[name], framework="pt") as handle:
            return handle.get_tensor(name)


def _absent(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A weight not in memory: NaN broadcast to its shape (no storage beyond one value)."""
    return torch.full((), float("nan"), dtype=dtype).expand(shape)


def _make_absent(model: nn.Module) -> None:
    """Replace every meta parameter by an absent one (tied parameters stay one object)."""
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is None or parameter.device.type != "meta":
                continue
            if id(parameter) not in replaced:
                replaced[id(parameter)] = nn.Parameter(_absent(parameter.shape, parameter.dtype),
                                                       requires_grad=False)
            module._parameters[name] = replaced[id(parameter)]


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index file or the files' own headers."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors files and no {INDEX_FILE}; lazy loading "
                             "reads safetensors only (save the model with save_pretrained)")
    from safetensors import safe_open

    names: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            names.update(dict.fromkeys(handle.keys(), file))
    return names


def load_lazy(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """A causal LM from ``folder`` (``config.json`` + safetensors) with its parameters absent (no
    memory) and a :class:`LazyWeights` store as ``model.jetgraph_weights``. Nothing but the
    config and the files' headers is read; ``dtype`` (default: the config's) is what loaded
    weights are cast to."""
    import transformers

    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder}: no config.json; load_lazy reads a folder saved by save_pretrained")
    config = transformers.AutoConfig.from_pretrained(folder)
    dtype = dtype or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with _parameters_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.jetgraph_weights = LazyWeights(model, folder, dtype)
    return model


def lazy_weights(model: nn.Module) -> LazyWeights | None:
    """The store :func:`load_lazy` attached to ``model``, if any."""
    store = getattr(model, "jetgraph_weights", None)
    return store if isinstance(store, LazyWeights) else None


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device; buffers stay real (RoPE
    frequencies and other buffers computed at construction are not in the weight files)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, parameter: nn.Parameter | None) -> None:
        register(module, name, parameter)
        if parameter is not None and parameter.device.type != "meta":
            value = module._parameters[name]
            module._parameters[name] = nn.Parameter(value.to("meta"), requires_grad=value.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]
