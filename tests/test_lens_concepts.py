"""The intermediate-concept benchmark (issue 32): the shipped prompt sets, the scoring against
ranks computed by hand, the leakage control against nested jvp with the other prompt's states,
``jetgraph.lenses.concepts`` end to end and ``jetgraph lens-eval`` with its errors."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import captured, require_gpt2_tokenizer, require_tinystories
from torch.func import jvp

import jetgraph
from jetgraph.applications.lens import LensResult, ahead_lens, fit_tuned_lens, iterative_lens
from jetgraph.applications.lens.concepts import (
    ConceptItem,
    best_ranks,
    concept_set_names,
    concept_sets,
    evaluate_concepts,
    pass_at,
    word_token_ids,
)
from jetgraph.cli import main
from jetgraph.errors import CostError


def _words(text: str) -> set[str]:
    return {w.lower() for w in re.findall(r"\w+", text)}


def test_the_shipped_sets_have_forty_items_each_and_never_give_the_concept_away() -> None:
    sets = concept_sets()
    assert [s.name for s in sets] == concept_set_names() and len(sets) >= 4
    for concept_set in sets:
        assert len(concept_set.items) >= 40, concept_set.name
        assert concept_set.description
        for item in concept_set.items:
            words = _words(item.prompt)
            assert item.answer.lower() not in words, item.prompt
            assert all(c.lower() not in words for c in item.intermediate), item.prompt
            assert item.control_prompt.count(item.answer) == 3
    with pytest.raises(ValueError, match=r"unknown concept set.*capitals"):
        concept_sets(["capital"])


def test_best_ranks_are_the_counts_of_larger_logits_at_the_best_position() -> None:
    logits = torch.randn(3, 5, 50, generator=torch.Generator().manual_seed(0))
    tokens = (7, 19)
    expected = torch.tensor([min(int((logits[s, p] > logits[s, p, t]).sum()) for p in range(5)
                                 for t in tokens) for s in range(3)])
    assert torch.equal(best_ranks(logits, tokens), expected)
    logits[1, :, 0] = float("nan")  # a diverged state ranks last
    assert best_ranks(logits, tokens)[1] == 50


def test_pass_at_counts_items_and_reports_the_median_first_state() -> None:
    ranks = torch.tensor([[20.0, 3.0, 0.0],   # top-1 at the third state, top-5 from the second
                          [0.0, 50.0, 50.0],  # top-1 at the first
                          [30.0, 30.0, 30.0],  # never in the top 10
                          [float("nan")] * 3])  # not scored
    scores = pass_at(ranks, states=[0, 4, 8])
    assert scores["pass@1"] == {"pass": pytest.approx(2 / 3), "first_state": 0, "items": 3}
    assert scores["pass@5"]["pass"] == pytest.approx(2 / 3) and scores["pass@5"]["first_state"] in (0, 4)
    assert scores["pass@10"]["items"] == 3
    empty = pass_at(torch.full((2, 3), float("nan")), states=[0, 1, 2])
    assert empty["pass@1"] == {"pass": None, "first_state": None, "items": 0}


def test_word_tokens_start_the_word_and_leave_out_the_prompts_own() -> None:
    from transformers import AutoTokenizer

    gpt2 = AutoTokenizer.from_pretrained(require_gpt2_tokenizer().parent)
    paris = word_token_ids(gpt2, "Paris")
    assert gpt2.convert_ids_to_tokens(list(paris)) == ["ĠParis", "Paris"]
    assert word_token_ids(gpt2, "Paris", exclude=[paris[0]]) == paris[1:]
    assert word_token_ids(gpt2, "7") == tuple(gpt2(" 7").input_ids[:1] + gpt2("7").input_ids[:1])
    # a word whose first token spells fewer than three of its letters is not scored
    for word in ("Netherlands", "Reykjavik", "Phnom", "Dodoma"):
        assert all(len(gpt2.decode([t]).strip()) >= 3 for t in word_token_ids(gpt2, word))
    _, tiny = jetgraph.load_model(str(require_tinystories()))
    dog = word_token_ids(tiny, "dog")  # SentencePiece: a lone "▁" starts the word and is skipped
    assert [tiny.decode([t]).strip() for t in dog] == ["dog"]


def test_the_leakage_control_takes_the_later_states_from_the_other_prompt() -> None:
    """ahead_lens with later_states_from: at state s the jet of Dec at h_s evaluated at the other
    prompt's h_{s+m} at its last position (nested jvp, float64); for the iterative lens (m = N)
    and the same prompt, the last position equals the paper's lens."""
    _, prog = captured("gpt2", torch.float64)
    view = prog.at("sublayer")
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(1))
    other = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(2))
    states, side = view.stream_with_side_inputs(ids)
    theirs, _ = view.stream_with_side_inputs(other)
    last = len(states) - 1
    result = ahead_lens(view, ids, order=2, ahead=1, later_states_from=other)
    for s in range(len(states)):
        v = theirs[min(s + 1, last)][:, -1:] - states[s]
        first = lambda h, v=v: jvp(lambda x: view.decoder(x, side), (h,), (v,))[1]  # noqa: E731
        second = jvp(first, (states[s],), (v,))[1]
        expected = view.decoder(states[s], side) + first(states[s]) + second / math.factorial(2)
        assert ((result.logits[s] - expected).abs().max() / expected.abs().max()).item() < 1e-10, s
    same = ahead_lens(view, ids, order=1, ahead=last, later_states_from=ids)
    paper = iterative_lens(view, ids, order=1)
    assert torch.allclose(same.logits[:, :, -1], paper.logits[:, :, -1], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(same.logits[:, :, 0], paper.logits[:, :, 0])
    with pytest.raises(ValueError, match="one unpadded prompt"):
        ahead_lens(view, ids.repeat(2, 1), later_states_from=other)


def _result(logits: torch.Tensor) -> LensResult:
    return LensResult("logit", 0, [f"h{s}" for s in range(logits.shape[0])], logits, logits[-1], 5)


class Letters:
    """A tokenizer of single letters (id = letter index; a space before a word is dropped)."""

    all_special_ids: tuple[int, ...] = ()

    def __call__(self, text: str, add_special_tokens: bool = False) -> object:
        ids = [ord(c) - ord("a") for c in text.strip().lower() if c.isalpha()]
        return type("Encoded", (), {"input_ids": ids})()

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("a") + i) for i in ids)


