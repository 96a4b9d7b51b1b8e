"""Jet lens and jet n-grams: exact identities, streaming = full tables, errors."""

from __future__ import annotations

import pytest
import torch

import jetgraph
from jetgraph.applications import (
    bootstrap_mean,
    compare_to_reference,
    diff_tables,
    full_table,
    iterative_lens,
    joint_lens,
    keyword_ids,
    load_keywords,
    ngram_table,
)
from jetgraph.applications.lens import contribution_centers
from jetgraph.applications.plots import plot_lens
from jetgraph.capture.zoo import VOCAB, tiny_model
from jetgraph.passes import path_term
from tests.conftest import captured, random_ids


# ---------------------------------------------------------------------- lens
@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_order0_lens_is_the_logit_lens_by_hand(family: str) -> None:
    _, prog = captured(family)
    ids = random_ids(2, 6)
    result = iterative_lens(prog, ids, order=0)
    states = prog.stream(ids)
    norm, unembedding = prog.decoder.norm, prog.decoder.unembedding
    for i, h in enumerate(states):
        by_hand = norm(h) @ unembedding.T
        if prog.decoder.unembedding_bias is not None:
            by_hand = by_hand + prog.decoder.unembedding_bias
        torch.testing.assert_close(result.logits[i], by_hand, rtol=1e-5, atol=1e-5)
    assert result.metrics["cosine"][-1].min().item() == pytest.approx(1.0, abs=1e-6)
    assert result.metrics["kl"][-1].abs().max().item() < 1e-5


@pytest.mark.parametrize("order", [1, 2])
def test_higher_order_lens_is_the_decoder_jet(order: int) -> None:
    _, prog = captured("llama")
    ids = random_ids(1, 5, seed=2)
    result = iterative_lens(prog, ids, order=order, granularity="sublayer")
    states = prog.at("sublayer").stream(ids)
    for i in (0, 2, len(states) - 1):
        direct = jetgraph.jet(prog.decoder, states[i], states[-1], order=order).value
        torch.testing.assert_close(result.logits[i], direct, rtol=1e-5, atol=1e-5)
    assert len(result.labels) == len(states)
    assert result.metrics["top1"][-1].min().item() == 1.0


def test_joint_lens_fits_convex_weights() -> None:
    _, prog = captured("gpt2")
    ids = random_ids(1, 6, seed=3)
    centers = contribution_centers(prog)
    values = centers.evaluate(ids)
    torch.testing.assert_close(values.total(), values.target, rtol=1e-5, atol=1e-5)  # they sum to h_L
    result = joint_lens(prog, ids, order=1, steps=30)
    assert result.weights.shape[0] == len(prog.units) + 1
    torch.testing.assert_close(result.weights.sum(0), torch.ones_like(result.weights[0]))
    assert result.fit_losses[-1] < result.fit_losses[0]
    h_last = prog.stream(ids)[-1]
    for i, center in enumerate(values.terms.values()):  # each centre: w_i · J^1 Dec(c_i)(h_L), directly
        direct = jetgraph.jet(prog.decoder, center.expand_as(h_last), h_last, order=1).value
        torch.testing.assert_close(result.center_logits[i], result.weights[i] * direct, rtol=1e-4, atol=1e-5)


def test_lens_plot_and_csv(tmp_path) -> None:
    _, prog = captured("llama")
    ids = random_ids(1, 5)
    results = [iterative_lens(prog, ids, order=k) for k in range(2)]
    png = plot_lens(results, tmp_path / "lens.png", input_ids=ids)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = results[1].to_csv(tmp_path / "lens.csv").read_text().splitlines()
    assert rows[0] == "center,cosine,kl,top1,topk,remainder" and len(rows) == len(prog.units) + 2
    with pytest.raises(ValueError, match="at least one"):
        plot_lens([], tmp_path / "none.png")


def test_lens_rejects_negative_order() -> None:
    _, prog = captured("llama")
    with pytest.raises(ValueError, match="non-negative"):
        iterative_lens(prog, random_ids(1, 4), order=-1)


# -------------------------------------------------------------------- ngrams
def test_e_to_u_is_the_decoded_embedding() -> None:
    _, prog = captured("llama")
    table = full_table(prog, "E→U")
    tokens = torch.arange(VOCAB).unsqueeze(1)
    by_hand = prog.decoder(prog.encoder(tokens))[:, 0]
    torch.testing.assert_close(table, by_hand, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["E→U", "E→mlp1→U", "E→MLP_last^1→U", "E→attn1→U"])
