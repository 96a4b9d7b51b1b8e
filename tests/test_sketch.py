"""The jet n-gram LM: probabilities that sum to 1, its back-offs and count baselines against hand
computations, tables against the transformers model itself, sparse rows against dense ones (K = V)
and on a vocabulary too large for dense tables, and `jetgraph sketch` end to end."""

from __future__ import annotations

import csv
import math

import pytest
import torch

import jetgraph
from jetgraph.applications.groundtruth import TinyConfig, tiny_gpt2
from jetgraph.applications.sketch import (
    CountLM,
    SketchLM,
    SparseRows,
    Windows,
    perplexity,
    plan_sketch,
    read_sketch,
    split_stream,
)
from jetgraph.applications.sketch.tables import _sweep
from jetgraph.cli import main
from jetgraph.errors import CostError


def _sparse(full: torch.Tensor, top: int) -> SparseRows:
    """Each row's ``top`` tokens (ascending ids) and their probabilities, as the sweep keeps them."""
    prob, index = full.topk(top, -1)
    index, order = index.sort(-1)
    return SparseRows(index.int(), prob.gather(-1, order))


def _toy_lm(trigram: bool = True, bigram_top: int = 4) -> SketchLM:
    """A 4-token LM with random tables: bigram rows keeping ``bigram_top`` tokens (4: dense), and
    trigram rows keeping 2 tokens each."""
    generator = torch.Generator().manual_seed(0)
    vocab = 4
    bigram = torch.rand(vocab, vocab, generator=generator).double().softmax(-1)
    unigram = bigram.mean(0)
    rows = None
    if trigram:
        rows = _sparse(torch.rand(vocab * vocab, vocab, generator=generator).softmax(-1), 2)
    weights = (0.5, 0.3, 0.2) if trigram else (0.0, 0.7, 0.3)
    return SketchLM(unigram, _sparse(bigram, bigram_top), rows, weights)


def _p2_by_hand(lm: SketchLM, b: int) -> list[float]:
    """p₂(· | b) by the formula: kept q_b(c), else r_b · u(c) / Σ_{j not kept} u(j)."""
    kept = dict(zip(lm.bigram.index[b].tolist(), lm.bigram.prob[b].double().tolist(), strict=True))
    u = lm.unigram.double().tolist()
    rest = 1 - sum(kept.values())
    left = sum(u[j] for j in range(lm.vocab) if j not in kept)
    return [kept[c] if c in kept else rest * u[c] / left for c in range(lm.vocab)]


