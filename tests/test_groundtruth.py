"""The ground-truth harness: chains, scores against hand computations, read-outs against
independent computations (the transformers model itself, LN(w_i)·w_j by hand), and a CI-sized
study in which the default read-out must recover the chain on tied and untied models."""

from __future__ import annotations

import math

import pytest
import torch

import jetgraph
from jetgraph.applications.groundtruth import (
    BigramTruth,
    ChainSpec,
    TinyConfig,
    bigram_counts,
    bigram_readouts,
    chance_scores,
    markov_chain,
    run_chain,
    score_readout,
    spread,
    tiny_gpt2,
)
from jetgraph.applications.groundtruth.readouts import (
    AFTER_EVERY_TOKEN,
    FITTED,
    MEAN,
    ONE_TOKEN,
    PROJECT_DIRECT,
    SUM,
    attention_free_paths,
    fit_weights,
    without_direction,
)


def test_sparse_chain_rows_and_stationary_distribution() -> None:
    chain = markov_chain(30, successors=4, alpha=0.3, seed=3)
    assert chain.transition.dtype == torch.float64
    assert torch.allclose(chain.transition.sum(-1), torch.ones(30, dtype=torch.float64), atol=1e-12)
    assert ((chain.transition > 0).sum(-1) == 4).all()
    assert torch.allclose(chain.stationary @ chain.transition, chain.stationary, atol=1e-12)
    again = markov_chain(30, successors=4, alpha=0.3, seed=3)
    assert torch.equal(chain.transition, again.transition)
    with pytest.raises(ValueError, match="successors must be between 1 and vocab=30"):
        markov_chain(30, successors=31)


def test_entropy_rate_by_hand() -> None:
    from jetgraph.applications.groundtruth import MarkovChain

    p = torch.tensor([[0.9, 0.1], [0.5, 0.5]], dtype=torch.float64)
    pi = torch.tensor([5 / 6, 1 / 6], dtype=torch.float64)  # solves pi P = pi
    h = lambda *q: -sum(x * math.log(x) for x in q)  # noqa: E731
    expected = 5 / 6 * h(0.9, 0.1) + 1 / 6 * h(0.5, 0.5)
    assert MarkovChain(p, pi).entropy_rate == pytest.approx(expected, abs=1e-12)


def test_sampled_chain_counts_approach_the_rows() -> None:
    chain = markov_chain(8, successors=3, alpha=1.0, seed=1)
    counts = bigram_counts(chain.sample(400, 64, seed=2), 8)
    visited = chain.stationary > 1e-9
    assert (counts.sum(-1) > 0).tolist() == visited.tolist()  # a transient token never occurs
    rows = counts[visited] / counts[visited].sum(-1, keepdim=True)
    assert (rows - chain.transition[visited]).abs().max() < 0.05
    assert counts[chain.transition == 0].sum() == 0


def test_scores_against_hand_computation() -> None:
    truth = BigramTruth.from_transition(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.6, 0.1]]))
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 0.5], [0.0, 0.0, 3.0]])
    scores = score_readout(logits, truth, k=2)
    q = logits.double().softmax(-1)
    kl = sum(sum(p * math.log(p / q[i, j]) for j, p in enumerate(row.tolist()))
             for i, row in enumerate(truth.rows)) / 3
    assert scores["top1"] == pytest.approx(1 / 3)  # only row 0's argmax agrees
    assert scores["kl"] == pytest.approx(kl, abs=1e-12)
    # top-2 sets: row0 {0,2} vs {0,1}: 1/2; row1 {1,2} vs {2, 0 or 1}: the truth ties 0 and 1 at 0.1
    expected = (0.5 + len({1, 2} & set(truth.rows[1].topk(2).indices.tolist())) / 2 + 0.5) / 3
    assert scores["top2"] == pytest.approx(expected)
    uniform = score_readout(torch.zeros(3, 3), truth, k=2)
    assert uniform["kl"] == pytest.approx(chance_scores(truth, k=2)["kl"], abs=1e-12)
    with pytest.raises(ValueError, match="cannot be scored"):
        score_readout(torch.zeros(2, 3), truth)


