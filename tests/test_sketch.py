"""The jet n-gram LM: probabilities that sum to 1, its back-off and count baselines against hand
computations, tables against the transformers model itself, and `jetgraph sketch` end to end."""

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
    Windows,
    perplexity,
    plan_sketch,
    read_sketch,
    split_stream,
)
from jetgraph.cli import main
from jetgraph.errors import CostError


def _toy_lm(trigram: bool = True) -> SketchLM:
    """A 4-token LM with random tables: bigram rows, and trigram rows keeping 2 tokens each."""
    generator = torch.Generator().manual_seed(0)
    vocab = 4
    bigram = torch.rand(vocab, vocab, generator=generator).double().softmax(-1)
    unigram = bigram.mean(0)
    index = prob = None
    if trigram:
        full = torch.rand(vocab * vocab, vocab, generator=generator).softmax(-1)
        prob, index = full.topk(2, -1)
    return SketchLM(unigram, bigram, index, prob, (0.5, 0.3, 0.2) if trigram else (0.0, 0.7, 0.3))


@pytest.mark.parametrize("trigram", [True, False])
def test_distributions_sum_to_one(trigram: bool) -> None:
    lm = _toy_lm(trigram)
    for history in ([0], [3], [1, 2], [2, 2], [0, 1, 3]):
        p = lm.distribution(history)
        assert p.min() > 0
        assert float(p.sum()) == pytest.approx(1.0, abs=1e-9), history


def test_trigram_backoff_by_hand() -> None:
    lm = _toy_lm()
    a, b = 1, 2
    row = a * lm.vocab + b
    kept = dict(zip(lm.trigram_index[row].tolist(), lm.trigram_prob[row].double().tolist(), strict=True))
    bigram = lm.bigram[b].double()
    rest = 1 - sum(kept.values())
    covered = sum(bigram[j].item() for j in kept)
    l3, l2, l1 = lm.weights
    for c in range(lm.vocab):
        p3 = kept[c] if c in kept else rest * bigram[c].item() / (1 - covered)
        expected = l3 * p3 + l2 * bigram[c].item() + l1 * lm.unigram[c].item()
        assert lm.distribution([a, b])[c].item() == pytest.approx(expected, abs=1e-7)


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
    plan = plan_sketch(prog, 3, "on", top=4, max_seconds=None)
    lm = read_sketch(prog, 3, plan, top=4, progress=False)
    tokens = torch.arange(10)
    with torch.no_grad():
        weights, first = model(input_ids=tokens.view(-1, 1)).logits[:, 0].double().softmax(-1).mean(0).topk(3)
        weights = weights / weights.sum()
        bigram = sum(w * model(input_ids=torch.stack([torch.full((10,), int(a)), tokens], 1)).logits[:, -1]
                     .double().softmax(-1) for w, a in zip(weights, first, strict=True))
        three = model(input_ids=torch.cartesian_prod(tokens, tokens)).logits[:, -1].softmax(-1)
    assert lm.first_tokens == first.tolist()
    assert torch.allclose(lm.bigram, bigram, atol=1e-6)
    top = three.topk(4, -1)
    assert torch.allclose(lm.trigram_prob, top.values, atol=1e-5)
    assert torch.equal(lm.trigram_index.long(), top.indices)
    assert torch.allclose(lm.unigram, bigram.mean(0), atol=1e-6)
    assert float(lm.distribution([4, 7]).sum()) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(CostError, match="refusing the trigram table of 100 pairs"):
        plan_sketch(prog, 3, "on", max_seconds=1e-9)


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


def test_sketch_command_writes_tables_and_perplexities(tiny_text_model, tmp_path, capsys) -> None:
    out = tmp_path / "sketch"
    args = ["sketch", str(tiny_text_model), "--text", str(tiny_text_model / "corpus.txt"), "--length", "64",
            "--trigram", "on", "--trigram-top", "8", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "jet sketch: trigram + bigram + unigram" in printed and "count bigram LM" in printed
    rows = {r["lm"]: float(r["perplexity"]) for r in csv.DictReader((out / "perplexities.csv").open())}
    assert rows["uniform"] == 300 and all(v > 1 for v in rows.values())
    assert rows["jet sketch: trigram + bigram + unigram"] < rows["uniform"]
    lm = SketchLM.load(out)
    assert lm.has_trigram and lm.trigram_index.shape == (300 * 300, 8)
    assert len(lm.first_tokens) == 16 and sum(lm.weights) == pytest.approx(1.0)
    for history in ([5], [17, 40]):
        assert float(lm.distribution(history).sum()) == pytest.approx(1.0, abs=1e-9)
    assert not (out / "trigram.ckpt").exists()


def test_sketch_command_samples_and_plans(tiny_text_model, tmp_path, capsys) -> None:
    out = tmp_path / "sampled"
    assert main(["sketch", str(tiny_text_model), "--samples", "20", "--length", "32", "--trigram", "off",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sampled from the model itself" in printed and "skipped: --trigram off" in printed
    assert main(["sketch", str(tiny_text_model), "--dry-run", "--out", str(tmp_path / "dry")]) == 0
    assert "trigram: 90,000 pairs" in capsys.readouterr().out
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
