"""The contexts of an n-gram table: every token, every token pair, or given rows, made lazily."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class Contexts:
    """The contexts of a table, generated lazily from their row index.

    A grid (every token, or every pair ``first × second``) is never held as a list: row i of the
    pair grid is ``(first[i // len(second)], second[i % len(second)])``, so a V² sweep costs no
    memory for its contexts. An explicit ``[rows, length]`` tensor of token ids is kept as given.
    Row order is the order of the ids (the tie-breaker of the tables).
    """

    def __init__(self, length: int, first: torch.Tensor | None = None, second: torch.Tensor | None = None,
                 explicit: torch.Tensor | None = None) -> None:
        self.length = length
        self.first, self.second, self.explicit = first, second, explicit

    @classmethod
    def grid(cls, vocab: int, length: int, first: Sequence[int] | None = None,
             second: Sequence[int] | None = None) -> Contexts:
        """Every context of ``length`` tokens, the first token restricted to ``first`` and the
        second (for pairs) to ``second``."""
        if length not in (1, 2):
            raise ValueError(f"contexts are one or two tokens long, not {length}")
        tokens = [_token_ids(first, vocab, "first"), _token_ids(second, vocab, "second")]
        return cls(length, tokens[0], tokens[1] if length == 2 else None)

    @classmethod
    def of(cls, contexts: torch.Tensor | Contexts, length: int, vocab: int,
           any_length: bool = False) -> Contexts:
        """``contexts`` as given: a [rows, length] tensor of ids in [0, vocab) (any length ≥ 1 with
        ``any_length``: paths from a stream state read the whole context)."""
        if isinstance(contexts, Contexts):
            if contexts.length != length and not any_length:
                raise ValueError(f"contexts have {contexts.length} token(s), the path reads {length}")
            return contexts
        tensor = torch.as_tensor(contexts)
        if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
            raise ValueError(f"contexts must be integer token ids, got {tensor.dtype}")
        tensor = tensor.long()
        if any_length and tensor.dim() == 2 and tensor.shape[1] >= 1:
            length = int(tensor.shape[1])
        if tensor.dim() != 2 or tensor.shape[1] != length:
            raise ValueError(f"a path that reads {length} token(s) of context needs contexts of shape "
                             f"[rows, {length}], got {tuple(tensor.shape)}")
        if tensor.numel() and (tensor.min() < 0 or tensor.max() >= vocab):
            raise ValueError(f"context token ids must lie in [0, {vocab})")
        return cls(length, explicit=tensor)

    def __len__(self) -> int:
        if self.explicit is not None:
            return int(self.explicit.shape[0])
        return len(self.first) * (len(self.second) if self.second is not None else 1)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.length)

    def rows(self, start: int, end: int) -> torch.Tensor:
        """Rows ``start..end`` as a [end − start, length] id tensor."""
        if self.explicit is not None:
            return self.explicit[start:end]
        index = torch.arange(start, end)
        if self.second is None:
            return self.first[index].unsqueeze(1)
        return torch.stack([self.first[index // len(self.second)], self.second[index % len(self.second)]], 1)

    def __getitem__(self, row: int) -> torch.Tensor:
        return self.rows(row, row + 1)[0]

    def tensor(self) -> torch.Tensor:
        """All rows materialised (only for tables small enough to hold)."""
        return self.rows(0, len(self))

    def fingerprint(self, digest) -> None:
        """Feed what defines the rows into a hashlib ``digest`` (checkpoint keys)."""
        parts = [self.explicit] if self.explicit is not None else [self.first, self.second]
        for part in parts:
            digest.update(b"-" if part is None else part.numpy().tobytes() + b"|")

    def held_bytes(self) -> int:
        parts = (self.explicit, self.first, self.second)
        return sum(p.numel() * p.element_size() for p in parts if p is not None)


def _token_ids(tokens: Sequence[int] | None, vocab: int, which: str) -> torch.Tensor:
    if tokens is None:
        return torch.arange(vocab)
    ids = torch.as_tensor(list(tokens), dtype=torch.long)
    if ids.numel() == 0:
        raise ValueError(f"the {which} token subset is empty")
    if ids.min() < 0 or ids.max() >= vocab:
        raise ValueError(f"{which} token ids must lie in [0, {vocab})")
    return ids


def all_contexts(vocab: int, length: int, first: Sequence[int] | None = None,
                 second: Sequence[int] | None = None) -> torch.Tensor:
    """Every context as a tensor: all tokens (length 1) or all pairs first × second (length 2).
    For large grids use :meth:`Contexts.grid`, which never materialises them."""
    return Contexts.grid(vocab, length, first, second).tensor()
