"""Intermediate concepts: does a lens show the bridge concept of a two-hop prompt, and where?

For "The capital of the country famous for tulips and windmills is", the intermediate concept is
"Netherlands" and the answer "Amsterdam"; neither is in the prompt. A lens *passes at k* on an item
when the concept's token is among its top-k at some stream state h_0..h_{N-1} (h_N decodes to the
model's own output) and some position of the prompt; the *first state* is the earliest such state.
Intermediate and answer are scored separately (the scoring of Anthropic's Jacobian-lens study).

A lens that reads later states (the iterative jet lens reads h_N; the ahead lens h_{s+m}) can show
the answer at h_0 because h_N holds it. The **leakage control** makes that visible: the same lens
with its later states taken from a *control prompt* that has the same answer and no intermediate
step (``"Amsterdam, Amsterdam, Amsterdam,"``: the model predicts the answer by copying). A lens that
reads only h_s scores the same on the control; a lens whose answer comes from h_N keeps its answer
score and loses the intermediate concept.

The prompt sets ship in ``jetgraph/data/lens_concepts.json`` (written for jetgraph; 4 sets of 40+).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources

import torch

from jetgraph.applications.lens.results import LensResult, LensSeriesDivergenceWarning
from jetgraph.errors import CostError

PASS_AT = (1, 5, 10)
SETS_FILE = "lens_concepts.json"

LensFunction = Callable[[torch.Tensor], LensResult]
"""A lens on one prompt's ids [1, seq]: its result holds logits [states, 1, seq, vocab]."""


@dataclass(frozen=True)
class ConceptItem:
    """One two-hop prompt: the concept it passes through and the answer it leads to."""

    prompt: str
    intermediate: tuple[str, ...]
    answer: str

    @property
    def control_prompt(self) -> str:
        """A prompt with the same answer and no intermediate step: the model copies the answer."""
        return f"{self.answer}, {self.answer}, {self.answer},"


@dataclass(frozen=True)
class ConceptSet:
    name: str
    description: str
    items: tuple[ConceptItem, ...]


def concept_set_names() -> list[str]:
    """The names of the shipped prompt sets."""
    return sorted(name for name in _shipped() if not name.startswith("_"))


def concept_sets(names: Sequence[str] | None = None) -> list[ConceptSet]:
    """The shipped prompt sets named (default: all), in the order given."""
    shipped = _shipped()
    available = concept_set_names()
    chosen = available if names is None else list(names)
    unknown = [n for n in chosen if n not in available]
    if unknown or not chosen:
        raise ValueError(f"unknown concept set {unknown or chosen!r}: the sets are {', '.join(available)}")
    return [ConceptSet(name, shipped[name]["description"],
                       tuple(ConceptItem(i["prompt"], tuple(i["intermediate"]), i["answer"])
                             for i in shipped[name]["items"]))
            for name in chosen]


def _shipped() -> dict:
    return json.loads(resources.files("jetgraph.data").joinpath(SETS_FILE).read_text(encoding="utf-8"))


