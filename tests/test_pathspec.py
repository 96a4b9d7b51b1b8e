"""The path language: one parser and one printer, names bound to a view, kinds deciding attention."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

import jetgraph
from jetgraph.capture.zoo import ResidualMLP, tiny_model
from jetgraph.passes import Expansion, PathSpec, context_tokens, parse_path, path_term
from jetgraph.passes.paths import bind_path
from jetgraph.passes.pathspec import check_unit_names, reads_context
from tests.conftest import captured, random_ids


def test_every_printed_path_parses_back_to_the_same_term() -> None:
    """For every path of an order-1 expansion, the printed name read back by the parser and
    bound to the model computes the same tensor as the term it was printed from."""
    _, prog = captured("llama")
    view = prog.at("sublayer")
    ids = random_ids(2, 5, seed=3)
    paths = jetgraph.expand_paths(view, order=1, max_length=2)
    terms = list(paths.terms())
    assert len(terms) == paths.count()
    rebuilt = [path_term(view, term.name, order=1) for term in terms]
    assert [t.name for t in rebuilt] == [t.name for t in terms]
    original = Expansion(view, len(view.units), terms, 1).evaluate(ids)
    again = Expansion(view, len(view.units), rebuilt, 1).evaluate(ids)
    for name, value in original.terms.items():
        torch.testing.assert_close(again.terms[name], value, rtol=0, atol=0)
    for spec in paths:  # the enumerated specs print the terms' names
        assert parse_path(spec.name) == spec


def test_aliases_name_the_same_path() -> None:
    _, prog = captured("gpt2")
    view = prog.at("sublayer")
    canonical = "embed.token→mlp1^1→unembed"
    for text in ("E→mlp1^1→U", "e -> mlp1^1 -> u", "embed→MLP_last^1→unembed", canonical):
        assert path_term(prog, text).name == canonical
    assert path_term(prog, "E→ATTN_last→U").name == f"embed.token→{view.units[-2].name}→unembed"
    assert parse_path("E→mlp1^1→U") == PathSpec("embed.token", ("mlp1",), (1, 0))
    assert str(PathSpec("h2", ("mlp1",), (0, 2))) == "h2→mlp1→unembed^2"
    assert path_term(prog, "embed.position→attn1→U").name == "embed.position→attn1→unembed"
    assert path_term(prog, "h2→mlp1→U").name == "h2→mlp1→unembed"


@pytest.mark.parametrize(("text", "message"), [
    ("E", "needs at least a source and the decoder"),
    ("E→→U", "has an empty step"),
    ("E→mlp0", "must end at U"),
    ("U→mlp0→U", "starts at the decoder"),
    ("E^1→U", "takes no Taylor order"),
    ("E→mlp0^x→U", r"takes the order as \^j"),
    ("E→mlp0^30→U", "above the highest supported order 18"),
    ("E→U→mlp0→U", "can only be the first"),
    ("x→mlp0→U", "sources are E"),
])
def test_syntax_errors_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_path(text)


def test_names_are_checked_against_the_model() -> None:
    _, prog = captured("llama")
    with pytest.raises(ValueError, match="unknown unit 'mlp9'"):
        path_term(prog, "E→mlp9→U")
    with pytest.raises(ValueError, match="model order"):
        path_term(prog, "E→mlp1→mlp0→U")
    with pytest.raises(ValueError, match="model order"):
        path_term(prog, "h3→mlp0→U")  # mlp0 reads h1, before the source state
    with pytest.raises(ValueError, match="sources are"):
        path_term(prog, "embed.segment→U")


def test_parallel_branches_are_not_one_path() -> None:
    """In a parallel block both branches read the same stream: no path passes both."""
    _, prog = captured("gpt_neox")
    with pytest.raises(ValueError, match="model order"):
        path_term(prog, "E→attn0→mlp0→U")
    assert path_term(prog, "E→attn0→mlp1→U").name == "embed.token→attn0→mlp1→unembed"


def test_block_names_bind_in_the_block_view_and_kinds_decide_attention() -> None:
    _, prog = captured("llama")
    term = path_term(prog, "E→block1→U")
    assert [u.name for u in term.units()] == ["block1", "unembed"]
    assert term.units()[0] in prog.at("block").units and context_tokens(term) == 2
    assert context_tokens(path_term(prog, "E→mlp0→U")) == 1
    mlp_only = jetgraph.capture(ResidualMLP(layers=2), torch.randint(0, 50, (1, 4)))
    assert context_tokens(path_term(mlp_only, "E→block1→U")) == 1  # a block without attention


def test_renamed_units_keep_their_kind() -> None:
    """Attention is the unit's kind (found by perturbing a position), not its name."""
    prog = jetgraph.capture(tiny_model("llama"))
    unit = prog.at("sublayer").units[0]
    assert unit.kind == "attn"
    block = prog.blocks[0]
    mixer = dataclasses.replace(unit, name="mixer0")  # units are immutable: a renamed copy
    renamed = dataclasses.replace(block, children=(mixer, *block.children[1:]))
    prog = prog.replace(blocks=(renamed, *prog.blocks[1:]))
    term = path_term(prog, "E→mixer0→U")
    assert context_tokens(term) == 2
    table = jetgraph.ngrams(prog, "E→mixer0→U", sources=range(2), top=3, progress=False)
    assert table.contexts.length == 2


