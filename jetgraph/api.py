"""The top-level entry points, composed from the layers below."""

from __future__ import annotations

import torch
from torch import nn

from jetgraph.capture.export import export_model
from jetgraph.ir import Granularity, ResidualProgram, check_granularity
from jetgraph.passes.lift import lift


def capture(
    model: nn.Module, example_input_ids: torch.Tensor, granularity: Granularity = "block"
) -> ResidualProgram:
    """Capture ``model`` (``input_ids -> logits``) and lift it into a residual program.

    The graph is exported once with ``torch.export`` (dynamic batch and sequence length where
    the model allows), decomposed to the core op set, and split into encoder, residual units
    and decoder. The result reproduces the model's logits; it is checked on the example.
    """
    check_granularity(granularity)  # before the export, which takes seconds to minutes
    captured = export_model(model, example_input_ids)
    return lift(captured, granularity=granularity)
