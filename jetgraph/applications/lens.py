"""Jet lenses: what each layer's stream already says about the output.

*Iterative lens* (paper §3): for each stream state h_ℓ, the order-k jet of the decoder centred at
h_ℓ and evaluated at h_L, J^k Dec(h_ℓ)(h_L). Order 0 is the logit lens, Dec(h_ℓ). All states
are decoded in one batched call (the codegen's :class:`~jetgraph.codegen.BatchedRun`), one
Taylor-mode pass for all orders.

*Joint lens*: the centres are h_0 and the units' contributions γ_ℓ(h_{ℓ−1}) (which sum to h_L),
with per-token softmax weights fitted to the logits (Adam on the logit-space remainder).
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from jetgraph.codegen import BatchedRun, plan
from jetgraph.ir import ResidualProgram, as_input_ids
from jetgraph.passes.expand import Expansion, expand, stream_term

METRICS = ("cosine", "kl", "top1", "topk", "remainder")


@dataclass
class LensResult:
    """One lens on one input.

    ``logits[s]`` is the lens's logits for centre s ([centres, batch, seq, vocab]); ``metrics``
    (computed on first use) maps each of :data:`METRICS` to a [centres, seq] tensor averaged over
    the batch: cosine to
    the true logits, KL(true ‖ lens), top-1 agreement, top-k overlap and the relative remainder
    ‖true − lens‖/‖true‖.
    """

    kind: str
    order: int
    labels: list[str]
    logits: torch.Tensor
    true_logits: torch.Tensor
    k: int
    weights: torch.Tensor | None = None  # joint lens: fitted weights [centres, batch, seq, 1]
    fit_losses: list[float] = field(default_factory=list)
    centre_labels: list[str] = field(default_factory=list)  # joint lens: h_0 and the γ_ℓ
    centre_logits: torch.Tensor | None = None  # joint lens: each centre's weighted jet

    @functools.cached_property
    def metrics(self) -> dict[str, torch.Tensor]:
        """Each of :data:`METRICS` per centre and position (computed on first use)."""
        return lens_metrics(self.logits, self.true_logits, self.k)

    def top1(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids, probabilities) of each centre's top-1 prediction, [centres, batch, seq]."""
        probs = self.logits.float().softmax(-1)
        value, index = probs.max(-1)
        return index, value

    def table(self) -> list[dict[str, float | str]]:
        """One row per centre: every metric averaged over positions."""
        return [{"centre": label, **{m: round(self.metrics[m][i].mean().item(), 5) for m in METRICS}}
                for i, label in enumerate(self.labels)]

    def to_csv(self, path: str | Path) -> Path:
        rows = self.table()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return path


def lens_metrics(logits: torch.Tensor, true_logits: torch.Tensor, k: int = 5) -> dict[str, torch.Tensor]:
    """Per centre and position (mean over batch): cosine, KL(true ‖ lens), top-1, top-k, remainder."""
    logits, true = logits.float(), true_logits.float().unsqueeze(0)
    true_log = true.log_softmax(-1)
    kl = (true_log.exp() * (true_log - logits.log_softmax(-1))).sum(-1)
    true_top = true.topk(k, -1).indices
    lens_top = logits.topk(k, -1).indices
    overlap = (true_top.unsqueeze(-1) == lens_top.unsqueeze(-2)).any(-1).float().mean(-1)
    remainder = (true - logits).norm(dim=-1) / true.norm(dim=-1)
    values = {
        "cosine": F.cosine_similarity(logits, true.expand_as(logits), dim=-1),
        "kl": kl,
        "top1": (logits.argmax(-1) == true.argmax(-1)).float(),
        "topk": overlap,
        "remainder": remainder,
    }
    return {name: value.mean(1) for name, value in values.items()}


@torch.no_grad()
def iterative_lens(prog: ResidualProgram, input_ids: torch.Tensor, order: int = 0, k: int = 5,
                   granularity: str | None = None) -> LensResult:
    """The order-``order`` jet of the decoder at every stream state h_0..h_L, evaluated at h_L.

    ``granularity`` picks the states (``"block"``: after each block; ``"sublayer"``: after each
    attention and MLP unit); default: the program's view.
    """
    if not isinstance(order, int) or order < 0:
        raise ValueError(f"order must be a non-negative int, got {order!r}")
    ids = as_input_ids(input_ids)
    view = prog.at(granularity) if granularity else prog  # type: ignore[arg-type]
    states = [stream_term(view, i) for i in range(len(view.units) + 1)]
    expansion = expand(view, "decoder", states, order=order, weights="unit")
    run = BatchedRun(plan(expansion), ids)
    outputs, true_logits, _ = run.run()
    per_order = outputs.view(len(states), order + 1, *outputs.shape[1:])  # terms: centre-major
    labels = ["h0 (embed)"] + [f"h{i + 1} ({u.name})" for i, u in enumerate(view.units)]
    return LensResult("iterative", order, labels, per_order.sum(1), true_logits, k)


def contribution_centres(prog: ResidualProgram) -> Expansion:
    """h_0 and every unit's contribution γ_ℓ(h_{ℓ−1}) as terms: they sum to h_L."""
    terms = [stream_term(prog, 0)]
    for index, unit in enumerate(prog.units):
        step = expand(prog, index, [stream_term(prog, unit.reads)], order=0, weights="unit")
        terms.append(step.terms[-1])
    return Expansion(prog, len(prog.units) - 1, terms, "stream", 0)


@torch.no_grad()
def joint_lens(prog: ResidualProgram, input_ids: torch.Tensor, order: int = 0, k: int = 5,
               steps: int = 100, lr: float = 1e-2) -> LensResult:
    """The decoder expanded jointly around h_0 and the units' contributions, with per-token softmax
    weights fitted on ``input_ids``; ``logits[i]`` is centre i's weighted jet, their sum the lens."""
    ids = as_input_ids(input_ids)
    centres = contribution_centres(prog)
    with torch.enable_grad():
        expansion = expand(prog, "decoder", centres, order=order, weights="fit", fit_on=ids,
                           fit_steps=steps, fit_lr=lr)
    values = expansion.evaluate(ids)
    terms = torch.stack(list(values.terms.values()))
    per_centre = terms.view(len(centres), order + 1, *terms.shape[1:]).sum(1)
    labels = ["h0 (embed)"] + [f"γ {u.name}" for u in prog.units]
    weights = torch.stack([t.weight for t in expansion.terms[:: order + 1]])
    return LensResult("joint", order, ["Σ weighted centres"], per_centre.sum(0, keepdim=True),
                      values.target, k, weights=weights, fit_losses=expansion.fit_losses,
                      centre_labels=labels, centre_logits=per_centre)
