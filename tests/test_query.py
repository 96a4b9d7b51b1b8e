"""One query, one reader: ``NgramQuery``/``RunOptions`` as the tables' arguments, ``FirstTokens``
for the mixture, ``PathReader`` against the plain schedule and hand-made mixtures, and the 0.7
keywords kept for one release with a warning."""

from __future__ import annotations

import pytest
import torch

import jetgraph
from jetgraph import FirstTokens, NgramQuery, PathReader, RunOptions
from jetgraph.applications.ngrams import ngram_plan, ngram_table
from jetgraph.applications.ngrams.evaluator import evaluate_path, path_schedule
from jetgraph.applications.roles import path_logits
from tests.conftest import captured


def plain(prog, path: str, contexts: torch.Tensor) -> torch.Tensor:
    """Last-position logits from the plain schedule (no shortcut), float64."""
    schedule = path_schedule(prog.at("sublayer"), jetgraph.path_term(prog, path))
    return evaluate_path(schedule, contexts).double()


def test_a_plan_and_its_table_take_the_same_query() -> None:
    _, prog = captured("llama")
    query = NgramQuery("E→attn0→U", sources=range(3), top=7, rank="prob")
    run = RunOptions(chunk=50, progress=False, shard=None)
    plan = ngram_plan(prog, query, run)
    table = ngram_table(prog, query, run)
    assert plan.items == len(table.contexts) == 3 * 128
    assert len(table.top_values) == 7 and table.rank == "prob"
    log_p = plain(prog, "E→attn0→U", table.contexts.tensor()).log_softmax(-1)
    torch.testing.assert_close(table.top_values.double(), log_p.flatten().topk(7).values, rtol=0, atol=2e-5)


def test_an_unknown_or_misplaced_option_is_refused_by_name() -> None:
    _, prog = captured("llama")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['source'\]"):
        ngram_table(prog, "E→U", source=[1, 2])
    with pytest.raises(TypeError, match=r"\['top'\] beside an NgramQuery"):
        ngram_table(prog, NgramQuery("E→U"), top=3)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['firsts'\]"):
        jetgraph.ngrams(prog, "E→U", firsts=3)
    with pytest.raises(ValueError, match="top must be an int >= 1"):
        NgramQuery("E→U", top=0)
    with pytest.raises(ValueError, match="chunk must be an int >= 1"):
        RunOptions(chunk=0)
    with pytest.raises(TypeError, match="first_tokens must be a FirstTokens"):
        NgramQuery("h_last→U", first_tokens=([1], [1.0]))  # type: ignore[arg-type]


def test_first_tokens_are_checked_when_made() -> None:
    assert FirstTokens.of([3, 4]).weights == (0.5, 0.5)
    assert FirstTokens.of(torch.tensor([[1, 2], [1, 5]]), [0.25, 0.75]).ids == ((1, 2), (1, 5))
    with pytest.raises(ValueError, match="all of one length"):
        FirstTokens(((1,), (2, 3)))
    with pytest.raises(ValueError, match="sum to 1"):
        FirstTokens.of([1, 2], [0.5, 0.6])
    with pytest.raises(ValueError, match="one weight per sequence"):
        FirstTokens.of([1, 2], [1.0])


def test_the_renamed_keywords_still_work_with_a_warning() -> None:
    _, prog = captured("llama")
    new = ngram_table(prog, "h_last→U", sources=[3, 9], first_tokens=FirstTokens.of([[5], [6]], [0.3, 0.7]),
                      top=5, progress=False, shard=None)
    with pytest.warns(DeprecationWarning, match=r"first=…\) is deprecated.*use sources="):
        with pytest.warns(DeprecationWarning, match=r"average=…\) is deprecated.*use first_tokens="):
            old = ngram_table(prog, "h_last→U", first=[3, 9], average=([[5], [6]], [0.3, 0.7]), top=5,
                              progress=False, shard=None)
    assert old.top_index.tolist() == new.top_index.tolist()
    torch.testing.assert_close(old.top_values, new.top_values, rtol=0, atol=0)
    with pytest.warns(DeprecationWarning, match="NgramTable.average is deprecated"):
        assert new.average == ([[5], [6]], [0.3, 0.7])
    with pytest.warns(DeprecationWarning, match=r"ngrams\(first=…\)"):
        jetgraph.ngrams(prog, "E→U", first=range(2), top=3, progress=False)
    with pytest.raises(TypeError, match="both first= and sources="):
        ngram_table(prog, "E→U", first=[1], sources=[1])


def test_the_path_reader_equals_the_plain_schedule_and_hand_mixtures() -> None:
    _, prog = captured("llama")
    pairs = torch.tensor([[a, b] for a in (0, 5, 5, 77) for b in (1, 2, 64)])
    reader = PathReader(prog, "E→attn0→mlp0→U")
    assert reader.evaluator(2).modes[-1] == "last"  # the decoder on the last position only
    torch.testing.assert_close(reader.logits(pairs).double(), plain(prog, "E→attn0→mlp0→U", pairs),
                               rtol=1e-5, atol=1e-5)
    first = FirstTokens.of([[7], [11], [13]], [0.2, 0.3, 0.5])
    mixed = PathReader(prog, "h_last→U", first)
    rows = torch.tensor([[4], [9], [100]])
    after = [plain(prog, "h_last→U", torch.cat([torch.full((3, 1), a), rows], 1)) for a in (7, 11, 13)]
    weights = [0.2, 0.3, 0.5]
    expected = sum(w * a.softmax(-1) for w, a in zip(weights, after, strict=True)).log()
    torch.testing.assert_close(mixed.log_probs(rows), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed.logits(rows).double(), expected, rtol=1e-5, atol=1e-5)
    by_logits = sum(w * a for w, a in zip(weights, after, strict=True))
    torch.testing.assert_close(mixed.mean_logits(rows), by_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(path_logits(prog, "h_last→U", rows, first), by_logits, rtol=1e-5, atol=1e-5)


def test_the_path_reader_refuses_bad_contexts_before_work() -> None:
    _, prog = captured("llama")
    reader = PathReader(prog, "E→attn0→U")
    with pytest.raises(ValueError, match=r"needs contexts of shape \[rows, 2\]"):
        reader.logits(torch.tensor([[1], [2]]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 128\)"):
        reader.logits(torch.tensor([[1, 128]]))
    with pytest.raises(ValueError, match="first_tokens applies to paths from the model's stream"):
        PathReader(prog, "E→U", FirstTokens.of([1]))


def test_a_program_and_its_compiled_readers_are_freed_together() -> None:
    import gc
    import weakref

    from jetgraph.applications.ngrams import full_table
    from jetgraph.capture.zoo import tiny_model

    prog = jetgraph.capture(tiny_model("llama"))  # the default view: a reader refers to it
    full_table(prog, "E→attn0→U", contexts=torch.tensor([[1, 2]]))
    full_table(prog, "E→attn0→U", contexts=torch.tensor([[3, 4]]))
    assert len(prog.memo["path readers"]) == 1  # compiled once, read twice
    assert prog.at("block").memo == {}  # a view starts with its own
    alive = weakref.ref(prog)
    del prog
    gc.collect()
    assert alive() is None
