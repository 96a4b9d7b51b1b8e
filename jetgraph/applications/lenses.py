"""``jetgraph.lenses``: every lens, one entry per kind, each from a model or program and a text.

Each entry takes ``(model_or_program, input_ids_or_text, tokenizer=None, *, granularity=None,
layers=None, k=5, attention_mask=None)`` and returns one
:class:`~jetgraph.applications.lens.LensResult` (a centre per stream state h_s). What each reads:

============================  ==============================================  ===========================
entry                         logits at state s, position t                   reads
============================  ==============================================  ===========================
``logit``                     Dec(h_s)                                        h_s
``iterative(order=k)``        J^k Dec(h_s)(h_N), the paper's iterative lens   h_s **and h_N**
``ahead(order=k, ahead=m)``   J^k Dec(h_s)(h_{s+m})                           h_s and m states on
``jacobian``                  Dec(J_s(h)·h_s), J_s = ∂h_N/∂h_s at this input  h_s and the later
                                                                              units' derivatives here
``fitted(lens)``              Dec(J̄_s h_s) (averaged Jacobian) or             h_s[t] and the corpus
                              Dec(h_s + A_s h_s + b_s) (tuned)
============================  ==============================================  ===========================

Fitting: :func:`fit_jacobian` (forward mode, the Taylor engine) and :func:`fit_tuned` give a
:class:`~jetgraph.applications.lens.FittedLens`; ``lens.save(folder)`` / ``FittedLens.load``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from jetgraph.applications.entry_points import _input_ids, _program
from jetgraph.applications.lens import (
    FittedLens,
    LensResult,
    ahead_lens,
    fit_jacobian_lens,
    fit_tuned_lens,
    iterative_lens,
    jacobian_lens,
)
from jetgraph.ir import ResidualProgram

Model = nn.Module | ResidualProgram


def logit(model_or_program: Model, input_ids_or_text: torch.Tensor | str, tokenizer: object = None, *,
          granularity: str | None = None, layers: Sequence[int] | None = None, k: int = 5,
          attention_mask: torch.Tensor | None = None) -> LensResult:
    """The logit lens Dec(h_s): the iterative lens at order 0."""
    return iterative(model_or_program, input_ids_or_text, tokenizer, order=0, granularity=granularity,
                     layers=layers, k=k, attention_mask=attention_mask)


def iterative(model_or_program: Model, input_ids_or_text: torch.Tensor | str, tokenizer: object = None, *,
              order: int = 1, granularity: str | None = None, layers: Sequence[int] | None = None,
              k: int = 5, attention_mask: torch.Tensor | None = None) -> LensResult:
    """The paper's iterative jet lens J^k Dec(h_s)(h_N): from order 1 on it reads the final state."""
    prog = _program(model_or_program, granularity)
    return iterative_lens(prog, _input_ids(prog, input_ids_or_text, tokenizer), order, k, granularity,
                          layers, attention_mask=attention_mask)


def ahead(model_or_program: Model, input_ids_or_text: torch.Tensor | str, tokenizer: object = None, *,
          order: int = 1, ahead: int = 1, granularity: str | None = None,
          layers: Sequence[int] | None = None, k: int = 5,
          attention_mask: torch.Tensor | None = None) -> LensResult:
    """The jet lens with its variate ``ahead`` states on, J^k Dec(h_s)(h_{s+m}): not h_N."""
    prog = _program(model_or_program, granularity)
    return ahead_lens(prog, _input_ids(prog, input_ids_or_text, tokenizer), order, ahead, k, granularity,
                      layers, attention_mask=attention_mask)


def jacobian(model_or_program: Model, input_ids_or_text: torch.Tensor | str, tokenizer: object = None, *,
             granularity: str | None = None, layers: Sequence[int] | None = None, k: int = 5,
             attention_mask: torch.Tensor | None = None) -> LensResult:
    """The per-input Jacobian lens Dec(J_s(h)·h_s), exact, by forward mode."""
    prog = _program(model_or_program, granularity)
    return jacobian_lens(prog, _input_ids(prog, input_ids_or_text, tokenizer), k, granularity, layers,
                         attention_mask=attention_mask)


def fitted(lens: FittedLens, model_or_program: Model, input_ids_or_text: torch.Tensor | str,
           tokenizer: object = None, *, k: int = 5, attention_mask: torch.Tensor | None = None) -> LensResult:
    """A fitted lens (averaged Jacobian or tuned) applied to one input."""
    if not isinstance(lens, FittedLens):
        raise TypeError(f"expected a FittedLens (fit_jacobian, fit_tuned or FittedLens.load), "
                        f"got {type(lens).__name__}")
    prog = _program(model_or_program, lens.granularity)
    return lens.apply(prog, _input_ids(prog, input_ids_or_text, tokenizer), k, attention_mask=attention_mask)


def _corpus(prog: ResidualProgram, corpus: Sequence[torch.Tensor | str],
            tokenizer: object) -> list[torch.Tensor]:
    if isinstance(corpus, (str, torch.Tensor)) or not len(corpus):
        raise TypeError("corpus must be a non-empty list of texts or of token-id tensors")
    return [_input_ids(prog, item, tokenizer) for item in corpus]


def fit_jacobian(model_or_program: Model, corpus: Sequence[torch.Tensor | str], tokenizer: object = None, *,
                 granularity: str | None = None, layers: Sequence[int] | None = None,
                 skip_first: int = 16, directions: int = 16, description: str = "",
                 progress: bool = True) -> FittedLens:
    """Fit the corpus-averaged Jacobian lens on ``corpus`` (texts with their tokenizer, or ids)."""
    prog = _program(model_or_program, granularity)
    return fit_jacobian_lens(prog, _corpus(prog, corpus, tokenizer), granularity=granularity, layers=layers,
                             skip_first=skip_first, directions=directions, description=description,
                             progress=progress)


def fit_tuned(model_or_program: Model, corpus: Sequence[torch.Tensor | str], tokenizer: object = None, *,
              granularity: str | None = None, layers: Sequence[int] | None = None, steps: int = 250,
              lr: float = 1.0, batch: int = 256, skip_first: int = 0, seed: int = 0,
              description: str = "", progress: bool = True) -> FittedLens:
    """Train the tuned lens's translators on ``corpus`` (texts with their tokenizer, or ids)."""
    prog = _program(model_or_program, granularity)
    return fit_tuned_lens(prog, _corpus(prog, corpus, tokenizer), granularity=granularity, layers=layers,
                          steps=steps, lr=lr, batch=batch, skip_first=skip_first, seed=seed,
                          description=description, progress=progress)


__all__ = ["FittedLens", "ahead", "fit_jacobian", "fit_tuned", "fitted", "iterative", "jacobian", "logit"]
