"""The frontend: a model in, a :class:`~jetgraph.ir.ResidualProgram` out.

``jetgraph.capture(model)`` exports the model once with ``torch.export`` (:mod:`.export`),
lowers it to the core op set the Taylor rules cover, and lifts the graph into encoder, residual
units and decoder (:mod:`.lift`, cutting regions with :mod:`.subgraph`), refusing a program
whose units have no order-1 jet (:mod:`.expandable`). :mod:`.loading` finds
and loads models and tokenizers; :mod:`.lazy` builds a model larger than memory whose weights
are read from safetensors only while needed; :mod:`.zoo` builds small random models of every
family.

The package itself is callable — ``jetgraph.capture(model)`` is :func:`capture` — so its
submodules stay importable by their paths (``import jetgraph.capture.loading``).
"""

from __future__ import annotations

import sys
import types

import torch
from torch import nn

from jetgraph.capture.export import CapturedGraph, LogitsWrapper, export_model, synthetic_input_ids
from jetgraph.capture.lazy import LazyWeights, lazy_weights, load_lazy
from jetgraph.capture.lift import lift as _lift
from jetgraph.capture.loading import load_model
from jetgraph.capture.shared import capture_shared, streamed_forward
from jetgraph.errors import CaptureError
from jetgraph.ir import DEFAULT_GRANULARITY, Granularity, ResidualProgram, check_granularity


def capture(model: nn.Module, example_input_ids: torch.Tensor | None = None,
            granularity: Granularity = DEFAULT_GRANULARITY, *,
            attention_mask: torch.Tensor | None = None, share_blocks: bool = True) -> ResidualProgram:
    """Capture ``model`` (``input_ids -> logits``) and lift it into a residual program.

    The graph is exported once with ``torch.export`` (dynamic batch and sequence length where the
    model allows), lowered to the core op set, and split into encoder, residual units and
    decoder; the result is checked to reproduce the model's logits on the example. Without
    ``example_input_ids`` a short synthetic input is used (:func:`synthetic_input_ids`); the
    dynamic shapes cover every other input. ``attention_mask`` (1 = real token, 0 = padding)
    goes with the example: the self-check then compares the padded example's logits. Every
    program takes a mask at run time (``prog(ids, attention_mask=…)``) whatever the example.

    ``share_blocks``: export one block per structure group and bind the others to copies of its
    graph (:mod:`.shared`), so capture time does not grow with depth; the whole model is exported
    when that does not reproduce the logits exactly, or with ``share_blocks=False``.
    """
    check_granularity(granularity)  # before the export, which takes seconds to minutes
    ids = synthetic_input_ids(model) if example_input_ids is None else example_input_ids
    lazy = lazy_weights(model) is not None
    if share_blocks or lazy:
        program = capture_shared(model, ids, attention_mask, granularity)
        if program is not None:
            return program
    if lazy:
        raise CaptureError(
            "a model read lazily (load_lazy) is captured with one block per structure group in "
            "memory, and this model has no stack of repeated blocks jetgraph can share (or the "
            "shared program is not exact); load it with load_model to capture it whole",
            model_class=type(model).__name__)
    return _lift(export_model(model, ids, attention_mask), granularity=granularity)


class _CallablePackage(types.ModuleType):
    """``jetgraph.capture(model)`` calls :func:`capture`; attributes are the package's."""

    def __call__(self, *args: object, **kwargs: object) -> ResidualProgram:
        return capture(*args, **kwargs)  # type: ignore[arg-type]


sys.modules[__name__].__class__ = _CallablePackage

__all__ = [
    "CapturedGraph",
    "LazyWeights",
    "LogitsWrapper",
    "capture",
    "export_model",
    "lazy_weights",
    "load_lazy",
    "load_model",
    "streamed_forward",
    "synthetic_input_ids",
]
