"""Tiny GPT-2s trained from scratch on one CPU thread: the models whose jet read-outs the
ground-truth study scores."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TinyConfig:
    """Sizes and optimiser settings of one tiny GPT-2 run."""

    vocab: int = 80
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    seq: int = 64
    batch: int = 32
    steps: int = 600
    lr: float = 3e-3
    seed: int = 0
    tie: bool = True


def tiny_gpt2(cfg: TinyConfig):
    """A ``transformers`` GPT-2 (no dropout, eager attention; tied embedding/decoder unless
    ``cfg.tie`` is off), initialised from ``cfg.seed``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(cfg.seed)
    config = GPT2Config(vocab_size=cfg.vocab, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                        n_positions=cfg.seq, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=None, eos_token_id=None, tie_word_embeddings=cfg.tie,
                        attn_implementation="eager")
    return GPT2LMHeadModel(config)


def row_batches(rows: torch.Tensor, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless random batches of the rows (sequences) of a [count, seq] tensor."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield rows[torch.randint(0, rows.shape[0], (batch,), generator=generator)]


def window_batches(stream: torch.Tensor, batch: int, seq: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless random windows of ``seq`` tokens from a 1-D token stream."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, stream.numel() - seq, (batch,), generator=generator)
        yield torch.stack([stream[s:s + seq] for s in starts.tolist()])


def train(model, batches: Iterator[torch.Tensor], steps: int, lr: float,
          snapshot_at: tuple[int, ...] = ()) -> tuple[dict[int, object], list[float]]:
    """AdamW (weight decay 0.01, 20-step warm-up, linear decay to 10%) for ``steps`` steps.
    Returns frozen copies of the model at the steps in ``snapshot_at`` and the loss of every step;
    the model itself ends trained and in eval mode."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / max(steps, 1)))
    snapshots, losses = {}, []
    for step in range(steps + 1):
        if step in snapshot_at:
            snapshots[step] = copy.deepcopy(model).eval()
        if step == steps:
            break
        model.train()
        ids = next(batches)
        loss = model(input_ids=ids, labels=ids).loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return snapshots, losses


@torch.no_grad()
def mean_loss(model, rows: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` on the [n, seq] rows."""
    model.eval()
    losses = [model(input_ids=r, labels=r).loss * (r.shape[0]) for r in rows.split(64)]
    return float(torch.stack(losses).sum() / rows.shape[0])
