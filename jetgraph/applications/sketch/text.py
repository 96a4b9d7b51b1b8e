"""The text a sketch is fitted and scored on: windows of a token stream, split into train,
development and test parts, or texts sampled from the model itself."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch


# ---------------------------------------------------------------------- text to score on
@dataclass(frozen=True)
class Windows:
    """Token windows ``ids`` [n, L] and ``mask`` [n, L] of real tokens (False: padding). Every LM
    is scored on the same tokens: the real ones at positions 1.. (:attr:`scored`)."""

    ids: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def of(cls, ids: torch.Tensor) -> Windows:
        ids = ids.long().view(1, -1) if ids.dim() == 1 else ids.long()
        return cls(ids, torch.ones_like(ids, dtype=torch.bool))

    @property
    def scored(self) -> torch.Tensor:
        return self.mask[:, 1:]

    @property
    def tokens(self) -> int:
        return int(self.scored.sum())

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def rows(self, start: int, end: int) -> Windows:
        return Windows(self.ids[start:end], self.mask[start:end])


def split_stream(ids: torch.Tensor, window: int, dev: float = 0.1, test: float = 0.1
                 ) -> tuple[Windows, Windows, Windows]:
    """A 1-D token stream split in order into training text (the first 1 − ``dev`` − ``test``,
    one row) and development and test windows of ``window`` tokens."""
    ids = ids.reshape(-1).long()
    n = ids.numel()
    dev_start, test_start = int(n * (1 - test - dev)), int(n * (1 - test))
    parts = []
    for chunk in (ids[dev_start:test_start], ids[test_start:]):
        count = chunk.numel() // window
        if count == 0:
            raise ValueError(f"the text has {n:,} tokens: too few for windows of {window} tokens in its "
                             f"{dev:.0%} development and {test:.0%} test parts; give more text or a smaller "
                             "--window")
        parts.append(Windows.of(chunk[: count * window].view(count, window)))
    return Windows.of(ids[:dev_start]), parts[0], parts[1]


@torch.no_grad()
def sampling_rate(model, tokenizer, batch: int = 64, steps: int = 8) -> float:
    """Seconds per sampled token here: ``steps`` tokens generated for a batch of ``batch``, timed
    (generation is latency-bound, so FLOPs would underestimate it)."""
    start_ids = [int(i) for i in tokenizer("")["input_ids"]] or [0]
    prompt = torch.tensor(start_ids).expand(batch, -1).contiguous()
    begin = time.perf_counter()
    model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, max_new_tokens=steps,
                   min_new_tokens=steps, pad_token_id=0)
    return (time.perf_counter() - begin) / (batch * steps)


@torch.no_grad()
def sample_texts(model, count: int, length: int, start: Sequence[int], end: int | None, pad: int = 0,
                 seed: int = 0, batch: int = 64, progress: bool = True) -> Windows:
    """``count`` texts sampled from the model itself (temperature 1, no truncation of the
    distribution), each beginning with the ``start`` ids (its BOS) and ending at the ``end``
    token or after ``length`` tokens, right-padded with ``pad``."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    head = torch.tensor(list(start), dtype=torch.long)
    rows, masks = [], []
    for done in tqdm(range(0, count, batch), desc="sampling", disable=not progress, leave=False):
        size = min(batch, count - done)
        prompt = head.expand(size, -1).contiguous()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0,
                             top_p=1.0, temperature=1.0, max_new_tokens=length - prompt.shape[1],
                             eos_token_id=end, pad_token_id=pad)
        real = torch.ones_like(out, dtype=torch.bool)
        if end is not None:  # everything after the first end token is padding
            ended = (out == end).long().cumsum(1)
            real = (ended == 0) | ((ended == 1) & (out == end))
        padded = torch.full((size, length), pad, dtype=torch.long)
        mask = torch.zeros(size, length, dtype=torch.bool)
        padded[:, :out.shape[1]], mask[:, :out.shape[1]] = out.where(real, pad), real
        rows.append(padded)
        masks.append(mask)
    return Windows(torch.cat(rows), torch.cat(masks))