def test_streamed_top_k_equals_the_full_table(path: str) -> None:
    _, prog = captured("gpt2")
    full = full_table(prog, path)
    streamed = ngram_table(prog, path, top=20, row_top=3, normalise=True, chunk=37, progress=False)
    values, index = full.flatten().topk(20)
    torch.testing.assert_close(streamed.top_values, values)
    assert streamed.top_index.tolist() == index.tolist()
    torch.testing.assert_close(streamed.row_values, full.topk(3, -1).values)
    torch.testing.assert_close(streamed.log_normaliser, torch.logsumexp(full.double(), -1),
                               rtol=0, atol=2e-6)  # float32 logits near 10: a few ulps
    assert streamed.contexts.shape[1] == (2 if "attn" in path else 1)


def test_rank_by_probability() -> None:
    _, prog = captured("gpt2")
    log_probs = full_table(prog, "E→mlp0→U").log_softmax(-1)
    table = ngram_table(prog, "E→mlp0→U", top=15, rank="prob", chunk=50, progress=False)
    values, index = log_probs.flatten().topk(15)
    torch.testing.assert_close(table.top_values, values)
    assert table.top_index.tolist() == index.tolist()
    first = table.entries()[0]
    assert first["prob"] == pytest.approx(values[0].exp().item(), rel=1e-4)
    with pytest.raises(ValueError, match="rank must be"):
        ngram_table(prog, "E→U", rank="count", progress=False)


