"""Algorithm 2 (expand_paths) at order 0: enumeration, filters, counts, bigram paths at scale."""

from __future__ import annotations

import networkx as nx
import pytest
import sympy as sp
import torch

import jetgraph
from jetgraph.capture.zoo import PARALLEL_FAMILIES
from jetgraph.passes.paths import closed_form, count_paths, expand_paths, nested_paths
from tests.conftest import captured, random_ids, require_smollm2


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox", "phi", "residual_mlp"])
@pytest.mark.parametrize("granularity", ["block", "sublayer"])
def test_enumeration_equals_closed_form_and_unit_graph(family: str, granularity: str) -> None:
    _, prog = captured(family)
    view = prog.at(granularity)
    paths = expand_paths(prog, granularity=granularity)
    sources = len(prog.encoder.addend_names)
    enumerated = sum(1 for _ in paths)
    assert paths.count() == enumerated == count_paths(prog, granularity)
    graph_paths = sum(1 for _ in nx.all_simple_paths(view.to_networkx(), "embed", "unembed"))
    assert enumerated == sources * graph_paths
    if family != "residual_mlp":
        form = closed_form(granularity, parallel=family in PARALLEL_FAMILIES)
        assert enumerated == sources * int(form.subs(sp.Symbol("L", integer=True, nonnegative=True), 2))


def test_unit_weighted_paths_of_a_linear_network_sum_to_the_logits() -> None:
    from tests.test_expand import LinearResidual

    torch.manual_seed(0)
    model = LinearResidual(layers=4).double()
    ids = random_ids(1, 3, vocab=11)
    prog = jetgraph.capture(model, ids)
    values = expand_paths(prog, weights="unit").expansion().evaluate(ids)
    assert len(values.terms) == 16
    assert values.remainder.abs().max().item() <= 1e-12


def test_attention_free_filter_gives_bigram_paths() -> None:
    _, prog = captured("llama")
    paths = expand_paths(prog, granularity="sublayer", exclude={"attn"}, max_length=1)
    names = [spec.name for spec in paths]
    assert names == ["embed.token→unembed", "embed.token→mlp0→unembed", "embed.token→mlp1→unembed"]
    values = paths.expansion().evaluate(random_ids(1, 6))
    # attention-free terms see one token only: a token's term does not depend on its neighbours
    ids = random_ids(1, 6)
    moved = ids.clone()
    moved[0, 0] = (moved[0, 0] + 1) % 128
    a = paths.expansion().evaluate(ids).terms
    b = paths.expansion().evaluate(moved).terms
    for name in a:
        torch.testing.assert_close(a[name][:, 1:], b[name][:, 1:], rtol=0, atol=0)
    assert set(values.terms) == set(names)


def test_shared_prefixes_are_one_term() -> None:
    _, prog = captured("residual_mlp")
    expansion = expand_paths(prog).expansion()
    graph = expansion.to_networkx()
    assert nx.is_directed_acyclic_graph(graph)
    # 8 logit terms over a prefix tree of 8 stream terms (1 source + 7 non-empty unit chains)
    stream_nodes = [n for n, d in graph.nodes(data=True) if d["space"] == "stream"]
    assert len(stream_nodes) == 8 and len(expansion.terms) == 8


def test_nested_path_counts() -> None:
    assert nested_paths(3, 1) == 2**3
    assert nested_paths([3, 2]) == 4**3  # 3 blocks of two sublayers: 3 paths through each γ
    assert nested_paths(3, 2) == (1 + (2**3 - 1)) ** 3
    assert nested_paths(2, 3) == (1 + (nested_paths(2, 2) - 1)) ** 2
    _, prog = captured("llama")  # the captured nesting agrees: blocks of attn and mlp
    assert nested_paths([len(prog.blocks), 2]) == count_paths(prog, "sublayer")
    with pytest.raises(ValueError):
        nested_paths(-1, 2)


def test_path_filter_errors() -> None:
    _, prog = captured("llama")
    with pytest.raises(ValueError, match="unknown units or kinds"):
        expand_paths(prog, exclude={"conv"})
    with pytest.raises(ValueError, match="max_length"):
        expand_paths(prog, max_length=-1)
    with pytest.raises(ValueError, match="order"):
        expand_paths(prog, order=-1)
    with pytest.raises(ValueError, match="select no unit"):
        expand_paths(prog, include={"attn"}, exclude={"attn"})
    with pytest.raises(ValueError, match="weights"):
        expand_paths(prog, weights="fit")


def test_smollm2_bigram_paths_without_materialising_two_to_the_sixty() -> None:
    require_smollm2()
    model, tokenizer = jetgraph.load_model("smollm2")
    ids = tokenizer("The capital of France is", return_tensors="pt", add_special_tokens=False).input_ids
    prog = jetgraph.capture(model, ids)
    assert count_paths(prog, "sublayer") == 4**30
    paths = expand_paths(prog, granularity="sublayer", exclude={"attn"}, max_length=2)
    assert paths.count() == 1 + 30 + 30 * 29 // 2
    values = paths.expansion().evaluate(ids)
    assert len(values.terms) == 466 and torch.isfinite(values.remainder).all()


@pytest.mark.parametrize("order", [0, 1, 2])
def test_split_counts_are_super_exponential_and_match_enumeration(order: int) -> None:
    from jetgraph.passes import expand, source_terms
    from jetgraph.passes.paths import split_term_counts

    _, prog = captured("residual_mlp")
    terms = source_terms(prog)
    counts = [len(terms)]
    for unit in range(len(prog.units)):
        terms = expand(prog, unit, terms, order=order, weights="unit", split=True).terms
        counts.append(len(terms))
    assert counts == split_term_counts(1, len(prog.units), order)
    assert split_term_counts(1, 3, 1) == [1, 2, 6, 42] and split_term_counts(1, 3, 2)[-1] == 296
    assert split_term_counts(1, 3, 0) == [1, 2, 4, 8]



@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
@pytest.mark.parametrize("order", [1, 2])
def test_higher_order_paths_count_and_reconstruct(family: str, order: int) -> None:
    _, prog = captured(family)
    for granularity in ("block", "sublayer"):
        paths = expand_paths(prog, order=order, granularity=granularity)
        form = closed_form(granularity, parallel=family in PARALLEL_FAMILIES, order=order)
        expected = int(form.subs(sp.Symbol("L", integer=True, nonnegative=True), 2))
        assert paths.count() == count_paths(prog, granularity, order) == expected
    from tests.taylor_oracles import TermOracle
    from tests.test_expand import FLOAT32_TOLERANCE, _assert_terms_match, _float64_program

    ids = random_ids(1, 4)
    expansion = expand_paths(prog, order=order, granularity="sublayer", max_length=1).expansion()
    values = expansion.evaluate(ids)
    oracle = TermOracle(_float64_program(family).at("sublayer"), ids)  # nested float64 jvp per term
    _assert_terms_match(values.terms, {t.name: oracle.value(t) for t in expansion.terms},
                        FLOAT32_TOLERANCE, f"{family} order {order}")
    names = list(values.terms)
    assert "embed.token→attn0^1→unembed" in names and f"embed.token→unembed^{order}" in names
