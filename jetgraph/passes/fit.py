"""Fitted weights: per-token softmax weights over centres that minimise the logit-space remainder."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from jetgraph.passes.expansion import Expansion
from jetgraph.passes.terms import Term


def fit_weights(unweighted: Expansion, centers: Sequence[Term], input_ids: torch.Tensor, steps: int,
                lr: float) -> tuple[torch.Tensor, list[float]]:
    """Softmax weights [centres, batch, seq, 1] for ``unweighted`` (an expansion built with unit
    weights around ``centers``) fitted with Adam on ``input_ids``, minimising ‖U·r‖² (‖r‖² for
    the decoder), and the loss at every step."""
    prog = unweighted.prog
    values = unweighted.evaluate(input_ids)
    position = {c.uid: i for i, c in enumerate(centers)}
    # the weighted part of each centre: its jet terms and its identity term
    per_center = torch.zeros((len(centers), *values.target.shape), dtype=values.target.dtype)
    for term in unweighted.terms:
        if term.kind in ("jet", "identity"):
            per_center[position[term.center.uid]] += values.terms[term.name]
    fixed = sum((values.terms[t.name] for t in unweighted.terms if t.kind not in ("jet", "identity")),
                torch.zeros_like(values.target))
    readout = None if unweighted.space == "logits" else prog.decoder.unembedding
    if unweighted.space == "stream" and readout is None:
        raise ValueError("fitting weights in stream space needs the decoder's unembedding U")
    logits = torch.zeros((*per_center.shape[:-1], 1), dtype=per_center.dtype, requires_grad=True)
    optimiser = torch.optim.Adam([logits], lr=lr)
    losses = []
    for _ in range(steps):
        optimiser.zero_grad()
        w = torch.softmax(logits, 0)
        remainder = values.target - fixed - (w * per_center).sum(0)
        projected = remainder if readout is None else remainder @ readout.T
        loss = projected.pow(2).sum() / projected.numel()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return torch.softmax(logits.detach(), 0), losses
