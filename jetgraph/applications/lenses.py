"""``jetgraph.lenses``: every lens, one entry per kind, each from a model or program and a text.

Each entry takes ``(model_or_program, input_ids_or_text, tokenizer=None, *, granularity=None,
layers=None, k=5, attention_mask=None)`` and returns one
:class:`~jetgraph.applications.lens.LensResult` (a centre per stream state h_s). What each reads:

============================  ==============================================  ===========================
entry                         logits at state s, position t                   reads
============================  ==============================================  ===========================
``logit``                     Dec(h_s)                                        h_s
``iterative(order=k)``        J^k Dec(h_s)(h_N), the paper's iterative lens   h_s **and h_N**
``ahead(order=k, ahead=m)``   J^k Dec(h_s)(h_{s+m})                           h_s and m states on
``jacobian``                  Dec(J_s(h)·h_s), J_s = ∂h_N/∂h_s at this input  h_s and the later
                                                                              units' derivatives here
``fitted(lens)``              Dec(J̄_s h_s) (averaged Jacobian) or             h_s[t] and the corpus
                              Dec(h_s + A_s h_s + b_s) (tuned)
============================  ==============================================  ===========================

Fitting: :func:`fit_jacobian` (forward mode, the Taylor engine) and :func:`fit_tuned` give a
:class:`~jetgraph.applications.lens.FittedLens`; ``lens.save(folder)`` / ``FittedLens.load``.

Comparing: :func:`concepts` scores lenses on the shipped intermediate-concept prompt sets
(:mod:`jetgraph.applications.lens.concepts`), with the leakage control for the lenses that read
later states.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn

from jetgraph.applications.entry_points import _input_ids, _program
from jetgraph.applications.lens import (
    FittedLens,
    LensResult,
    ahead_lens,
    fit_jacobian_lens,
    fit_tuned_lens,
    iterative_lens,
    jacobian_lens,
)
from jetgraph.applications.lens.concepts import concept_set_names, concept_sets, evaluate_concepts
from jetgraph.ir import ResidualProgram

Model = nn.Module | ResidualProgram


def logit(model_or_program: Model, input_ids_or_text: torch.Tensor | str, tokenizer: object = None, *,
          granularity: str | None = None, layers: Sequence[int] | None = None, k: int = 5,
          attention_mask: torch.Tensor | None = None) -> LensResult:
    """The logit lens Dec(h_s): the iterative lens at order 0."""
    return iterative(model_or_program, input_ids_or_text, tokenizer, order=0, granularity=granularity,
                     layers=layers, k=k, attention_mask=attention_mask)


def iterative(model_or_program: Model, input_ids_or_text: torch.Tensor | str, tokenizer: object = None, *,
              order: int = 1, granularity: str | None = None, layers: Sequence[int] | None = None,
              k: int = 5, attention_mask: torch.Tensor | None = None) -> LensResult:
    """The paper's iterative jet lens J^k Dec(h_s)(h_N): from order 1 on it reads the final state."""
    prog = _program(model_or_program, granularity)
    return iterative_lens(prog, _input_ids(prog, input_ids_or_text, tokenizer), order, k, granularity,
                          layers, attention_mask=attention_mask)


def ahead(model_or_program: Model, input_ids_or_text: torch.Tensor | str, tokenizer: object = None, *,
          order: int = 1, ahead: int = 1, granularity: str | None = None,
          layers: Sequence[int] | None = None, k: int = 5,
          attention_mask: torch.Tensor | None = None) -> LensResult:
    """The jet lens with its variate ``ahead`` states on, J^k Dec(h_s)(h_{s+m}): not h_N."""
    prog = _program(model_or_program, granularity)
    return ahead_lens(prog, _input_ids(prog, input_ids_or_text, tokenizer), order, ahead, k, granularity,
                      layers, attention_mask=attention_mask)


def jacobian(model_or_program: Model, input_ids_or_text: torch.Tensor | str, tokenizer: object = None, *,
             granularity: str | None = None, layers: Sequence[int] | None = None, k: int = 5,
             attention_mask: torch.Tensor | None = None) -> LensResult:
    """The per-input Jacobian lens Dec(J_s(h)·h_s), exact, by forward mode."""
    prog = _program(model_or_program, granularity)
    return jacobian_lens(prog, _input_ids(prog, input_ids_or_text, tokenizer), k, granularity, layers,
                         attention_mask=attention_mask)


def fitted(lens: FittedLens, model_or_program: Model, input_ids_or_text: torch.Tensor | str,
           tokenizer: object = None, *, k: int = 5, attention_mask: torch.Tensor | None = None) -> LensResult:
    """A fitted lens (averaged Jacobian or tuned) applied to one input."""
    if not isinstance(lens, FittedLens):
        raise TypeError(f"expected a FittedLens (fit_jacobian, fit_tuned or FittedLens.load), "
                        f"got {type(lens).__name__}")
    prog = _program(model_or_program, lens.granularity)
    return lens.apply(prog, _input_ids(prog, input_ids_or_text, tokenizer), k, attention_mask=attention_mask)


def _corpus(prog: ResidualProgram, corpus: Sequence[torch.Tensor | str],
            tokenizer: object) -> list[torch.Tensor]:
    if isinstance(corpus, (str, torch.Tensor)) or not len(corpus):
        raise TypeError("corpus must be a non-empty list of texts or of token-id tensors")
    return [_input_ids(prog, item, tokenizer) for item in corpus]