@pytest.mark.parametrize(("trigram", "bigram_top"), [(True, 4), (False, 4), (True, 2), (False, 1)])
def test_distributions_sum_to_one(trigram: bool, bigram_top: int) -> None:
    lm = _toy_lm(trigram, bigram_top)
    for history in ([0], [3], [1, 2], [2, 2], [0, 1, 3]):
        p = lm.distribution(history)
        assert p.min() > 0
        assert float(p.sum()) == pytest.approx(1.0, abs=1e-12), history
    for b in range(lm.vocab):  # the bigram rows alone
        row = lm.bigram_probs(torch.full((lm.vocab,), b), torch.arange(lm.vocab))
        assert float(row.sum()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("bigram_top", [4, 2])
def test_backoffs_by_hand(bigram_top: int) -> None:
    lm = _toy_lm(bigram_top=bigram_top)
    a, b = 1, 2
    row = a * lm.vocab + b
    kept = dict(zip(lm.trigram.index[row].tolist(), lm.trigram.prob[row].double().tolist(), strict=True))
    bigram = _p2_by_hand(lm, b)
    assert lm.bigram_probs(torch.full((4,), b), torch.arange(4)).tolist() == pytest.approx(bigram, abs=1e-15)
    rest = 1 - sum(kept.values())
    covered = sum(bigram[j] for j in kept)
    l3, l2, l1 = lm.weights
    for c in range(lm.vocab):
        p3 = kept[c] if c in kept else rest * bigram[c] / (1 - covered)
        expected = l3 * p3 + l2 * bigram[c] + l1 * lm.unigram[c].item()
        assert lm.distribution([a, b])[c].item() == pytest.approx(expected, abs=1e-12)


def test_count_lm_by_hand_and_weight_fit() -> None:
    text = Windows.of(torch.tensor([0, 1, 0, 1, 2, 0, 1]))
    counts = CountLM.train(text, 3)
    assert counts.unigram.tolist() == pytest.approx([4 / 10, 4 / 10, 2 / 10])  # add-one over 7 tokens
    windows = Windows.of(torch.tensor([[0, 1, 2]]))
    parts = counts.parts(windows.ids)
    w = 0.6
    expected = [w * 3 / 3 + (1 - w) * 0.4, w * 1 / 2 + (1 - w) * 0.2]  # p(1|0) = 3/3, p(2|1) = 1/2
    assert counts.bigram_probs(parts, w)[0].tolist() == pytest.approx(expected)
    best = counts.fit(windows, step=0.05)
    grid = [i * 0.05 for i in range(20)]
    brute = max(grid, key=lambda x: sum(math.log(v) for v in counts.bigram_probs(parts, x)[0].tolist()))
    assert best == pytest.approx(brute)


def test_sketch_weight_fit_is_the_grid_optimum() -> None:
    lm = _toy_lm()
    dev = Windows.of(torch.tensor([[0, 1, 2, 3, 1, 2, 0, 0, 3]]))
    weights = lm.fit_weights(dev, step=0.25)
    parts = lm.parts(dev.ids)
    grid = [(i / 4, j / 4, 1 - i / 4 - j / 4) for i in range(5) for j in range(5)
            if 1 - i / 4 - j / 4 >= 0.25 - 1e-9]
    best = max(grid, key=lambda w: float(lm.mix(parts, w).log().sum()))
    assert weights == pytest.approx(best)


def test_split_stream_and_masks() -> None:
    train, dev, test = split_stream(torch.arange(100), window=4)
    assert train.ids.shape == (1, 80) and dev.ids.shape == (2, 4) and test.ids.shape == (2, 4)
    assert test.tokens == 6  # positions 1.. of each window
    with pytest.raises(ValueError, match="too few for windows of 50"):
        split_stream(torch.arange(100), window=50)
    masked = Windows(torch.tensor([[5, 6, 0]]), torch.tensor([[True, True, False]]))
    assert perplexity(torch.tensor([[0.5, 1e-30]]), masked) == pytest.approx(2.0)  # padding is not scored


def test_tables_match_the_model_itself() -> None:
    """The bigram table is the model's distribution after each token averaged over the first
    tokens it expects (weights: its mean one-token prediction), the trigram rows its top tokens
    on every pair: both against the transformers model run directly."""
    model = tiny_gpt2(TinyConfig(vocab=10, n_embd=16, n_layer=2, n_head=2, seq=16)).eval()
    prog = jetgraph.capture(model, torch.randint(0, 10, (1, 5)))
    plan = plan_sketch(prog, 3, "on", top=4, max_seconds=None, convention=())
    lm = read_sketch(prog, 3, plan, progress=False, convention=())
    tokens = torch.arange(10)
    with torch.no_grad():
        weights, first = model(input_ids=tokens.view(-1, 1)).logits[:, 0].double().softmax(-1).mean(0).topk(3)
        weights = weights / weights.sum()
        bigram = sum(w * model(input_ids=torch.stack([torch.full((10,), int(a)), tokens], 1)).logits[:, -1]
                     .double().softmax(-1) for w, a in zip(weights, first, strict=True))
        three = model(input_ids=torch.cartesian_prod(tokens, tokens)).logits[:, -1].softmax(-1)
    assert lm.first_tokens == first.tolist()
    assert lm.bigram.top == 10 and torch.equal(lm.bigram.index.long(), torch.arange(10).expand(10, -1))
    assert torch.allclose(lm.bigram.prob, bigram, atol=1e-6)  # default K = 128 ≥ V: the dense table
    top = _sparse(three, 4)
    assert torch.allclose(lm.trigram.prob, top.prob, atol=1e-5)
    assert torch.equal(lm.trigram.index, top.index)
    assert torch.allclose(lm.unigram, bigram.mean(0), atol=1e-6)
    assert float(lm.distribution([4, 7]).sum()) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(CostError, match="refusing the trigram table of 100 pairs"):
        plan_sketch(prog, 3, "on", max_seconds=1e-9, convention=())
    with pytest.raises(CostError, match=r"memory available \(lower bigram_top from 10"):
        plan_sketch(prog, 3, "off", max_seconds=None, convention=(), max_memory=1000)



class _Rows:
    """A stand-in read-out: rows of a fixed table of log-probabilities, optionally failing on one
    call (an interrupted sweep)."""

    vocab, chunk = 6, 4

    def __init__(self, table: torch.Tensor, fail_at: int | None = None) -> None:
        self.table, self.fail_at, self.calls = table, fail_at, 0

    def describe(self) -> str:
        return "rows of a fixed table"

    def __call__(self, contexts: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return self.table[contexts[:, 0]]


def test_sweep_keeps_top_rows_and_resumes(tmp_path) -> None:
    table = torch.randn(10, 6, generator=torch.Generator().manual_seed(1)).double().log_softmax(-1)

    def contexts(start: int, end: int) -> torch.Tensor:
        return torch.arange(start, end)[:, None]

    def sweep(reader: _Rows, top: int, checkpoint=None):
        return _sweep(reader, contexts, 10, top, torch.float64, columns=True, progress=False, desc="rows",
                      checkpoint=checkpoint)

    dense, columns = sweep(_Rows(table), 6)  # K = V: the dense table, exactly
    assert torch.equal(dense.prob, table.exp())
    assert torch.allclose(columns, table.exp().sum(0), rtol=0, atol=1e-15)
    whole, _ = sweep(_Rows(table), 3)
    assert torch.equal(whole.prob, table.exp().gather(1, whole.index.long()))
    assert torch.equal(whole.prob.sort(-1, descending=True).values, table.exp().topk(3, -1).values)
    assert bool((whole.index[:, 1:] > whole.index[:, :-1]).all())  # ascending ids
    checkpoint = tmp_path / "rows.ckpt"
    with pytest.raises(KeyboardInterrupt):
        sweep(_Rows(table, fail_at=3), 3, checkpoint)  # chunks of 4 rows: stops after 8
    again = _Rows(table)
    resumed, columns = sweep(again, 3, checkpoint)
    assert again.calls == 1  # only rows 8-9 were left
    assert torch.equal(resumed.index, whole.index) and torch.equal(resumed.prob, whole.prob)
    assert torch.allclose(columns, table.exp().sum(0), rtol=0, atol=1e-15)


@pytest.fixture(scope="module")
def tiny_text_model(tmp_path_factory):
    """A small GPT-2 trained a little on byte-level BPE text, saved with its tokenizer."""
    from jetgraph.applications.groundtruth import bpe_corpus, pydoc_text, train
    from jetgraph.applications.groundtruth.training import window_batches

    text, source = pydoc_text()
    text = text[:60_000]
    corpus = bpe_corpus(text, 300, source)
    model = tiny_gpt2(TinyConfig(vocab=corpus.vocab, n_embd=32, n_layer=1, n_head=2, seq=64))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(model, window_batches(corpus.train_ids, 16, 64, 0), 60, 1e-2)
    finally:
        torch.set_num_threads(threads)
    folder = tmp_path_factory.mktemp("pydoc-tiny")
    model.save_pretrained(folder)
    corpus.tokenizer.save_pretrained(folder)
    (folder / "corpus.txt").write_text(text)
    return folder


def test_sparse_tables_against_dense(tiny_text_model) -> None:
    """K = V gives the dense read-out (float64, ≤ 1e-12); a small K keeps O(V·K) entries, exact
    kept probabilities, rows summing to 1, and a perplexity close to the dense table's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jetgraph.applications.ngrams.readout import bigram_readout

    model = AutoModelForCausalLM.from_pretrained(tiny_text_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_text_model)
    prog = jetgraph.capture(model, torch.tensor([[1, 2, 3]]))
    vocab, top = 300, 8
    dense = bigram_readout(prog, 4, convention=()).exp()
    full = read_sketch(prog, 4, progress=False, convention=(), bigram_top=vocab)
    assert torch.equal(full.bigram.index.long(), torch.arange(vocab).expand(vocab, -1))
    assert float((full.bigram.prob - dense).abs().max()) <= 1e-12
    assert float((full.unigram - dense.mean(0)).abs().max()) <= 1e-12
    small = read_sketch(prog, 4, progress=False, convention=(), bigram_top=top)
    assert small.bigram.index.shape == small.bigram.prob.shape == (vocab, top)
    assert small.nbytes == vocab * 8 + vocab * top * (4 + 8)  # O(V·K): nothing of size V² is held
    assert float((small.bigram.prob - dense.gather(1, small.bigram.index.long())).abs().max()) <= 1e-12
    assert float((small.unigram - full.unigram).abs().max()) <= 1e-12
    tokens = torch.arange(vocab)
    rows = small.bigram_probs(tokens.repeat_interleave(vocab), tokens.repeat(vocab)).view(vocab, vocab)
    assert float((rows.sum(-1) - 1).abs().max()) <= 1e-12
    ids = torch.tensor(tokenizer((tiny_text_model / "corpus.txt").read_text())["input_ids"])
    test = split_stream(ids, 64)[2]
    scores = {lm.bigram.top: (perplexity(lm.mix(lm.parts(test.ids)), test),
                              perplexity(lm.parts(test.ids)["bigram"], test)) for lm in (small, full)}
    for sparse, exact in zip(scores[top], scores[vocab], strict=True):
        assert math.isfinite(sparse) and exact - 0.5 <= sparse <= 1.1 * exact, scores


def test_a_vocabulary_too_large_for_dense_tables() -> None:
    """V = 20,000 (a dense V×V float64 table: 3.2 GB, refused before): planned, read sparse,
    normalised, scored."""
    vocab = 20_000
    model = tiny_gpt2(TinyConfig(vocab=vocab, n_embd=16, n_layer=1, n_head=2, seq=16)).eval()
    prog = jetgraph.capture(model, torch.randint(0, vocab, (1, 5)))
    plan = plan_sketch(prog, None, "auto", max_seconds=600, convention=(0,), bigram_top=32)
    assert not plan.trigram and "skipped" in plan.describe() and "20,000 tokens × top 32" in plan.describe()
    assert plan.bigram_bytes == vocab * (32 * 12 + 16) and plan.peak_bytes < 2e9
    lm = read_sketch(prog, None, plan, progress=False, convention=(0,))
    assert lm.bigram.index.shape == lm.bigram.prob.shape == (vocab, 32) and not lm.has_trigram
    assert lm.nbytes <= plan.bigram_bytes
    assert float(lm.distribution([5]).sum()) == pytest.approx(1.0, abs=1e-12)
    windows = Windows.of(torch.randint(0, vocab, (4, 32), generator=torch.Generator().manual_seed(0)))
    score = perplexity(lm.mix(lm.parts(windows.ids)), windows)
    assert math.isfinite(score) and score > 1


def test_sketch_command_writes_tables_and_perplexities(tiny_text_model, tmp_path, capsys) -> None:
    out = tmp_path / "sketch"
    args = ["sketch", str(tiny_text_model), "--text", str(tiny_text_model / "corpus.txt"), "--length", "64",
            "--trigram", "on", "--trigram-top", "8", "--bigram-top", "32", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "jet sketch: trigram + bigram + unigram" in printed and "count bigram LM" in printed
    rows = {r["lm"]: float(r["perplexity"]) for r in csv.DictReader((out / "perplexities.csv").open())}
    assert rows["uniform"] == 300 and all(v > 1 for v in rows.values())
    assert rows["jet sketch: trigram + bigram + unigram"] < rows["uniform"]
    lm = SketchLM.load(out)
    assert lm.has_trigram and lm.trigram.index.shape == (300 * 300, 8)
    assert lm.bigram.index.shape == (300, 32) and lm.nbytes == 300 * 8 + 300 * 32 * 12 + 300**2 * 8 * 8
    assert len(lm.first_tokens) == 16 and sum(lm.weights) == pytest.approx(1.0)
    for history in ([5], [17, 40]):
        assert float(lm.distribution(history).sum()) == pytest.approx(1.0, abs=1e-9)
    assert not (out / "trigram.ckpt").exists() and not (out / "bigram.ckpt").exists()


def test_sketch_command_samples_and_plans(tiny_text_model, tmp_path, capsys) -> None:
    out = tmp_path / "sampled"
    assert main(["sketch", str(tiny_text_model), "--samples", "20", "--length", "32", "--trigram", "off",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sampled from the model itself" in printed and "skipped: --trigram off" in printed
    assert main(["sketch", str(tiny_text_model), "--dry-run", "--out", str(tmp_path / "dry")]) == 0
    printed = capsys.readouterr().out
    assert "trigram table, 90,000 pairs" in printed and "bigram table, 300 tokens × top 128" in printed
    assert not (tmp_path / "dry").exists()


def test_sketch_command_user_errors(tiny_text_model, tmp_path, capsys) -> None:
    def error(args: list[str], code: int, *fragments: str) -> None:
        assert main(["sketch", str(tiny_text_model), *args, "--out", str(tmp_path / "o")]) == code
        err = capsys.readouterr().err
        assert "Traceback" not in err
        for fragment in fragments:
            assert fragment in err, err

    error(["--text", str(tmp_path / "missing.txt")], 2, "cannot read it as UTF-8 text")
    (tmp_path / "empty.txt").write_text("  \n")
    error(["--text", str(tmp_path / "empty.txt")], 2, "--text is empty")
    error(["--samples", "5"], 2, "too few to split 80/10/10")
    error(["--length", "1000"], 2, "longer than the model's context of 64 tokens")
    error(["--trigram", "on", "--max-time", "0.000001"], 1, "refusing")
    (tmp_path / "short.txt").write_text("a b c")
    error(["--text", str(tmp_path / "short.txt"), "--length", "64"], 1, "too few for windows of 64")
    assert not (tmp_path / "o" / "sketch.json").exists()
