"""The tuned lens (Belrose et al. 2023): one affine translator per stream state, trained so that
``Dec(h_s + A_s h_s + b_s)`` matches the model's own next-token distribution.

The recipe: translators start at the identity (A = 0, b = 0); the loss is KL(model ‖ lens) per
token, averaged; SGD with Nesterov momentum 0.9, learning rate ``lr`` warmed up linearly over the
first tenth of the steps and decayed linearly to 0, gradient norm clipped at 1. Each state is
trained on its own (the translators share nothing), on minibatches of ``batch`` kept positions
of the corpus. It reads h_s[t] only; what it knows about later layers it learned on the corpus.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from jetgraph.applications.lens.fitted import Corpus, FittedLens
from jetgraph.applications.lens.jacobian import _check_corpus, _fit_states, _kept_positions, _labels
from jetgraph.ir import ResidualProgram


def fit_tuned_lens(prog: ResidualProgram, corpus: Sequence[torch.Tensor], *,
                   granularity: str | None = None, layers: Sequence[int] | None = None,
                   steps: int = 250, lr: float = 1.0, batch: int = 256, skip_first: int = 0,
                   seed: int = 0, description: str = "", progress: bool = True) -> FittedLens:
    """Train the tuned lens's translators on ``corpus`` (token ids per prompt). ``layers``: the
    states (default every state before h_N); ``skip_first``: leading positions of each prompt
    left out (the last position is always kept: the model predicts there too)."""
    if steps < 1 or lr <= 0 or batch < 1:
        raise ValueError(f"steps and batch must be ≥ 1 and lr > 0, got steps={steps}, lr={lr}, batch={batch}")
    view = prog.at(granularity) if granularity else prog  # type: ignore[arg-type]
    prompts = _check_corpus(corpus, skip_first)
    states_list = _fit_states(layers, len(view.units))
    inputs: list[list[torch.Tensor]] = [[] for _ in states_list]
    targets: list[torch.Tensor] = []
    with torch.no_grad():
        for ids in prompts:
            ids, mask = view.inputs(ids)
            kept = _kept_positions(mask, skip_first) | _last_real(mask)
            states, side = view.stream_with_side_inputs(ids, mask)
            for row, s in enumerate(states_list):
                inputs[row].append(states[s][kept].float())
            targets.append(view.decoder(states[-1], side)[kept].float().log_softmax(-1))
    target = torch.cat(targets)
    d = view.d_model
    generator = torch.Generator().manual_seed(seed)
    matrices = torch.zeros(len(states_list), d, d)
    biases = torch.zeros(len(states_list), d)
    losses: list[list[float]] = []
    started = time.perf_counter()
    bar = tqdm(total=len(states_list) * steps, desc="tuned lens fit", disable=not progress)
    warmup = max(1, steps // 10)

    def rate(step: int) -> float:  # linear warm-up over a tenth of the steps, then linear decay to 0
        return min((step + 1) / warmup, max(0.0, (steps - step) / (steps - warmup + 1)))

    frozen = [p for p in view.decoder.graph_module.parameters() if p.requires_grad]
    for p in frozen:  # gradients for the translators only: none is written into the model
        p.requires_grad_(False)
    try:
        for row in range(len(states_list)):
            x = torch.cat(inputs[row])
            matrix = torch.zeros(d, d, requires_grad=True)
            bias = torch.zeros(d, requires_grad=True)
            optimizer = torch.optim.SGD([matrix, bias], lr=lr, momentum=0.9, nesterov=True)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
            trace = []
            for _ in range(steps):
                pick = torch.randint(len(x), (min(batch, len(x)),), generator=generator)
                loss = _kl(view, x[pick], matrix, bias, target[pick])
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_([matrix, bias], 1.0)
                optimizer.step()
                schedule.step()
                trace.append(loss.detach().item())
                bar.update(1)
            matrices[row], biases[row] = matrix.detach(), bias.detach()
            losses.append([trace[0], trace[-1]])
    finally:
        for p in frozen:
            p.requires_grad_(True)
    bar.close()
    seconds = time.perf_counter() - started
    kept_total = len(target)
    return FittedLens("tuned", _labels(states_list), matrices, biases,
                      Corpus.of(prompts, description, kept_total, skip_first),
                      {"method": "sgd-nesterov", "steps": steps, "lr": lr, "batch": batch, "seed": seed,
                       "loss_first_last": losses, "seconds": round(seconds, 3)},
                      view.granularity, d)


def _kl(view: ResidualProgram, x: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor,
        target: torch.Tensor) -> torch.Tensor:
    """Mean KL(model ‖ lens) over the rows of ``x`` [n, d] (``target``: the model's log-probs)."""
    translated = x + x @ matrix.T + bias
    logits = view.decoder(translated.to(_dtype(view)).unsqueeze(0)).float()[0]
    log_q = logits.log_softmax(-1)
    return (target.exp() * (target - log_q)).sum(-1).mean()


def _dtype(view: ResidualProgram) -> torch.dtype:
    unembedding = view.decoder.unembedding
    return unembedding.dtype if unembedding is not None else torch.float32


def _last_real(mask: torch.Tensor) -> torch.Tensor:
    real = mask.bool()
    return real & (real.long().cumsum(1) == real.sum(1, keepdim=True))
