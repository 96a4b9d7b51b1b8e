"""Attention masks: which positions of a padded batch hold real tokens.

The convention is transformers': ``attention_mask`` is [batch, seq], 1 on real tokens and 0 on
padding, on either side (left padding, as decoder-only tokenizers often pad, or right padding).
A real token's position is its index among the real tokens of its row (``cumsum(mask) - 1``, as
``generate`` computes it), so a prompt's results do not depend on how much padding precedes it.
"""

from __future__ import annotations

import torch
from torch.utils import _python_dispatch


def recording() -> bool:
    """Whether a dispatch mode (a tracer, fake tensors, a FLOP counter) sees the ops now. Checks
    that read tensor values are skipped then (a trace would bake their outcome into the code),
    and the Taylor engine makes its index tables afresh rather than caching one made under it."""
    return _python_dispatch._get_current_dispatch_mode() is not None


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [batch, seq]: each real token's index among its row's real tokens (0 at pads)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def full_mask(input_ids: torch.Tensor) -> torch.Tensor:
    """The mask of an unpadded batch: every position real."""
    return torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)


def mask_or_full(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
    """``attention_mask``, or :func:`full_mask` when it is None (no checks: see
    :func:`as_attention_mask`)."""
    return full_mask(input_ids) if attention_mask is None else attention_mask


def as_attention_mask(attention_mask: torch.Tensor | None, input_ids: torch.Tensor, *,
                      reads_mask: bool = True) -> torch.Tensor:
    """Validate ``attention_mask`` for ``input_ids`` ([batch, seq]) and return it as int64.

    None means no padding. A mask must have the ids' shape, hold only 0 and 1 and give every row
    a real token. ``reads_mask=False`` (a model whose forward takes no mask) allows only right
    padding: in a causal model pads after the real tokens cannot change them, pads before can.
    """
    if attention_mask is None:
        return full_mask(input_ids)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor [batch, seq] of 0 and 1, got "
                        f"{type(attention_mask).__name__}")
    if attention_mask.dim() == 1 and input_ids.shape[0] == 1:
        attention_mask = attention_mask.unsqueeze(0)
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, the input ids "
                         f"{tuple(input_ids.shape)}: give one 0/1 entry per token")
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise TypeError(f"attention_mask must be bool or integer (1 = real token, 0 = padding), "
                        f"got {attention_mask.dtype}")
    mask = attention_mask.long().to(input_ids.device)
    if recording():
        return mask
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    empty = (mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"attention_mask rows {empty[:5]} have no real token: every prompt needs "
                         "at least one")
    if not reads_mask and bool((mask.diff(dim=-1) > 0).any()):
        raise ValueError("this model's forward takes no attention_mask, so only right padding (pads "
                         "after the real tokens) is exact; pad on the right "
                         "(tokenizer.padding_side = 'right')")
    return mask
