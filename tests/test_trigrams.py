"""Pair tables (paths through attention): the fast evaluator against the plain schedule, and the
per-last-token summary against the full table computed independently."""

from __future__ import annotations

import warnings

import pytest
import torch

import jetgraph
from jetgraph.applications import ngram_table
from jetgraph.applications.ngrams import evaluator as evaluator_module
from jetgraph.applications.ngrams.evaluator import evaluate_path, path_schedule
from jetgraph.applications.ngrams.query import NgramQuery
from jetgraph.codegen import modes as modes_module
from jetgraph.codegen.positions import Groups
from tests.conftest import captured, require_tinystories


def plain_table(prog, path: str, contexts: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """The path's logits on ``contexts`` from the plain schedule (every step on every position, no
    shortcut): the reference the sweep and :class:`PathReader` are held to."""
    term = jetgraph.path_term(prog, path)
    view = prog.at("sublayer")
    schedule = path_schedule(view, term)
    return torch.cat([evaluate_path(schedule, contexts[i:i + chunk]) for i in range(0, len(contexts), chunk)])


def _evaluator(prog, path: str, first=range(5)):
    job = NgramQuery(path, sources=first, top=10).bind(prog, 64)
    evaluator = job.evaluator()
    evaluator.verify(job.probe())
    return job, evaluator


@pytest.mark.parametrize("path, shared, split", [("E→attn0→U", 0, "attn0"), ("E→attn0→mlp0→U", 0, "attn0"),
                                                  ("E→mlp0→attn1→U", 2, "attn1"),
                                                  ("E→attn0→attn1→U", 0, "attn1")])
def test_the_fast_evaluator_equals_the_plain_schedule(path: str, shared: int, split: str) -> None:
    _, prog = captured("llama")
    job, evaluator = _evaluator(prog, path)
    assert evaluator.last_position_only and evaluator.shared_steps == shared
    assert evaluator.split_steps == [split]  # attn0 in E→attn0→attn1→U is read at every position
    ids = job.contexts.rows(0, 300)
    plain = evaluate_path(evaluator.schedule, ids)
    torch.testing.assert_close(evaluator(ids), plain, rtol=1e-5, atol=1e-5)
    # per context, the decoder runs on one position of two (and a shared prefix not at all)
    width, vocab = prog.decoder.unembedding.shape[1], prog.decoder.unembedding.shape[0]
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        evaluate_path(evaluator.schedule, ids[:1])
    per_row = (evaluator.flops(1000) - evaluator.flops(0)) / 1000
    assert per_row <= counter.get_total_flops() - 2 * width * vocab + 1


def test_the_first_token_is_projected_once_per_row() -> None:
    _, prog = captured("llama")
    _, evaluator = _evaluator(prog, "E→attn0→U")
    rows, groups = 1000, 8
    shared = evaluator.flops(rows, groups)
    unshared = evaluator.flops(rows)
    evaluator.modes = evaluator._choose_modes(split=False)
    whole = evaluator.flops(rows)
    assert shared < unshared < whole + 1
    # every context past a row's first saves the first position's q, k, v and o projections
    attn = prog.at("sublayer").units[0]
    projections = sum(2 * p.numel() for p in attn.graph_module.parameters() if p.dim() == 2)
    assert whole - shared >= (rows - groups) * projections


def test_a_group_that_is_not_one_falls_back_to_the_whole_unit(monkeypatch) -> None:
    _, prog = captured("llama")
    job, evaluator = _evaluator(prog, "E→attn0→mlp0→U")
    ids = job.contexts.rows(100, 400)  # crosses a row: two first tokens
    plain = evaluate_path(evaluator.schedule, ids)
    wrong = Groups(torch.zeros(1, dtype=torch.long), torch.zeros(len(ids), dtype=torch.long))
    monkeypatch.setattr(Groups, "of", classmethod(lambda cls, ids, copies=1: wrong))
    monkeypatch.setattr(modes_module, "_TOLD", set())
    told = "attn0 ran on every position.*differ at earlier"
    with pytest.warns(modes_module.ShortcutFallback, match=told):
        torch.testing.assert_close(evaluator(ids), plain, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per path and reason, not per chunk
        evaluator(ids)


def test_gpt2_position_embeddings_stay_right_in_the_shared_prefix() -> None:
    _, prog = captured("gpt2")  # absolute position embeddings: position 0 and 1 differ
    job, evaluator = _evaluator(prog, "E→mlp0→attn1→U")
    assert evaluator.shared_steps >= 2
    ids = job.contexts.rows(0, 200)
    torch.testing.assert_close(evaluator(ids), evaluate_path(evaluator.schedule, ids), rtol=1e-5, atol=1e-5)


def test_a_failed_probe_falls_back_to_the_plain_schedule(monkeypatch) -> None:
    _, prog = captured("llama")
    monkeypatch.setattr(evaluator_module, "PROBE_TOLERANCE", {torch.float32: -1.0})
    monkeypatch.setattr(modes_module, "_TOLD", set())
    with pytest.warns(modes_module.ShortcutFallback) as told:
        _, evaluator = _evaluator(prog, "E→mlp0→attn1→U")
    assert not evaluator.last_position_only and evaluator.shared_steps == 0
    reasons = [str(w.message) for w in told]
    assert any("every step runs on every position" in r and "differ from the plain schedule" in r
               for r in reasons), reasons


def test_the_per_last_token_summary_is_the_best_of_the_rows_ending_in_each_token() -> None:
    _, prog = captured("llama")
    first = range(0, 128, 3)
    table = ngram_table(prog, "E→attn0→U", sources=first, top=50, last_top=4, rank="prob", chunk=100,
                        progress=False, shard=None)
    contexts = torch.tensor([[a, b] for a in first for b in range(128)])
    logits = plain_table(prog, "E→attn0→U", contexts).double()  # the plain schedule, no shortcut
    log_p = logits.log_softmax(-1)
    for token in (0, 17, 127):
        rows = (contexts[:, 1] == token).nonzero().squeeze(1)
        values = log_p[rows]
        best = values.reshape(-1).topk(4)
        expected_flat = [int(rows[i // 128]) * 128 + i % 128 for i in best.indices.tolist()]
        assert table.last_index[token].tolist() == expected_flat
        torch.testing.assert_close(table.last_values[token].double(), best.values, rtol=0, atol=2e-5)
        entries = table.last_entries(token)
        assert [int(e["context_ids"].split()[1]) for e in entries] == [token] * 4
    # the global top-k is the table's own, from the same independent computation
    flat = log_p.reshape(-1).topk(50).indices
    assert set(table.top_index.tolist()) == set(flat.tolist())


def test_tinystories_trigrams_match_the_full_table() -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(require_tinystories())
    prog = jetgraph.capture(model)
    first = [1, 2, 400]
    for path in ("E→attn0→U", "E→attn0→mlp0→U"):
        table = ngram_table(prog, path, sources=first, top=30, rank="logit", chunk=1024, progress=False,
                            shard=None)
        logits = plain_table(prog, path, torch.tensor([[a, b] for a in first for b in range(2048)]))
        best = logits.reshape(-1).topk(30)
        assert table.top_index.tolist() == best.indices.tolist()
        torch.testing.assert_close(table.top_values, best.values, rtol=1e-6, atol=1e-5)


def test_last_top_is_validated_and_rows_ending_in_a_token_can_be_read() -> None:
    _, prog = captured("llama")
    with pytest.raises(ValueError, match="last_top must be an int >= 0"):
        ngram_table(prog, "E→attn0→U", last_top=-1, progress=False, shard=None)
    table = ngram_table(prog, "E→U", top=5, progress=False, shard=None)
    with pytest.raises(ValueError, match="without per-last-token summaries"):
        table.last_entries(3)


def test_per_row_results_do_not_fragment_the_heap() -> None:
    """Per-row results live in one preallocated buffer: keeping small tensors per chunk between
    the chunks' 8 MB logits made RSS grow by about a chunk per chunk (880 MB over these 128).
    Measured in a fresh interpreter, where the heap starts as a user's does."""
    import subprocess
    import sys

    script = f"""
import psutil, jetgraph
from jetgraph.applications import ngram_table
from transformers import AutoModelForCausalLM
prog = jetgraph.capture(AutoModelForCausalLM.from_pretrained({str(require_tinystories())!r}))
ngram_table(prog, "E→attn0→U", sources=range(4), rank="prob", progress=False, shard=None)
before = psutil.Process().memory_info().rss
table = ngram_table(prog, "E→attn0→U", sources=range(64), rank="prob", progress=False, shard=None)
assert table.log_sum.shape == (64 * 2048,)
print(psutil.Process().memory_info().rss - before)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    grown = int(done.stdout.split()[-1])
    assert grown < 200e6, f"RSS grew {grown / 1e6:.0f} MB over a 131k-context table"