def test_keyword_mass_and_bootstrap() -> None:
    _, prog = captured("llama")
    keywords = [3, 17, 99]
    table = ngram_table(prog, "E→mlp1→U", top=5, keywords=keywords, progress=False)
    probs = full_table(prog, "E→mlp1→U").double().softmax(-1)  # float64 softmax of the float32 table
    torch.testing.assert_close(table.keyword_mass(), probs[:, keywords].sum(-1), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(table.keyword_mass([17]), probs[:, 17], rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="not in it: \\[5\\]"):
        table.keyword_mass([5])
    mass = table.mass(samples=200)
    assert mass["low"] <= mass["mean"] <= mass["high"]
    ci = bootstrap_mean(torch.ones(50))
    assert ci["low"] == ci["high"] == 1.0
    with pytest.raises(ValueError, match="keyword list is empty"):
        ngram_table(prog, "E→U", keywords=[], progress=False)


def test_resume_continues_an_interrupted_table(tmp_path, monkeypatch) -> None:
    import jetgraph.applications.ngrams.sweep as ngrams

    _, prog = captured("llama")
    checkpoint = tmp_path / "table.pt"
    complete = ngram_table(prog, "E→U", top=10, chunk=16, progress=False)
    calls = {"n": 0}
    original = ngrams.evaluate_chunk

    def failing(evaluator, ids):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(evaluator, ids)

    monkeypatch.setattr(ngrams, "evaluate_chunk", failing)
    with pytest.raises(KeyboardInterrupt):  # the checkpoint is written when the run stops
        ngram_table(prog, "E→U", top=10, chunk=16, resume=checkpoint, progress=False)
    monkeypatch.setattr(ngrams, "evaluate_chunk", original)
    assert torch.load(checkpoint, weights_only=False)["done"] == [0, 1]
    resumed = ngram_table(prog, "E→U", top=10, chunk=16, resume=checkpoint, progress=False)
    assert resumed.top_index.tolist() == complete.top_index.tolist()
    with pytest.raises(ValueError, match="belongs to another table"):
        ngram_table(prog, "E→U", top=11, chunk=16, resume=checkpoint, progress=False)
    torch.save({"format": 1, "payload": _Pickled()}, checkpoint)  # not plain data: never unpickled
    with pytest.raises(ValueError, match="cannot be read"):
        ngram_table(prog, "E→U", top=10, chunk=16, resume=checkpoint, progress=False)
    assert not _Pickled.loaded


class _Pickled:
    """An object whose unpickling would run code."""

    loaded = False

    def __reduce__(self):
        return (_Pickled._mark, ())

    @staticmethod
    def _mark() -> _Pickled:
        _Pickled.loaded = True
        return _Pickled()


def test_export_decodes_tokens(tmp_path) -> None:
    _, prog = captured("llama")
    table = ngram_table(prog, "E→U", top=4, normalise=True, progress=False)

    class Tokenizer:
        def decode(self, ids):
            return "".join(f"<{i}>" for i in ids)

    csv_rows = table.export(tmp_path / "t.csv", Tokenizer()).read_text().splitlines()
    assert csv_rows[0].split(",") == ["rank", "context_ids", "next_id", "logit", "log_prob", "prob",
                                       "context", "next"]
    assert len(csv_rows) == 5
    assert '"path": "embed.token→unembed"' in table.export(tmp_path / "t.json").read_text()
    with pytest.raises(ValueError, match=r"\.csv or \.json"):
        table.export(tmp_path / "t.txt")


def test_bad_paths_and_contexts_are_refused() -> None:
    _, prog = captured("llama")
    with pytest.raises(ValueError, match="needs at least a source"):
        path_term(prog, "E")
    with pytest.raises(ValueError, match="unknown unit 'mlp9'"):
        path_term(prog, "E→mlp9→U")
    with pytest.raises(ValueError, match="must end at U"):
        path_term(prog, "E→mlp0")
    with pytest.raises(ValueError, match="model order"):
        path_term(prog, "E→mlp1→mlp0→U")
    with pytest.raises(ValueError, match=r"needs contexts of shape \[rows, 1\]"):
        ngram_table(prog, "E→U", contexts=torch.zeros(4, 2, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="must lie in"):
        ngram_table(prog, "E→U", contexts=torch.full((2, 1), VOCAB), progress=False)


def test_model_diff_ranks_changes() -> None:
    _, prog = captured("llama")
    same = diff_tables(prog, prog, "E→U", top=3, progress=False)
    assert len(same["increase"]) == 3 and all(p[2] == p[3] for p in same["increase"])  # no change
    other = tiny_model("llama", seed=1)
    prog_b = jetgraph.capture(other, random_ids(1, 8))
    changes = diff_tables(prog, prog_b, "E→U", top=5, chunk=50, progress=False)
    delta = full_table(prog_b, "E→U").softmax(-1) - full_table(prog, "E→U").softmax(-1)
    row, col = divmod(int(delta.flatten().argmax()), VOCAB)
    assert changes["increase"][0][:2] == (row, col)
    assert changes["decrease"][0][:2] == divmod(int(delta.flatten().argmin()), VOCAB)
    with pytest.raises(ValueError, match="same vocabulary"):
        diff_tables(prog, _other_vocabulary(), "E→U", progress=False)


def _other_vocabulary() -> jetgraph.ResidualProgram:
    from jetgraph.capture.zoo import ResidualMLP

    torch.manual_seed(0)
    return jetgraph.capture(ResidualMLP(vocab=64).eval(), random_ids(1, 4, vocab=64))


def test_compare_to_reference_on_itself() -> None:
    _, prog = captured("llama")
    table = full_table(prog, "E→U")
    reference = table.softmax(-1) * 1000
    report = compare_to_reference(table, reference, k=50)
    assert report["top1_hit_ratio"] == 1.0 and report["mean_kl"] < 1e-9
    assert report["top50_hit_ratio"] == 1.0  # the same joint ranking (uniform row counts)


def test_keyword_lists() -> None:
    words = load_keywords("toxic")
    assert "idiot" in words and all(not w.startswith("#") for w in words)
    assert "sorry" in load_keywords("refusal")
    with pytest.raises(ValueError, match="no keyword list"):
        load_keywords("nonexistent")

    class Tokenizer:
        def __call__(self, text, add_special_tokens=False):
            return type("Encoded", (), {"input_ids": [len(text)]})()

    assert keyword_ids(Tokenizer(), ["ab", "abc"]) == [2, 3, 4]
    with pytest.raises(ValueError, match="empty"):
        keyword_ids(Tokenizer(), [" ", ""])


def test_fast_log_normaliser_matches_float64_on_wide_rows() -> None:
    from jetgraph.applications.ngrams.sweep import _log_sum

    logits = torch.randn(64, 5000, generator=torch.Generator().manual_seed(0)) * 40  # spreads of hundreds
    exact = torch.logsumexp(logits.double(), -1)
    row_max, argmax = logits.max(-1)
    fast = row_max.double() + _log_sum(logits, row_max, argmax).double()
    assert (fast - exact).abs().max().item() < 1e-5


def test_keyword_ids_skip_the_bare_word_start_token() -> None:
    """SentencePiece encodes " dog" as ["▁", "dog"] on TinyStories: the keyword is "dog", not the
    word-start piece every word begins with."""
    from jetgraph.applications import keyword_ids
    from tests.conftest import require_tinystories

    _, tokenizer = jetgraph.load_model(str(require_tinystories()))
    ids = keyword_ids(tokenizer, ["dog", "cat", "happy"])
    assert len(ids) >= 3 and all(tokenizer.decode([i]).strip() for i in ids)  # no bare "▁"

    class Pieces:  # a SentencePiece-like tokenizer: id 0 is the bare word start
        def __call__(self, text, add_special_tokens=False):
            return type("Encoded", (), {"input_ids": [0, len(text.strip())]})()

        def decode(self, ids):
            return "" if ids == [0] else f"w{ids[0]}"

    assert keyword_ids(Pieces(), ["ab", "abc"]) == [2, 3]