def word_token_ids(tokenizer: object, word: str, exclude: Iterable[int] = ()) -> tuple[int, ...]:
    """The tokens that stand for ``word`` when it begins: the first token of ``" word"`` and of
    ``"word"`` (after a quote or at a line start) that spells something (a SentencePiece
    vocabulary may start a word with a lone "▁"), kept only when it spells at least three of the
    word's characters (all of a shorter word), so that a small vocabulary's " N" does not stand
    for "Netherlands", and when it is not in ``exclude`` (the prompt's own tokens: a logit lens
    ranks the current token first at h_0). Special tokens never count. May be empty."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    excluded = set(exclude) | special
    found: list[int] = []
    for text in (" " + word, word):
        ids = [i for i in tokenizer(text, add_special_tokens=False).input_ids if i not in special]
        spelled = [(i, tokenizer.decode([i]).strip()) for i in ids]
        spelled = [(i, part) for i, part in spelled if part]  # a lone word-start piece ("▁") spells nothing
        if not spelled:
            continue
        token, part = spelled[0]
        if token not in found and token not in excluded and len(part) >= min(3, len(word)) \
                and word.startswith(part):
            found.append(token)
    return tuple(found)


def best_ranks(logits: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
    """Per state, the best rank (0 = top-1) of any of ``tokens`` over the prompt's positions.

    ``logits``: [states, seq, vocab]. A token's rank is the number of vocabulary entries with a
    strictly larger logit; a state whose logits are not finite ranks last."""
    chosen = logits[..., list(tokens)]  # [states, seq, tokens]
    above = (logits.unsqueeze(-2) > chosen.unsqueeze(-1)).sum(-1)  # [states, seq, tokens]
    finite = torch.isfinite(logits).all(-1, keepdim=True)
    above = torch.where(finite, above, torch.full_like(above, logits.shape[-1]))
    return above.flatten(1).min(1).values


def pass_at(ranks: torch.Tensor, states: Sequence[int], ks: Sequence[int] = PASS_AT
            ) -> dict[str, dict[str, float | int | None]]:
    """Scores of ``ranks`` [items, states] (a NaN row: an item this tokenizer cannot score) at the
    stream states numbered ``states``: per k, the share of scored items whose concept is in the
    top-k at some state (``pass``), over those the median first such state's number
    (``first_state``, None when none passes), and ``items`` scored."""
    ranks = ranks[~ranks.isnan().any(1)]
    scores: dict[str, dict[str, float | int | None]] = {}
    for k in ks:
        hit = ranks < k  # [items, states]
        passed = hit.any(1)
        first = torch.tensor(states)[hit.float().argmax(1)[passed]]
        scores[f"pass@{k}"] = {"pass": passed.float().mean().item() if len(ranks) else None,
                               "first_state": int(first.median()) if len(first) else None,
                               "items": len(ranks)}
    return scores


@dataclass
class ConceptScores:
    """Ranks of one lens on one set: [items, states] for the intermediate concept and the answer
    (NaN rows: items whose word has no token to score, see :func:`word_token_ids`), and the same
    for the *next* item's concept and answer on this item's prompt: the chance baseline (how often
    an unrelated word of the same set is found)."""

    states: tuple[int, ...]
    intermediate: torch.Tensor
    answer: torch.Tensor
    other_intermediate: torch.Tensor
    other_answer: torch.Tensor

    def summary(self) -> dict[str, dict]:
        return {name: pass_at(getattr(self, name), self.states)
                for name in ("intermediate", "answer", "other_intermediate", "other_answer")}


def score_lens(lens: Callable[[ConceptItem], LensResult], items: Sequence[ConceptItem], tokenizer: object,
               encode: Callable[[str], torch.Tensor], states: Sequence[int],
               progress: Callable[[int], None] | None = None) -> ConceptScores:
    """Rank each item's intermediate concept and answer under ``lens`` (a function of the item)
    at the stream states numbered ``states`` (rows of its result labelled ``h{s}``)."""
    ranks: list[list[torch.Tensor]] = [[], [], [], []]
    for index, item in enumerate(items):
        result = lens(item)
        logits = result.logits[[result.labels.index(f"h{s}") for s in states], 0].float()
        prompt = encode(item.prompt).flatten().tolist()
        other = items[(index + 1) % len(items)]
        pairs = ((item.intermediate, item.answer), (other.intermediate, other.answer))
        for row, (words, answer) in enumerate(pairs):
            concept = tuple(t for word in words for t in word_token_ids(tokenizer, word, prompt))
            ranks[2 * row].append(_ranks(logits, concept))
            ranks[2 * row + 1].append(_ranks(logits, word_token_ids(tokenizer, answer, prompt)))
        if progress is not None:
            progress(1)
    return ConceptScores(tuple(states), *(torch.stack(r) for r in ranks))


def _ranks(logits: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
    if not tokens:
        return torch.full((logits.shape[0],), float("nan"))
    return best_ranks(logits, tokens).float()


def model_answer_ranks(items: Sequence[ConceptItem], tokenizer: object,
                       final_logits: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """Rank of each item's answer in the model's own next-token logits at the prompt's end (NaN
    where the answer has no token to score)."""
    ranks = []
    for item in items:
        logits = final_logits(item.prompt)  # [vocab]
        ranks.append(_ranks(logits[None, None], word_token_ids(tokenizer, item.answer))[0])
    return torch.stack(ranks)


def concept_table(results: Mapping[str, Mapping[str, dict]], k: int = 10,
                  parts: tuple[str, str] = ("intermediate", "answer")) -> str:
    """A markdown table: per lens (rows) and set (columns), pass@k of ``parts`` (default the
    intermediate concept / the answer; ``("other_intermediate", "other_answer")`` gives the chance
    baseline) with the median first state."""
    if not results:
        return "(no lens)"
    sets = list(next(iter(results.values())).keys())
    lines = ["| lens | " + " | ".join(sets) + " |", "|---" * (len(sets) + 1) + "|"]
    for lens, per_set in results.items():
        cells = [" / ".join(_cell(per_set[name][part][f"pass@{k}"]) for part in parts) for name in sets]
        lines.append(f"| {lens} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(score: dict) -> str:
    if score["pass"] is None:
        return "–"
    first = score["first_state"]
    return f"{score['pass']:.2f}" + (f" (h{first:.0f})" if first is not None else "")


ControlFunction = Callable[[torch.Tensor, torch.Tensor], LensResult]
"""A lens on one prompt's ids with its later states taken from the control prompt's ids."""


def evaluate_concepts(sets: Sequence[ConceptSet], lenses: Mapping[str, LensFunction],
                      controls: Mapping[str, ControlFunction], tokenizer: object,
                      encode: Callable[[str], torch.Tensor], final_logits: Callable[[str], torch.Tensor],
                      states: Sequence[int], *, max_seconds: float | None = None,
                      progress: bool = True) -> dict:
    """Every lens (and every control) on every set: pass@{1,5,10} of the intermediate concept and
    of the answer with the median first state, the model's own answer pass@k at the prompt's end
    (on the prompts and on their control prompts), and each lens's seconds per prompt.

    The first item of the first set runs every lens once and times it; past ``max_seconds`` for
    the whole evaluation the run stops there with the estimate. Diverging jet series are scored
    as they are (their warnings are silenced here: the faithfulness benchmark counts them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LensSeriesDivergenceWarning)
        return _evaluate(sets, lenses, controls, tokenizer, encode, final_logits, states, max_seconds,
                         progress)


