"""Jacobian lenses: decode what the rest of the network's derivative carries from h_s to h_N.

*Per-input Jacobian lens* (exact, forward mode): at stream state s, the logits
``Dec(J_s(h) · h_s)`` where ``J_s(h) = ∂h_N/∂h_s`` is the Jacobian of the rest of the network
R_s at this input, applied to the whole state (position t reads Σ_{t' ≤ t} ∂h_N[t]/∂h_s[t'] ·
h_s[t']). One Taylor-mode pass per state: the order-1 coefficient of R_s at h_s in the direction
h_s. It reads h_s and the derivative of every later unit *at this input*, so it sees the later
computation (attention patterns, norms) of the prompt itself.

*Corpus-averaged Jacobian lens* (the Jacobian lens of Anthropic's "global workspace" work,
reference code ``jlens``): ``Dec(J̄_s · h_s[t])`` with one fixed matrix per state,
``J̄_s = mean_p Σ_{p' ≥ p} ∂h_N[p']/∂h_s[p]`` averaged over the source positions p of a fitting
corpus (the first ``skip_first`` positions, attention sinks, and the last position left out, as
in the reference). Fitted once (:func:`fit_jacobian_lens`), it reads h_s[t] only.

The fit is forward mode: column j of the sum is the order-1 coefficient of R_s in the direction
e_j placed at every kept source position, summed over the kept target positions (causality
makes the sum over p' ≥ p exact); ``directions`` columns share one Taylor pass.
:func:`fit_jacobian_lens_reverse` is the straightforward reverse-mode fit (``torch.func.vjp``
over basis rows of the output, all source states from one backward), kept for the cost
comparison and as an independent check.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from jetgraph.applications.lens.compute import _states
from jetgraph.applications.lens.fitted import Corpus, FittedLens
from jetgraph.applications.lens.rest import first_order_series, rest_series
from jetgraph.applications.lens.results import LensResult
from jetgraph.ir import ENCODER_NAME, ResidualProgram

SKIP_FIRST_POSITIONS = 16  # the reference's: early positions are attention sinks


@torch.no_grad()
def jacobian_lens(prog: ResidualProgram, input_ids: torch.Tensor, k: int = 5,
                  granularity: str | None = None, layers: Sequence[int] | None = None, *,
                  attention_mask: torch.Tensor | None = None) -> LensResult:
    """The per-input Jacobian lens ``Dec(J_s(h) · h_s)`` at the stream states (module docstring),
    one forward-mode pass per state. Arguments as :func:`~jetgraph.applications.lens.iterative_lens`;
    the state h_N (nothing after it) decodes as the model itself."""
    view = prog.at(granularity) if granularity else prog  # type: ignore[arg-type]
    ids, mask = view.inputs(input_ids, attention_mask)
    states_list = list(range(len(view.units) + 1)) if layers is None else _states(layers, len(view.units))
    states, side = view.stream_with_side_inputs(ids, mask)
    transported = []
    for s in states_list:
        if s == len(view.units):
            transported.append(states[s])
            continue
        out = rest_series(view, s, first_order_series(states[s], [states[s]]), states, side)
        transported.append(out.coeffs[1])
    logits = torch.stack([view.decoder(h, side) for h in transported])
    written = [ENCODER_NAME if i == 0 else view.units[i - 1].name for i in states_list]
    return LensResult("jacobian", 1, _labels(states_list), logits, view.decoder(states[-1], side), k,
                      written_by=written, attention_mask=attention_mask)


def _kept_positions(mask: torch.Tensor, skip_first: int) -> torch.Tensor:
    """[batch, seq] bool: the real tokens after the first ``skip_first`` and before the last of
    each row (the positions the averaged Jacobian is taken over)."""
    real = mask.bool()
    order = real.long().cumsum(1)  # 1-based index among real tokens
    count = real.sum(1, keepdim=True)
    return real & (order > skip_first) & (order < count)


def _check_corpus(corpus: Sequence[torch.Tensor], skip_first: int) -> list[torch.Tensor]:
    if not corpus:
        raise ValueError("the fitting corpus is empty: give token-id tensors [seq] or [1, seq]")
    prompts = [torch.as_tensor(p).long().reshape(1, -1) for p in corpus]
    short = [i for i, p in enumerate(prompts) if p.shape[1] <= skip_first + 1]
    if len(short) == len(prompts):
        raise ValueError(f"every corpus prompt has at most skip_first + 1 = {skip_first + 1} tokens: "
                         "no position to average over; give longer prompts or a smaller skip_first")
    return [p for p in prompts if p.shape[1] > skip_first + 1]


@torch.no_grad()
def fit_jacobian_lens(prog: ResidualProgram, corpus: Sequence[torch.Tensor], *,
                      granularity: str | None = None, layers: Sequence[int] | None = None,
                      skip_first: int = SKIP_FIRST_POSITIONS, directions: int = 16,
                      description: str = "", progress: bool = True) -> FittedLens:
    """Fit the corpus-averaged Jacobian lens J̄_s (module docstring) on ``corpus`` (token ids of
    each prompt, [seq] or [1, seq]) by forward mode: ``directions`` basis columns per Taylor
    pass. ``layers``: the states (default every state before h_N). ``description`` says what the
    corpus is; it is recorded with the fit."""
    view, prompts, states_list, sums = _fit_setup(prog, corpus, granularity, layers, skip_first)
    d = view.d_model
    kept_total = 0
    started = time.perf_counter()
    passes = len(prompts) * len(states_list) * math.ceil(d / directions)
    bar = tqdm(total=passes, desc="Jacobian lens fit (forward mode)", disable=not progress)
    for ids in prompts:
        ids, mask = view.inputs(ids)
        kept = _kept_positions(mask, skip_first)
        kept_total += int(kept.sum())
        states, side = view.stream_with_side_inputs(ids, mask)
        place = kept.unsqueeze(-1).to(states[0].dtype)
        for row, s in enumerate(states_list):
            h = states[s]
            for start in range(0, d, directions):
                columns = range(start, min(start + directions, d))
                basis = [place * _one_hot(j, d, h) for j in columns]
                out = rest_series(view, s, first_order_series(h, basis), states, side)
                # column j: Σ over kept target positions of the coefficient of direction j
                tangents = out.coeffs[1:]  # [directions, batch, seq, d]
                summed = (tangents * place).sum((1, 2)).double()  # [directions, d]
                sums[row, :, start:start + len(columns)] += summed.T
                bar.update(1)
    bar.close()
    seconds = time.perf_counter() - started
    return _averaged(view, states_list, sums, Corpus.of(prompts, description, kept_total, skip_first),
                     {"method": "forward", "directions": directions, "seconds": round(seconds, 3)})


def fit_jacobian_lens_reverse(prog: ResidualProgram, corpus: Sequence[torch.Tensor], *,
                              granularity: str | None = None, layers: Sequence[int] | None = None,
                              skip_first: int = SKIP_FIRST_POSITIONS, rows: int = 16,
                              description: str = "", progress: bool = True) -> FittedLens:
    """The same J̄_s fitted by reverse mode, the straightforward way: one ``torch.func.vjp`` of
    the model's states per prompt, pulled back along ``rows`` one-hot output rows at a time
    (``vmap``), every source state from the same backward."""
    from torch.func import vjp, vmap

    view, prompts, states_list, sums = _fit_setup(prog, corpus, granularity, layers, skip_first)
    d = view.d_model
    kept_total = 0
    started = time.perf_counter()
    bar = tqdm(total=len(prompts) * math.ceil(d / rows), desc="Jacobian lens fit (reverse mode)",
               disable=not progress)
    for ids in prompts:
        ids, mask = view.inputs(ids)
        kept = _kept_positions(mask, skip_first)
        kept_total += int(kept.sum())
        with torch.no_grad():
            states, side = view.stream_with_side_inputs(ids, mask)
        sources = tuple(states[s] for s in states_list)
        final = _final_from_sources(view, states_list, states, side)
        _, pullback = vjp(final, sources)
        place = kept.unsqueeze(-1).to(states[0].dtype)
        for start in range(0, d, rows):
            width = min(rows, d - start)
            cotangents = torch.stack([place * _one_hot(start + i, d, states[0]) for i in range(width)])
            (grads,) = vmap(pullback)(cotangents)  # one entry per source state: [width, b, s, d]
            with torch.no_grad():
                for row, grad in enumerate(grads):
                    sums[row, start:start + width, :] += (grad * place).sum((1, 2)).double()
            bar.update(1)
    bar.close()
    seconds = time.perf_counter() - started
    return _averaged(view, states_list, sums, Corpus.of(prompts, description, kept_total, skip_first),
                     {"method": "reverse", "rows": rows, "seconds": round(seconds, 3)})


def _averaged(view: ResidualProgram, states_list: Sequence[int], sums: torch.Tensor, corpus: Corpus,
              fit: dict) -> FittedLens:
    """The averaged-Jacobian lens from the Jacobians summed over the corpus's kept positions."""
    return FittedLens("averaged_jacobian", _labels(states_list), (sums / corpus.positions).float(), None,
                      corpus, fit, view.granularity, view.d_model)


