"""The expansion as an IR: one node list in topological order, terms that reference unit objects,
one definition of what a term computes, and the one-call entry points."""

from __future__ import annotations

import pytest
import torch

import jetgraph
from jetgraph.applications import iterative_lens, iterative_lenses, ngram_table
from jetgraph.capture.zoo import VOCAB, tiny_model
from jetgraph.codegen import BatchedRun, plan
from jetgraph.errors import CaptureError
from jetgraph.passes import Expansion, logit_agreement
from tests.conftest import captured, random_ids


def _chain(prog, order: int = 2) -> Expansion:
    first = jetgraph.expand(prog, 0, jetgraph.source_terms(prog), order=1, identity="jet")
    second = jetgraph.expand(prog, 1, first, order=order, split=False)
    return jetgraph.expand(prog, "decoder", second, order=1, weights="unit")


def test_nodes_are_every_term_once_inputs_first() -> None:
    _, prog = captured("gpt2")
    expansion = _chain(prog)
    position = {t.uid: i for i, t in enumerate(expansion.nodes)}
    assert len(position) == len(expansion.nodes)
    assert all(position[d.uid] < position[t.uid] for t in expansion.nodes for d in t.inputs)
    assert {t.uid for t in expansion.terms} <= set(position)
    graph = expansion.to_networkx()
    assert list(graph.nodes) == [t.uid for t in expansion.nodes]
    assert graph.number_of_edges() == sum(len(t.inputs) for t in expansion.nodes)
    assert sum(graph.nodes[t.uid]["output"] for t in expansion.nodes) == len(expansion.terms)


def test_terms_reference_the_units_themselves() -> None:
    _, prog = captured("llama")
    expansion = jetgraph.expand(prog, 1, [jetgraph.stream_term(prog, 0)], order=2)
    jets = [t for t in expansion.terms if t.kind == "jet"]
    assert all(t.unit is prog.units[1] for t in jets)
    assert [(t.degree, t.order) for t in jets] == [(0, 2), (1, 2), (2, 2)]
    decoded = jetgraph.expand(prog, "decoder", expansion, order=0)
    assert all(t.unit is prog.decoder and t.space == "logits" for t in decoded.terms)
    assert prog.decoder.name == "unembed" and prog.decoder.kind == "decoder"


def test_an_expansion_holds_only_its_own_views_units() -> None:
    _, prog = captured("llama")
    blocks = jetgraph.expand(prog.at("block"), 0, [jetgraph.stream_term(prog, 0)])
    sublayer = prog.at("sublayer")
    with pytest.raises(ValueError, match="not a unit of this program's sublayer view"):
        Expansion(sublayer, 0, blocks.terms)


def test_reference_and_batched_evaluators_agree() -> None:
    """Both evaluators compute each term with passes.evaluate.evaluate_terms: one on single
    centres, one on stacked centres; they agree to float32 rounding of the stacked matmuls."""
    _, prog = captured("gpt_neox")
    ids = random_ids(2, 6, seed=5)
    expansion = _chain(prog)
    reference = expansion.evaluate(ids)
    outputs, target, remainder = BatchedRun(plan(expansion), ids).run()
    for i, term in enumerate(expansion.terms):
        torch.testing.assert_close(outputs[i], reference.terms[term.name], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target, reference.target, rtol=0, atol=0)
    torch.testing.assert_close(remainder, reference.remainder, rtol=1e-4, atol=1e-4)
    # one token addend: block0 once; its skip branch and 2 coefficients are block1's 3 centres;
    # those 3 and block1's 3·3 terms are the decoder's 12 centres, each called once
    assert plan(expansion).unit_calls == {prog.units[0].name: 1, prog.units[1].name: 3, "unembed": 12}


def test_faithfulness_is_the_shared_metrics() -> None:
    _, prog = captured("llama")
    ids = random_ids(2, 5, seed=2)
    expansion = jetgraph.expand(prog, "decoder", [jetgraph.stream_term(prog, 1)], order=1, weights="unit")
    report = expansion.faithfulness(ids, k=3)
    values = expansion.evaluate(ids)
    metrics = logit_agreement(values.total(), values.target, k=3)
    assert report["cosine"] == pytest.approx(metrics["cosine"].mean().item(), abs=1e-12)
    assert report["top3"] == pytest.approx(metrics["topk"].mean().item(), abs=1e-12)
    assert report["relative_remainder"] == pytest.approx(
        (values.remainder.norm() / values.target.norm()).item(), rel=1e-6)


