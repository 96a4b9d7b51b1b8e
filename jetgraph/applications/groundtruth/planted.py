"""A tiny model in which one MLP provably carries a rule: the ground truth of component roles.

A tiny GPT-2 is first trained on a random Markov chain (every parameter). Then a rule is planted
in the data, "after a trigger token comes the target token", and training continues with every
parameter frozen except one MLP's. Whatever the model learns of the rule after that is carried
by that MLP's weights, because no other weight changed; a method that reads roles must find it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from jetgraph.applications.groundtruth.corpora import markov_chain
from jetgraph.applications.groundtruth.training import TinyConfig, row_batches, tiny_gpt2, train


@dataclass(frozen=True)
class PlantedRule:
    """Triggers → target, planted in the MLP of layer ``layer`` (its unit is ``mlp{layer}``)."""

    triggers: tuple[int, ...]
    target: int
    layer: int

    @property
    def unit(self) -> str:
        return f"mlp{self.layer}"

    def apply(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows with every trigger followed by the target (the token after it overwritten)."""
        rows = rows.clone()
        triggers = torch.as_tensor(self.triggers)
        for position in range(rows.shape[1] - 1):
            hit = torch.isin(rows[:, position], triggers)
            rows[hit, position + 1] = self.target
        return rows


def planted_rule_model(cfg: TinyConfig, layer: int, triggers: int = 6, base_steps: int | None = None,
                       rule_steps: int | None = None, sequences: int = 1000):
    """(model, rule, text): a tiny GPT-2 trained on a chain, then on the chain with the rule
    planted while only ``transformer.h[layer].mlp`` trains; ``text`` is held-out rule data.

    Triggers and target are distinct tokens drawn from ``cfg.seed``; the chain puts the target
    after a trigger with its own small probability, so the rule is new to the base model."""
    if not 0 <= layer < cfg.n_layer:
        raise ValueError(f"layer {layer} is outside the model's {cfg.n_layer} layers")
    chain = markov_chain(cfg.vocab, successors=12, alpha=0.2, seed=cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed + 7)
    chosen = torch.randperm(cfg.vocab, generator=generator)[:triggers + 1].tolist()
    rule = PlantedRule(tuple(sorted(chosen[:triggers])), chosen[triggers], layer)
    model = tiny_gpt2(cfg)
    base = chain.sample(sequences, cfg.seq, cfg.seed + 1)
    train(model, row_batches(base, cfg.batch, cfg.seed), base_steps or cfg.steps, cfg.lr)
    planted = rule.apply(chain.sample(sequences, cfg.seq, cfg.seed + 2))
    trainable = model.transformer.h[layer].mlp
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in trainable.parameters():
        parameter.requires_grad_(True)
    train(model, row_batches(planted, cfg.batch, cfg.seed + 3), rule_steps or cfg.steps, cfg.lr)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    held_out = rule.apply(chain.sample(64, cfg.seq, cfg.seed + 4))
    return model.eval(), rule, held_out
