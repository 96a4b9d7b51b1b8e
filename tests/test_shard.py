"""Distributed n-gram tables: gloo ranks on the CPU, spawned as subprocesses like torchrun would.

Each test starts 2 or 3 ranks of tests/shard_worker.py and compares rank 0's merged table with
the single-process table computed here: every entry, every per-row result, equal exactly.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jetgraph.applications import ngram_table
from jetgraph.applications.ngrams.shard import chunk_share
from jetgraph.applications.ngrams.state import LastTokenTop, TopEntries, best_per_row
from tests.conftest import captured

WORKER = Path(__file__).with_name("shard_worker.py")
FIELDS = ("top_values", "top_logits", "top_index", "row_values", "row_index", "row_max", "log_sum",
          "keyword_logits", "last_values", "last_logits", "last_index")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(tmp_path: Path, world: int, spec: dict, timeout: float = 240.0
           ) -> list[subprocess.CompletedProcess]:
    """Run ``world`` ranks of the worker on ``spec``; every rank's completed process."""
    spec_file = tmp_path / f"spec-{world}-{len(list(tmp_path.glob('spec-*')))}.json"
    spec_file.write_text(json.dumps(spec))
    port = _free_port()
    processes = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(WORKER.parent)}
        processes.append(subprocess.Popen([sys.executable, str(WORKER), str(spec_file)], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for rank, process in enumerate(processes):
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            pytest.fail(f"rank {rank} of {world} hung for {timeout} s")
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results


def assert_same_table(saved: dict, table) -> None:
    for name in FIELDS:
        expected, got = getattr(table, name), saved[name]
        if expected is None:
            assert got is None, name
            continue
        assert got is not None and got.shape == expected.shape, name
        assert torch.equal(got, expected), f"{name} differs from the single-process table"


def _spec(tmp_path: Path, path: str, options: dict, **extra) -> dict:
    return {"family": "llama", "path": path, "options": options, "out": str(tmp_path / "table.pt"), **extra}


ATTENTION_OPTIONS = {"top": 40, "chunk": 512, "rank": "prob", "last_top": 3, "row_top": 2,
                     "stall_seconds": 20.0, "checkpoint_seconds": 0.0}


def test_two_ranks_give_the_single_process_table_for_an_attention_free_path(tmp_path) -> None:
    options = {"top": 30, "chunk": 16, "row_top": 3, "keywords": [3, 5, 60], "rank": "logit", "last_top": 2}
    results = launch(tmp_path, 2, _spec(tmp_path, "E→mlp0→U", options))
    assert [r.returncode for r in results] == [0, 0], results[0].stderr + results[1].stderr
    _, prog = captured("llama")
    single = ngram_table(prog, "E→mlp0→U", progress=False, shard=None, **options)
    assert_same_table(torch.load(tmp_path / "table.pt"), single)


def test_three_ranks_give_the_single_process_table_through_attention(tmp_path) -> None:
    results = launch(tmp_path, 3, _spec(tmp_path, "E→attn0→U", ATTENTION_OPTIONS))
    assert [r.returncode for r in results] == [0, 0, 0], "".join(r.stderr for r in results)
    _, prog = captured("llama")
    single = ngram_table(prog, "E→attn0→U", progress=False, shard=None, **ATTENTION_OPTIONS)
    assert_same_table(torch.load(tmp_path / "table.pt"), single)
    assert single.last_values.shape == (128, 3)
    # the per-last-token summary is what the rows ending in that token hold
    full = single.row_max.shape[0]
    assert full == 128 * 128


def test_a_killed_rank_stops_the_others_and_the_run_resumes_with_another_world_size(tmp_path) -> None:
    checkpoint = tmp_path / "ckpt" / "table.pt"
    checkpoint.parent.mkdir()
    spec = _spec(tmp_path, "E→attn0→U", {**ATTENTION_OPTIONS, "stall_seconds": 5.0}, resume=str(checkpoint),
                 stop={"rank": 1, "after": 4, "how": "kill"})
    results = launch(tmp_path, 2, spec)
    assert results[1].returncode == -9
    assert results[0].returncode != 0
    assert "rank(s) 1 of 2 showed no progress" in results[0].stderr or "collective" in results[0].stderr
    files = sorted(p.name for p in checkpoint.parent.iterdir())
    assert files == ["table.pt", "table.rank1.pt"]  # atomic writes: no temporary file is left
    partial = torch.load(checkpoint.parent / "table.rank1.pt", weights_only=False)
    assert len(partial["done"]) == 4  # the chunks done before the kill, saved one by one

    spec.pop("stop")
    results = launch(tmp_path, 3, spec)
    assert [r.returncode for r in results] == [0, 0, 0], "".join(r.stderr for r in results)
    _, prog = captured("llama")
    single = ngram_table(prog, "E→attn0→U", progress=False, shard=None, **ATTENTION_OPTIONS)
    assert_same_table(torch.load(tmp_path / "table.pt"), single)
    # and once more in one process from the three ranks' checkpoints: nothing left to compute
    resumed = ngram_table(prog, "E→attn0→U", progress=False, shard=None, resume=checkpoint,
                          **ATTENTION_OPTIONS)
    assert torch.equal(resumed.top_index, single.top_index) and torch.equal(resumed.log_sum, single.log_sum)
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["table.pt"]


def test_a_failing_rank_gives_a_clear_error_on_every_rank(tmp_path) -> None:
    spec = _spec(tmp_path, "E→attn0→U", ATTENTION_OPTIONS, stop={"rank": 1, "after": 2, "how": "raise"})
    results = launch(tmp_path, 3, spec)
    assert all(r.returncode != 0 for r in results)
    assert "injected failure for the test" in results[1].stderr
    for rank in (0, 2):
        assert "rank 1 of 3 failed: RuntimeError: injected failure for the test" in results[rank].stderr


def test_a_rank_failing_before_its_first_chunk_stops_the_others(tmp_path) -> None:
    checkpoint = tmp_path / "table.pt"
    (tmp_path / "table.rank1.pt").write_text("not a checkpoint")  # rank 1 of 2 absorbs it
    results = launch(tmp_path, 2, _spec(tmp_path, "E→attn0→U", ATTENTION_OPTIONS, resume=str(checkpoint)))
    assert [r.returncode != 0 for r in results] == [True, True]
    assert "table.rank1.pt cannot be read" in results[1].stderr
    told = ("rank 1 of 2 failed", "collective for the chunks already done")
    assert any(message in results[0].stderr for message in told), results[0].stderr


def test_chunk_shares_cover_the_chunks_once() -> None:
    chunks = list(range(10))
    for world in (1, 3, 4, 11):
        shares = [chunk_share(chunks, r, world) for r in range(world)]
        assert [c for share in shares for c in share] == chunks
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_merging_is_idempotent_and_order_free() -> None:
    generator = torch.Generator().manual_seed(0)
    values = torch.randint(0, 5, (40,), generator=generator).float()  # many ties
    logits = torch.randint(0, 3, (40,), generator=generator).float()
    flat = torch.randperm(40, generator=generator)
    whole = TopEntries().merged([TopEntries(values, logits, flat)], 10)
    halves = [TopEntries(values[:25], logits[:25], flat[:25]),
              TopEntries(values[15:], logits[15:], flat[15:])]
    for parts in (halves, halves[::-1], halves + halves):
        merged = TopEntries().merged(parts, 10)
        assert torch.equal(merged.index, whole.index) and torch.equal(merged.values, whole.values)
    # per last token: the same entries merged twice, or from two states, give the same summary
    last = torch.tensor([0, 1, 0, 1, 0])
    v = torch.randn(5, 2, generator=generator)
    ix = torch.arange(10).reshape(5, 2)
    one = LastTokenTop.empty(2, 2)
    one.add(last, v, v, ix)
    two = LastTokenTop.empty(2, 2)
    two.add(last[:3], v[:3], v[:3], ix[:3])
    other = LastTokenTop.empty(2, 2)
    other.add(last[2:], v[2:], v[2:], ix[2:])
    merged = two.merged([other, other])
    assert torch.equal(merged.index, one.index) and torch.equal(merged.values, one.values)
    best = best_per_row(torch.tensor([[1.0, 1.0, 2.0]]), torch.tensor([[0.0, 0.0, 0.0]]),
                        torch.tensor([[7, 3, 9]]), 3)
    assert best[2].tolist() == [[9, 3, 7]]  # value, then logit, then the lower flat index


def test_a_distributed_environment_without_a_rendezvous_is_refused_in_one_line(monkeypatch) -> None:
    from jetgraph.applications.ngrams import ShardError, current_shard

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ShardError, match="needs MASTER_ADDR, MASTER_PORT in the environment: start it "
                                         "with torchrun"):
        current_shard()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert current_shard() is None


def test_the_plan_splits_its_time_over_ranks_and_prices_other_hardware() -> None:
    from jetgraph.applications import ngram_plan

    _, prog = captured("llama")
    one = ngram_plan(prog, "E→attn0→U")
    four = ngram_plan(prog, "E→attn0→U", ranks=4)
    assert four.items == one.items == 128 * 128
    assert four.flops == pytest.approx(one.flops / 4, rel=1e-6)
    assert four.seconds < one.seconds and "per rank of 4" in four.describe()
    assert one.seconds_at(1e12, 1e9) == pytest.approx(one.flops / 1e12 + one.elements / 1e9)
    with pytest.raises(ValueError, match="rates must be positive"):
        one.seconds_at(0, 1e9)


def test_per_row_results_are_sent_packed() -> None:
    """A collective pickles what it sends, and pickle writes a view's whole storage once per view:
    the per-chunk views of a pool must be packed first (else 32 GB for a 4.2 M-row table)."""
    import pickle

    from jetgraph.applications.ngrams.state import RowPool, TableState

    pool = RowPool(100 * 64, {"row_max": ((), torch.float32), "log_sum": ((), torch.float32)})
    state = TableState("key")
    for chunk in range(100):
        values = torch.full((64,), float(chunk))
        state.rows[chunk] = pool.put({"row_max": values, "log_sum": -values})
    packed = state.packed_rows()
    assert len(pickle.dumps(packed)) < 2 * 100 * 64 * 8 + 10_000
    assert len(pickle.dumps(state.rows)) > 50 * len(pickle.dumps(packed))  # what it used to send
    rows = TableState.unpacked_rows(*packed)
    assert rows.keys() == state.rows.keys()
    assert all(torch.equal(rows[c]["log_sum"], state.rows[c]["log_sum"]) for c in rows)