def _final_from_sources(view: ResidualProgram, states_list: Sequence[int], states: Sequence[torch.Tensor],
                        side: dict) -> object:
    """h_N as a function of the source states (each injected additively where it is, so the
    gradient with respect to each is ∂h_N/∂h_s with the later states depending on it)."""

    def final(sources: tuple[torch.Tensor, ...]) -> torch.Tensor:
        injected = dict(zip(states_list, sources, strict=True))
        held = {0: injected.get(0, states[0])}
        h = held[0]
        for index, unit in enumerate(view.units):
            with view.resident([unit]):
                h = h + unit(held[unit.reads], side)
            if index + 1 in injected:  # h_{s} itself: a fresh leaf with the same value
                h = injected[index + 1] + (h - h.detach())
            held[index + 1] = h
        return h

    return final


def _fit_setup(prog: ResidualProgram, corpus: Sequence[torch.Tensor], granularity: str | None,
               layers: Sequence[int] | None, skip_first: int
               ) -> tuple[ResidualProgram, list[torch.Tensor], list[int], torch.Tensor]:
    """The view, the checked prompts, the states fitted and the float64 sums [states, d, d]."""
    view = prog.at(granularity) if granularity else prog  # type: ignore[arg-type]
    prompts = _check_corpus(corpus, skip_first)
    states_list = _fit_states(layers, len(view.units))
    sums = torch.zeros(len(states_list), view.d_model, view.d_model, dtype=torch.float64)
    return view, prompts, states_list, sums


def _one_hot(j: int, d: int, like: torch.Tensor) -> torch.Tensor:
    e = torch.zeros(d, dtype=like.dtype, device=like.device)
    e[j] = 1
    return e


def _fit_states(layers: Sequence[int] | None, units: int) -> list[int]:
    states = list(range(units)) if layers is None else _states(layers, units)
    if units in states:
        raise ValueError(f"layers must name states before h{units}, the last state (it needs no "
                         f"lens): got {list(layers or [])}")
    return states


def _labels(states_list: Sequence[int]) -> list[str]:
    return [f"h{i}" for i in states_list]