def test_one_lens_pass_gives_every_order() -> None:
    """The order-j lens from one pass at order 2 equals a separate order-j pass."""
    _, prog = captured("gpt2")
    ids = random_ids(2, 5, seed=4)
    together = iterative_lenses(prog, ids, orders=(0, 1, 2))
    assert list(together) == [0, 1, 2]
    for order, result in together.items():
        alone = iterative_lens(prog, ids, order=order)
        torch.testing.assert_close(result.logits, alone.logits, rtol=1e-5, atol=1e-5)
        assert result.labels == [f"h{i}" for i in range(len(prog.units) + 1)]
        assert result.written_by == ["embed", *(u.name for u in prog.units)]
    some = iterative_lenses(prog, ids, orders=(1,), layers=[0, 2])[1]
    assert some.labels == ["h0", "h2"]
    torch.testing.assert_close(some.logits, together[1].logits[[0, 2]], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"layers must name stream states 0\.\.2"):
        iterative_lenses(prog, ids, layers=[5])


def test_capture_without_example_ids() -> None:
    model = tiny_model("llama")
    prog = jetgraph.capture(model)
    assert tuple(prog.example_input_ids.shape) == (1, 8)
    ids = random_ids(3, 11, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(prog(ids), model(input_ids=ids, use_cache=False).logits,
                                   rtol=1e-4, atol=1e-4)

    class NoVocabulary(torch.nn.Module):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return ids.float()

    with pytest.raises(CaptureError, match="pass example_input_ids"):
        jetgraph.capture(NoVocabulary())


class _Tokenizer:
    """Characters to ids (what jetgraph.lens needs of a tokenizer)."""

    def __call__(self, text: str, return_tensors: str = "pt", add_special_tokens: bool = False):
        class Encoded:
            input_ids = torch.tensor([[ord(c) % VOCAB for c in text]])

        return Encoded()


def test_lens_entry_point_from_a_model_or_a_program() -> None:
    model, prog = captured("gpt2")
    ids = random_ids(1, 6, seed=1)
    from_model = jetgraph.lens(model, ids, orders=(0, 2))  # captured at the one default granularity
    from_program = jetgraph.lens(prog.at(jetgraph.ir.DEFAULT_GRANULARITY), ids, orders=(0, 2))
    assert list(from_model) == [0, 2]
    for order in (0, 2):
        torch.testing.assert_close(from_model[order].logits, from_program[order].logits, rtol=1e-5, atol=1e-5)
    text = jetgraph.lens(prog, "abc d", orders=(1,), tokenizer=_Tokenizer())[1]
    assert text.logits.shape[2] == 5
    with pytest.raises(ValueError, match="needs its tokenizer"):
        jetgraph.lens(prog, "abc")
    texts = jetgraph.lens(prog, ["abc d", "ab"], orders=(1,), tokenizer=_Tokenizer(), progress=False)[1]
    assert texts.prompts == 2 and texts.positions == 7  # padded batches: tests/test_padding.py
    torch.testing.assert_close(texts.prompt_metrics["cosine"][:, 0], text.prompt_metrics["cosine"][:, 0],
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match=r"a model .* or a ResidualProgram"):
        jetgraph.lens("gpt2", ids)


def test_ngrams_entry_point_matches_the_table() -> None:
    model, prog = captured("llama")
    table = jetgraph.ngrams(model, "E→MLP_last→U", keywords=[3, 7], top=5, progress=False)
    direct = ngram_table(prog, "E→MLP_last→U", keywords=[3, 7], top=5, rank="prob", progress=False)
    assert table.path == direct.path == "embed.token→mlp1→unembed"
    torch.testing.assert_close(table.top_values, direct.top_values, rtol=1e-6, atol=1e-6)
    assert table.top_index.tolist() == direct.top_index.tolist()
    torch.testing.assert_close(table.keyword_mass(), direct.keyword_mass(), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="need the tokenizer"):
        jetgraph.ngrams(prog, "E→U", keywords=["cat"])


def test_side_inputs_hold_no_cache() -> None:
    _, prog = captured("llama")
    assert not any(name.startswith("_") for name in vars(prog.side))
    first = prog.side.for_shape(2, 4, torch.device("cpu"))
    second = prog.side.for_shape(2, 4, torch.device("cpu"))
    assert all(first[k] is not second[k] and torch.equal(first[k], second[k]) for k in first)