def test_evaluate_concepts_scores_a_lens_whose_answers_are_known() -> None:
    """Items whose words are single letters (the Letters tokenizer's ids): the lens puts the
    intermediate first at state 1 and the answer first at state 2; the control's lens shows only
    the answer; the model's own logits rank the answer first."""
    from jetgraph.applications.lens.concepts import ConceptSet

    vocab, states = 26, 3
    items = tuple(ConceptItem(f"q{n}", (intermediate,), answer)
                  for n, (intermediate, answer) in enumerate([("b", "c"), ("d", "e"), ("f", "g")]))
    concept_set = ConceptSet("letters", "toy", items)
    letter = {item.prompt: item for item in items}

    def encode(text: str) -> torch.Tensor:
        return torch.tensor([[ord(text[0]) - ord("a")]]) if text in letter else torch.tensor([[25]])

    def logits_for(item: ConceptItem, intermediate: bool) -> torch.Tensor:
        logits = torch.zeros(states + 1, 1, 1, vocab)
        logits[..., 1:7] = -5.0  # the items' letters (b..g) rank below the 20 others unless raised
        if intermediate:
            logits[1, 0, 0, ord(item.intermediate[0]) - ord("a")] = 10.0
        logits[2, 0, 0, ord(item.answer) - ord("a")] = 10.0
        return logits

    current: dict[str, ConceptItem] = {}  # the item whose prompt was encoded last

    def lens(ids: torch.Tensor) -> LensResult:
        return _result(logits_for(current["item"], True))

    def control(ids: torch.Tensor, other: torch.Tensor) -> LensResult:
        return _result(logits_for(current["item"], False))

    def encode_tracking(text: str) -> torch.Tensor:
        if text in letter:
            current["item"] = letter[text]
        return encode(text)

    def final(text: str) -> torch.Tensor:
        row = torch.zeros(vocab)
        row[ord((letter[text] if text in letter else items[0]).answer) - ord("a")] = 1.0
        return row

    result = evaluate_concepts([concept_set], {"toy": lens}, {"toy": control}, Letters(), encode_tracking,
                               final, list(range(states)), progress=False)
    scores = result["lenses"]["toy"]["letters"]
    assert scores["intermediate"]["pass@1"] == {"pass": 1.0, "first_state": 1, "items": 3}
    assert scores["answer"]["pass@1"] == {"pass": 1.0, "first_state": 2, "items": 3}
    assert scores["other_intermediate"]["pass@10"]["pass"] == 0.0  # another item's letters never rank high
    assert result["controls"]["toy"]["letters"]["intermediate"]["pass@10"]["pass"] == 0.0
    assert result["controls"]["toy"]["letters"]["answer"]["pass@1"]["pass"] == 1.0
    assert result["model"]["letters"]["pass@1"] == 1.0 and result["model"]["letters"]["items"] == 3
    assert result["states"] == ["h0", "h1", "h2"]
    assert set(result["seconds_per_prompt"]) == {"toy", "toy [control]"}
    with pytest.raises(CostError, match="concept evaluation would take about"):
        evaluate_concepts([concept_set], {"toy": lens}, {}, Letters(), encode_tracking, final, [0],
                          max_seconds=1e-9, progress=False)