def fit_jacobian(model_or_program: Model, corpus: Sequence[torch.Tensor | str], tokenizer: object = None, *,
                 granularity: str | None = None, layers: Sequence[int] | None = None,
                 skip_first: int = 16, directions: int = 16, description: str = "",
                 progress: bool = True) -> FittedLens:
    """Fit the corpus-averaged Jacobian lens on ``corpus`` (texts with their tokenizer, or ids)."""
    prog = _program(model_or_program, granularity)
    return fit_jacobian_lens(prog, _corpus(prog, corpus, tokenizer), granularity=granularity, layers=layers,
                             skip_first=skip_first, directions=directions, description=description,
                             progress=progress)


def fit_tuned(model_or_program: Model, corpus: Sequence[torch.Tensor | str], tokenizer: object = None, *,
              granularity: str | None = None, layers: Sequence[int] | None = None, steps: int = 250,
              lr: float = 1.0, batch: int = 256, skip_first: int = 0, seed: int = 0,
              description: str = "", progress: bool = True) -> FittedLens:
    """Train the tuned lens's translators on ``corpus`` (texts with their tokenizer, or ids)."""
    prog = _program(model_or_program, granularity)
    return fit_tuned_lens(prog, _corpus(prog, corpus, tokenizer), granularity=granularity, layers=layers,
                          steps=steps, lr=lr, batch=batch, skip_first=skip_first, seed=seed,
                          description=description, progress=progress)


CONCEPT_LENSES = ("logit", "iterative", "ahead", "jacobian")
"""The lens kinds :func:`concepts` computes by name (fitted lenses are passed as objects)."""
READS_LATER_STATES = ("iterative", "ahead")


def concepts(model_or_program: Model, tokenizer: object, *, sets: Sequence[str] | None = None,
             kinds: Sequence[str] = CONCEPT_LENSES, fitted_lenses: Sequence[FittedLens] = (),
             granularity: str | None = None, layers: Sequence[int] | None = None,
             max_seconds: float | None = None, progress: bool = True) -> dict:
    """Score lenses on the intermediate-concept sets (default: all shipped; :func:`concept_set_names`).

    ``kinds``: ``logit``; ``iterative`` (order 1, reads h_N); ``ahead`` (order 1, one state on);
    ``jacobian`` (per input). ``fitted_lenses`` are added under their kind's name. The lenses that
    read later states (iterative, ahead) are also scored on the leakage control. ``layers``: the
    stream states scored (default h_0..h_{N-1}; h_N decodes as the model). Returns the dict
    of :func:`~jetgraph.applications.lens.concepts.evaluate_concepts` (pass@{1,5,10} of the
    intermediate concept and of the answer, first states, seconds per prompt); ``max_seconds``
    refuses a run whose estimate (timed on the first prompt) is longer.
    """
    unknown = [k for k in kinds if k not in CONCEPT_LENSES]
    if unknown:
        raise ValueError(f"unknown lens kind {unknown}: the kinds are {', '.join(CONCEPT_LENSES)} "
                         "(fitted lenses: fitted_lenses=[FittedLens, ...])")
    chosen_sets = concept_sets(sets)
    if tokenizer is None:
        raise ValueError("the concept sets are text: pass the model's tokenizer")
    prog = _program(model_or_program, granularity)
    view = prog.at(granularity) if granularity else prog
    last = len(view.units)
    states = list(range(last)) if layers is None else sorted({int(s) for s in layers})
    if not states or states[0] < 0 or states[-1] >= last:
        raise ValueError(f"layers must name stream states 0..{last - 1} (h_{last} decodes as the model "
                         f"itself), got {layers}")
    for lens in fitted_lenses:
        if not isinstance(lens, FittedLens):
            raise TypeError(f"fitted_lenses holds {type(lens).__name__}, not a FittedLens")
        at = granularity or prog.granularity
        if lens.granularity != at:
            raise ValueError(f"a {lens.kind} lens fitted at {lens.granularity} states cannot be compared at "
                             f"{at} states: give granularity={lens.granularity!r}")
        if not set(states) <= set(lens.states):
            raise ValueError(f"the {lens.kind} lens was fitted at {lens.labels}, not at every state scored: "
                             f"give layers= within them")
    builders = {
        "logit": lambda ids: iterative_lens(view, ids, 0, layers=states),
        "iterative": lambda ids: iterative_lens(view, ids, 1, layers=states),
        "ahead": lambda ids: ahead_lens(view, ids, 1, 1, layers=states),
        "jacobian": lambda ids: jacobian_lens(view, ids, layers=states),
    }
    control_builders = {  # the iterative lens is the ahead lens whose variate is h_N
        "iterative": lambda ids, other: ahead_lens(view, ids, 1, last, layers=states,
                                                   later_states_from=other),
        "ahead": lambda ids, other: ahead_lens(view, ids, 1, 1, layers=states, later_states_from=other),
    }
    lenses = {name: builders[name] for name in kinds}
    for lens in fitted_lenses:
        lenses[f"{lens.kind} (fitted)"] = functools.partial(_apply_fitted, lens, view)
    controls = {name: control_builders[name] for name in kinds if name in READS_LATER_STATES}

    def encode(text: str) -> torch.Tensor:
        return _input_ids(view, text, tokenizer)

    def final_logits(text: str) -> torch.Tensor:
        ids = encode(text)
        with torch.no_grad():
            states, side = view.stream_with_side_inputs(*view.inputs(ids))
            return view.decoder(states[-1], side)[0, -1].float()

    return evaluate_concepts(chosen_sets, lenses, controls, tokenizer, encode, final_logits, states,
                             max_seconds=max_seconds, progress=progress)


def _apply_fitted(lens: FittedLens, prog: ResidualProgram, ids: torch.Tensor) -> LensResult:
    return lens.apply(prog, ids)


__all__ = ["CONCEPT_LENSES", "FittedLens", "ahead", "concept_set_names", "concepts", "fit_jacobian",
           "fit_tuned", "fitted", "iterative", "jacobian", "logit"]