def test_count_truth_keeps_rows_with_enough_data() -> None:
    counts = torch.tensor([[30.0, 10.0], [1.0, 2.0]])
    truth = BigramTruth.from_counts(counts, min_count=20)
    assert truth.scored.tolist() == [True, False]
    assert truth.rows[0].tolist() == [0.75, 0.25]
    with pytest.raises(ValueError, match="no context occurs 100 times"):
        BigramTruth.from_counts(counts, min_count=100)


def test_spread_over_seeds() -> None:
    out = spread([{"top1": 0.5}, {"top1": 0.7}, {"top1": 0.9}])["top1"]
    assert out == pytest.approx({"mean": 0.7, "std": 0.2, "min": 0.5, "max": 0.9})
    assert spread([{"kl": 1.0}])["kl"]["std"] == 0.0


def test_fit_and_projection_helpers() -> None:
    generator = torch.Generator().manual_seed(0)
    tables = [torch.randn(5, 7, generator=generator) for _ in range(3)]
    target = 0.5 * tables[0] - 2.0 * tables[2] + torch.randn(5, 1, generator=generator)  # + a row shift
    weights = fit_weights(tables, target)  # float32 inputs: exact to their rounding
    assert torch.allclose(weights, torch.tensor([0.5, 0.0, -2.0], dtype=torch.float64), atol=1e-6)
    rows, directions = torch.randn(4, 6, generator=generator), torch.randn(4, 6, generator=generator)
    left = without_direction(rows, directions)
    centred = directions - directions.mean(-1, keepdim=True)
    assert (left * centred).sum(-1).abs().max() < 1e-5


@pytest.mark.parametrize("tie", [True, False])
def test_readouts_match_independent_computations(tie: bool) -> None:
    model = tiny_gpt2(TinyConfig(vocab=12, n_embd=16, n_layer=2, n_head=2, seq=16, tie=tie)).eval()
    prog = jetgraph.capture(model, torch.randint(0, 12, (1, 6)))
    tables = bigram_readouts(prog)
    tokens = torch.arange(12)
    with torch.no_grad():
        own = model(input_ids=tokens.view(-1, 1)).logits[:, 0]
        pairs = torch.cartesian_prod(tokens, tokens)
        after = model(input_ids=pairs).logits[:, -1].double().softmax(-1).view(12, 12, 12).mean(0).log()
        wte, ln = model.transformer.wte.weight, model.transformer.ln_f
        direct = ln(wte) @ model.lm_head.weight.T  # E→U: the final norm on the embedding, decoded
    assert torch.allclose(tables[ONE_TOKEN], own, atol=1e-5)
    assert torch.allclose(tables[AFTER_EVERY_TOKEN].double(), after, atol=1e-5)
    assert torch.allclose(tables["E→U"], direct, atol=1e-5)
    paths = attention_free_paths(prog)
    assert paths == ["E→U", "E→mlp0→U", "E→mlp1→U", "E→mlp0→mlp1→U"]
    assert torch.allclose(tables[SUM], sum(tables[p] for p in paths))
    assert torch.allclose(tables[MEAN], tables[SUM] / 4)
    assert FITTED in tables and PROJECT_DIRECT in tables
    if tie:  # the tied direct path predicts the context token itself
        assert (tables["E→U"].argmax(-1) == tokens).float().mean() > 0.9


def test_ci_sized_study_default_readout_recovers_the_chain() -> None:
    """Tiny GPT-2s on a V = 16 chain, tied and untied, two seeds each: the model on one token
    (the default read-out) recovers the chain's successors far above chance on every run, and
    the tied direct path E→U is the identity, as the full study found."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        chain = ChainSpec(vocab=16, successors=4, alpha=0.3, sequences=600)
        cfg = TinyConfig(n_embd=32, n_head=2, seq=32, batch=32, steps=250, lr=1e-2)
        runs = [run_chain(seed, tie, chain, cfg) for tie in (True, False) for seed in (0, 1)]
    finally:
        torch.set_num_threads(threads)
    for run in runs:
        default, chance = run.scores[ONE_TOKEN], run.chance
        assert run.loss < run.floor + 0.15, (run.tie, run.seed, run.loss, run.floor)
        assert default["top1"] >= chance["top1"] + 0.5, (run.tie, run.seed, default)
        assert default["kl"] < 0.5 * chance["kl"], (run.tie, run.seed, default, chance)
        if run.tie:
            assert run.scores["E→U"]["top1"] < 0.2, run.scores["E→U"]