def test_concepts_on_tinystories_and_its_errors(tmp_path: Path) -> None:
    model, tokenizer = jetgraph.load_model(str(require_tinystories()))
    prog = jetgraph.capture(model, granularity="sublayer")
    result = jetgraph.lenses.concepts(prog, tokenizer, sets=["associations"], kinds=["logit", "ahead"],
                                      layers=[0, 2], progress=False)
    assert result["states"] == ["h0", "h2"] and set(result["lenses"]) == {"logit", "ahead"}
    assert set(result["controls"]) == {"ahead"}  # the logit lens reads no later state
    scores = result["lenses"]["logit"]["associations"]["intermediate"]["pass@10"]
    assert 0 < scores["items"] <= 40 and scores["first_state"] in (None, 0, 2)
    with pytest.raises(ValueError, match="unknown lens kind"):
        jetgraph.lenses.concepts(prog, tokenizer, kinds=["tuned"])
    with pytest.raises(ValueError, match="h_4 decodes as the model"):
        jetgraph.lenses.concepts(prog, tokenizer, layers=[4])
    with pytest.raises(ValueError, match="pass the model's tokenizer"):
        jetgraph.lenses.concepts(prog, None)
    ids = [tokenizer("Once upon a time there was a little dog.", return_tensors="pt").input_ids]
    block_lens = fit_tuned_lens(prog.at("block"), ids, granularity="block", steps=2, progress=False)
    with pytest.raises(ValueError, match="fitted at block states"):
        jetgraph.lenses.concepts(prog, tokenizer, fitted_lenses=[block_lens])


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_lens_eval_writes_the_scores_and_refuses_bad_input(tmp_path: Path, capsys) -> None:
    model = str(require_tinystories())
    out = tmp_path / "scores.json"
    loaded, tokenizer = jetgraph.load_model(model)
    ids = [tokenizer("Once upon a time there was a little dog.", return_tensors="pt").input_ids]
    block_lens = tmp_path / "tuned_block"
    fit_tuned_lens(jetgraph.capture(loaded).at("block"), ids, granularity="block", steps=2,
                   progress=False).save(block_lens)
    code, printed, _ = _run(["lens-eval", model, "--set", "associations", "--lens", "logit", "--lens",
                             "iterative", "--every", "2", "--out", str(out)], capsys)
    assert code == 0
    written = json.loads(out.read_text())
    assert written["states"] == ["h0", "h2"] and set(written["controls"]) == {"iterative"}
    assert "| logit |" in printed and "leakage control" in printed and "chance baseline" in printed
    for argv, exit_code, message in [
        (["--set", "capital"], 2, "unknown --set capital: the sets are"),
        (["--lens", "tuned"], 2, "invalid choice"),
        (["--fitted", str(tmp_path)], 2, "holds no saved lens"),
        (["--out", str(tmp_path / "scores.csv")], 2, "must end in .json"),
        (["--fitted", str(block_lens), "--granularity", "sublayer"], 2, "give --granularity block"),
        (["--set", "associations", "--max-time", "0.001"], 1, "would take about"),
    ]:
        code, _, err = _run(["lens-eval", model, *argv], capsys)
        assert code == exit_code, argv
        assert message in err and "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("jetgraph lens-eval: error:")  # one line, last