def _evaluate(sets: Sequence[ConceptSet], lenses: Mapping[str, LensFunction],
              controls: Mapping[str, ControlFunction], tokenizer: object,
              encode: Callable[[str], torch.Tensor], final_logits: Callable[[str], torch.Tensor],
              states: Sequence[int], max_seconds: float | None,
              progress: bool) -> dict:
    from tqdm.auto import tqdm

    prompts = sum(len(s.items) for s in sets)
    runs: dict[str, Callable[[ConceptItem], LensResult]] = {
        **{name: _on_prompt(lens, encode) for name, lens in lenses.items()},
        **{f"{name} [control]": _on_control(control, encode) for name, control in controls.items()}}
    seconds: dict[str, float] = {}
    for name, run in runs.items():
        started = time.perf_counter()
        run(sets[0].items[0])
        seconds[name] = time.perf_counter() - started
    estimate = sum(seconds.values()) * prompts
    if max_seconds is not None and estimate > max_seconds:
        raise CostError(f"the concept evaluation would take about {estimate:,.0f} s ({prompts} prompts × "
                        f"{len(runs)} lenses, {sum(seconds.values()):.2f} s per prompt measured), over the "
                        f"limit of {max_seconds:g} s: choose fewer sets, lenses or states, or raise "
                        "the limit")
    bar = tqdm(total=prompts * len(runs), desc="lenses on the concept sets", unit="prompt",
               disable=not progress)
    results: dict[str, dict] = {name: {} for name in runs}
    for concept_set in sets:
        for name, run in runs.items():
            started = time.perf_counter()
            scores = score_lens(run, concept_set.items, tokenizer, encode, states, progress=bar.update)
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
            results[name][concept_set.name] = scores.summary()
    bar.close()
    model = {s.name: _model_pass(model_answer_ranks(s.items, tokenizer, final_logits)) for s in sets}
    control_model = {s.name: _model_pass(model_answer_ranks(
        [ConceptItem(i.control_prompt, (), i.answer) for i in s.items], tokenizer, final_logits))
        for s in sets}
    return {"sets": {s.name: {"description": s.description, "items": len(s.items)} for s in sets},
            "states": [f"h{s}" for s in states], "model": model, "model_on_control_prompts": control_model,
            "lenses": {name: results[name] for name in lenses},
            "controls": {name: results[f"{name} [control]"] for name in controls},
            "seconds_per_prompt": {name: seconds[name] / (prompts + 1) for name in runs}}


def _model_pass(ranks: torch.Tensor) -> dict[str, float | int | None]:
    """The model's own answer: the share of scored items whose answer is in its top-k."""
    ranks = ranks[~ranks.isnan()]
    return {"items": len(ranks), **{f"pass@{k}": (ranks < k).float().mean().item() if len(ranks) else None
                                    for k in PASS_AT}}


def _on_prompt(lens: LensFunction, encode: Callable[[str], torch.Tensor]
               ) -> Callable[[ConceptItem], LensResult]:
    return lambda item: lens(encode(item.prompt))


def _on_control(control: ControlFunction, encode: Callable[[str], torch.Tensor]
                ) -> Callable[[ConceptItem], LensResult]:
    return lambda item: control(encode(item.prompt), encode(item.control_prompt))
