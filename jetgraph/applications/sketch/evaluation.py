"""Scoring: count-based baselines trained on the same text, and the perplexities of the sketch,
its parts, the baselines and the model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from jetgraph.applications.sketch.model import WEIGHT_STEP, SketchLM
from jetgraph.applications.sketch.text import Windows

LOGIT_ENTRIES = 1 << 24  # logits per batch of the model's own perplexity



# ---------------------------------------------------------------------- count-based baselines
@dataclass
class CountLM:
    """A count-based LM of training text: add-one unigram, and the bigram interpolated with it
    (Jelinek–Mercer; ``bigram_weight`` fitted on a development split; an unseen context backs
    off to the unigram). Only the pairs seen are stored (``pair_keys`` a·V + b, sorted, and their
    ``pair_counts``), so memory grows with the text, not with V²."""

    unigram: torch.Tensor
    pair_keys: torch.Tensor
    pair_counts: torch.Tensor
    context_totals: torch.Tensor
    bigram_weight: float = 0.9

    @property
    def vocab(self) -> int:
        return int(self.unigram.shape[0])

    @classmethod
    def train(cls, text: Windows, vocab: int) -> CountLM:
        ids = text.ids
        tokens = ids[text.mask]
        unigram = (torch.bincount(tokens, minlength=vocab).double() + 1) / (tokens.numel() + vocab)
        prev = ids[:, :-1][text.scored]
        keys, counts = torch.unique(prev * vocab + ids[:, 1:][text.scored], sorted=True, return_counts=True)
        return cls(unigram, keys, counts.double(), torch.bincount(prev, minlength=vocab).double())

    def parts(self, windows: torch.Tensor) -> dict[str, torch.Tensor]:
        prev, nxt = windows[:, :-1].long(), windows[:, 1:].long()
        keys = prev * self.vocab + nxt
        count = torch.zeros(keys.shape, dtype=torch.double)
        if len(self.pair_keys):
            pos = torch.searchsorted(self.pair_keys, keys).clamp_max(len(self.pair_keys) - 1)
            count = torch.where(self.pair_keys[pos] == keys, self.pair_counts[pos], 0.0)
        totals = self.context_totals[prev]
        return {"unigram": self.unigram[nxt], "bigram": count / totals.clamp_min(1), "seen": totals > 0}

    def bigram_probs(self, parts: dict[str, torch.Tensor], weight: float | None = None) -> torch.Tensor:
        w = self.bigram_weight if weight is None else weight
        w = torch.where(parts["seen"], torch.tensor(float(w), dtype=torch.double), 0.0)
        return w * parts["bigram"] + (1 - w) * parts["unigram"]

    def fit(self, dev: Windows, step: float = WEIGHT_STEP) -> float:
        parts = self.parts(dev.ids)
        grid = [round(i * step, 6) for i in range(round(1 / step))]
        self.bigram_weight = max(
            grid, key=lambda w: float(self.bigram_probs(parts, w)[dev.scored].log().sum()))
        return self.bigram_weight


# ---------------------------------------------------------------------- evaluation
@torch.no_grad()
def model_log_probs(model, windows: Windows, batch: int = 32) -> torch.Tensor:
    """log p(x_t | x_<t) of the model itself at positions 1.. of every window, [n, L − 1], in
    batches of at most ``batch`` windows and ``LOGIT_ENTRIES`` logits."""
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    batch = max(1, min(batch, LOGIT_ENTRIES // max(1, windows.ids.shape[1] * vocab)))
    out = []
    for start in range(0, len(windows), batch):
        part = windows.rows(start, start + batch)
        logits = model(input_ids=part.ids, attention_mask=part.mask.long()).logits.double().log_softmax(-1)
        out.append(logits[:, :-1].gather(-1, part.ids[:, 1:, None])[..., 0])
    return torch.cat(out)


def perplexity(probs_or_logs: torch.Tensor, windows: Windows, logs: bool = False) -> float:
    """exp of the mean negative log-probability over the scored tokens."""
    values = probs_or_logs if logs else probs_or_logs.clamp_min(1e-300).log()
    return float(math.exp(-values.double()[windows.scored].mean()))


def perplexities(sketch: SketchLM, counts: CountLM, windows: Windows, model=None) -> dict[str, float]:
    """Perplexity of every LM on the same tokens of the test ``windows``."""
    parts = sketch.parts(windows.ids)
    l3, l2, l1 = sketch.weights
    out = {}
    if model is not None:
        out["transformer (full context)"] = perplexity(model_log_probs(model, windows), windows, logs=True)
    if sketch.has_trigram:
        out["jet sketch: trigram + bigram + unigram"] = perplexity(sketch.mix(parts), windows)
    out["jet sketch: bigram + unigram"] = perplexity(sketch.mix(parts, (0.0, l2 + l3, l1)), windows)
    out["jet bigram read-out alone"] = perplexity(parts["bigram"], windows)
    out["jet unigram read-out alone"] = perplexity(parts["unigram"], windows)
    count_parts = counts.parts(windows.ids)
    out["count bigram LM (interpolated)"] = perplexity(counts.bigram_probs(count_parts), windows)
    out["count unigram LM"] = perplexity(count_parts["unigram"], windows)
    out["uniform"] = float(sketch.vocab)
    return out