def test_checks_before_loading_read_names_only() -> None:
    check_unit_names("E→attn3→mlp3_2→MLP_last→U", layers=4)
    with pytest.raises(ValueError, match="the model has 4 layers"):
        check_unit_names("E→mlp4→U", layers=4)
    with pytest.raises(ValueError, match="unknown unit 'mixer'"):
        check_unit_names("E→mixer→U", layers=4)
    assert reads_context("E→attn0→U") is True and reads_context("E→ATTN_last→U") is True
    assert reads_context("E→mlp0→MLP_last→U") is False
    assert reads_context("E→block0→U") is None  # a block's kind is known only after capture
    assert parse_path("E→mlp_LAST→U").name == "embed.token→MLP_last→unembed"


def test_expand_paths_takes_explicit_paths() -> None:
    _, prog = captured("gpt2")
    view = prog.at("sublayer")
    specs = ["E→U", "E→mlp0^1→U", "embed.position→attn1→U"]
    paths = jetgraph.expand_paths(view, order=1, paths=specs)
    expansion = paths.expansion()
    assert [t.name for t in expansion.terms] == ["embed.token→unembed", "embed.token→mlp0^1→unembed",
                                                 "embed.position→attn1→unembed"]
    assert paths.count() == 3
    with pytest.raises(ValueError, match="not both"):
        jetgraph.expand_paths(view, paths=specs, exclude={"attn"})
    blocks = prog.at("block")  # names bind in the view that holds them, as for path_term
    assert jetgraph.expand_paths(blocks, paths=["E→mlp1→U", "E→U"]).prog.granularity == "sublayer"
    assert jetgraph.expand_paths(view, paths=["E→block1→U"]).prog.granularity == "block"
    with pytest.raises(ValueError, match="both views"):
        jetgraph.expand_paths(view, paths=["E→block1→U", "E→mlp0→U"])
    with pytest.raises(ValueError, match="give order >= 1"):
        jetgraph.expand_paths(view, paths=["E→mlp0^1→U"])


def test_h_last_is_the_model_itself_on_any_context() -> None:
    """``h_last→U`` binds to the stream after the last unit, reads contexts of any length, and
    its table is the model's own last-position logits (the transformers model, run directly)."""
    from jetgraph.applications import full_table
    from jetgraph.passes.paths import path_term, starts_at_model_state

    model, prog = captured("gpt2")
    view = prog.at("sublayer")
    assert bind_path(view, "h_last→U").source == f"h{len(view.units)}"
    assert parse_path("H_LAST->U").source == "h_last"
    assert starts_at_model_state("h_last→U") and starts_at_model_state("h2→U")
    assert not starts_at_model_state("E→mlp0→U") and not starts_at_model_state("h0→U")
    assert starts_at_model_state(path_term(prog, "h_last→U"))
    assert not starts_at_model_state(path_term(prog, "E→U"))
    for length in (1, 3):
        rows = random_ids(5, length, seed=length)
        with torch.no_grad():
            expected = model(input_ids=rows).logits[:, -1]
        assert torch.allclose(full_table(prog, "h_last→U", contexts=rows), expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"needs contexts of shape \[rows, 1\]"):
        full_table(prog, "E→U", contexts=random_ids(5, 3))
    with pytest.raises(ValueError, match="hN \\(a stream state\\) or h_last"):
        parse_path("hlast→U")


def test_a_command_parses_each_path_text_once(monkeypatch, tmp_path, capsys) -> None:
    """``jetgraph ngrams`` checks its paths before loading, plans them, binds and sweeps them: the
    parser itself runs once per distinct path text (one immutable PathSpec is shared)."""
    from jetgraph.cli import main
    from jetgraph.passes import pathspec
    from tests.conftest import require_tinystories

    model = str(require_tinystories())
    parsed: list[str] = []
    original = pathspec._parse_text.__wrapped__

    def counting(text: str) -> PathSpec:
        parsed.append(text)
        return original(text)

    monkeypatch.setattr(pathspec, "_parse_text", functools.lru_cache(maxsize=1024)(counting))
    paths = ["E→U", "E→MLP_last→U"]
    assert main(["ngrams", model, "--paths", *paths, "--id-range", "0:64", "--top", "5",
                 "--out", str(tmp_path / "t.csv")]) == 0
    capsys.readouterr()
    assert sorted(parsed) == sorted(paths), parsed


def test_one_name_for_one_question_before_and_after_capture() -> None:
    from jetgraph.passes import context_length, context_tokens, starts_at_model_state

    _, prog = captured("llama")
    for text, tokens, from_state in (("E→U", 1, False), ("E→attn0→U", 2, False), ("h_last→U", 1, True),
                                     ("h2→mlp1→U", 1, True), ("E→block0→U", None, False)):
        spec = parse_path(text)
        assert (context_tokens(text), context_tokens(spec)) == (tokens, tokens), text
        assert starts_at_model_state(text) == starts_at_model_state(spec) == from_state, text
        term = path_term(prog, spec)
        assert starts_at_model_state(term) == from_state, text
        assert context_tokens(term) == (tokens or 2), text  # a block of this model holds attention
    with pytest.warns(DeprecationWarning, match="use context_tokens"):
        assert context_length(path_term(prog, "E→attn0→U")) == 2
