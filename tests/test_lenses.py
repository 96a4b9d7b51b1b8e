"""The lens rivals (issue 32): each lens against an independent computation.

The per-input Jacobian lens and the averaged Jacobian's fit against ``torch.func.jacrev`` of the
units composed by hand (float64); the ahead lens against nested ``torch.func.jvp`` of the decoder;
the tuned lens's translator against the closed-form least-squares map on a linear toy; fitted
lenses through save and load.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import captured
from torch import nn
from torch.func import jacrev, jvp

import jetgraph
from jetgraph.applications.lens import (
    FittedLens,
    ahead_lens,
    fit_jacobian_lens,
    fit_jacobian_lens_reverse,
    fit_tuned_lens,
    iterative_lens,
    jacobian_lens,
)

F64 = 1e-10  # float64 arithmetic, two ways
# a float64 Llama still takes its RMSNorm in float32 (transformers upcasts to float32, not to the
# input's dtype): float32 rounding of the norm, reached two ways
TOLERANCE = {"llama": 1e-6}


def _rest_by_hand(view: jetgraph.ResidualProgram, start: int, states: list[torch.Tensor], side: dict):
    """h_N from h_start, the units called one after another (earlier states held)."""

    def rest(h: torch.Tensor) -> torch.Tensor:
        held = {i: states[i] for i in range(start)}
        held[start] = h
        for index in range(start, len(view.units)):
            unit = view.units[index]
            h = h + unit(held[unit.reads], side)
            held[index + 1] = h
        return h

    return rest


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize(("family", "granularity"), [("llama", "block"), ("gptj", "sublayer")])
def test_jacobian_lens_is_the_jacobian_applied_to_the_state(family: str, granularity: str) -> None:
    """Dec(J_s h_s) with J_s = ∂h_N/∂h_s from jacrev over every position (gptj: parallel blocks,
    whose MLP reads the state before the attention, held)."""
    _, prog = captured(family, torch.float64)
    view = prog.at(granularity)
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(3))
    result = jacobian_lens(view, ids)
    states, side = view.stream_with_side_inputs(ids)
    assert result.labels == [f"h{i}" for i in range(len(states))]
    for s in range(len(states)):
        if s == len(states) - 1:
            expected = view.decoder(states[s], side)
        else:
            jacobian = jacrev(_rest_by_hand(view, s, states, side))(states[s])  # [1,S,d,1,S,d]
            transported = torch.einsum("abcxyz,xyz->abc", jacobian, states[s])
            expected = view.decoder(transported, side)
        assert _relative(result.logits[s], expected) < TOLERANCE.get(family, F64), f"state {s}"


def test_the_averaged_jacobian_is_the_reference_estimator_by_both_fits() -> None:
    """J̄_s = mean_p Σ_{p' ≥ p} ∂h_N[p']/∂h_s[p] over the kept positions (jacrev), equal from the
    forward-mode fit (several directions per pass) and the reverse-mode fit."""
    _, prog = captured("llama", torch.float64)
    generator = torch.Generator().manual_seed(5)
    corpus = [torch.randint(0, 64, (n,), generator=generator) for n in (9, 12)]
    skip = 2
    forward = fit_jacobian_lens(prog, corpus, skip_first=skip, directions=5, progress=False)
    reverse = fit_jacobian_lens_reverse(prog, corpus, skip_first=skip, rows=7, progress=False)
    d = prog.d_model
    expected = torch.zeros(len(prog.units), d, d, dtype=torch.float64)
    kept_total = 0
    for ids in corpus:
        states, side = prog.stream_with_side_inputs(ids.view(1, -1))
        kept = list(range(skip, ids.numel() - 1))
        kept_total += len(kept)
        for s in range(len(prog.units)):
            jacobian = jacrev(_rest_by_hand(prog, s, states, side))(states[s])[0, :, :, 0]  # [S', d, S, d]
            for p in kept:
                expected[s] += sum(jacobian[q, :, p, :] for q in kept if q >= p)
    expected /= kept_total
    assert forward.corpus.positions == kept_total == reverse.corpus.positions
    assert _relative(forward.matrices.double(), expected) < 1e-6  # stored in float32
    assert _relative(reverse.matrices.double(), expected) < 1e-6
    assert forward.fit["method"] == "forward" and reverse.fit["method"] == "reverse"


@pytest.mark.parametrize("order", [1, 2])
def test_the_ahead_lens_is_the_decoder_jet_at_a_nearer_state(order: int) -> None:
    """J^k Dec(h_s)(h_{s+m}) = Σ_j D^j Dec(h_s)[v^j]/j!, v = h_{s+m} − h_s, by nested jvp; with
    m reaching h_N it is the paper's iterative lens."""
    _, prog = captured("gpt2", torch.float64)
    view = prog.at("sublayer")
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(1))
    states, side = view.stream_with_side_inputs(ids)
    result = ahead_lens(view, ids, order=order, ahead=2)
    last = len(states) - 1
    decoder = lambda h: view.decoder(h, side)  # noqa: E731
    for s in range(len(states)):
        v = states[min(s + 2, last)] - states[s]
        functions = [decoder]
        for _ in range(order):
            functions.append(lambda x, f=functions[-1], v=v: jvp(f, (x,), (v,))[1])
        expected = sum(f(states[s]) / math.factorial(j) for j, f in enumerate(functions))
        assert _relative(result.logits[s], expected) < F64, f"state {s}"
    paper = iterative_lens(view, ids, order=order)
    whole = ahead_lens(view, ids, order=order, ahead=last)
    assert _relative(whole.logits, paper.logits) < F64


class LinearToy(nn.Module):
    """Embedding, residual units h + W h + b (no nonlinearity, no norm) and a linear readout:
    each state is an affine function of the one before."""

    def __init__(self, vocab: int = 32, d: int = 8, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.readout = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for block in self.blocks:
            h = h + block(h)
        return self.readout(h)


def test_the_tuned_translator_is_the_least_squares_map_on_a_linear_toy() -> None:
    """With h_2 = h_1 + W h_1 + b exactly and a linear readout (vocabulary > width), KL(model ‖
    lens) is 0 only at the affine map from h_1 to h_2: the closed-form least-squares fit."""
    torch.manual_seed(0)
    model = LinearToy().eval()
    with torch.no_grad():  # a well-conditioned map: SGD reaches it within the steps below
        for block in model.blocks:
            block.weight *= 0.3
    prog = jetgraph.capture(model, torch.randint(0, 32, (1, 12)), granularity="block")
    corpus = [torch.randperm(32, generator=torch.Generator().manual_seed(i))[:16] for i in range(4)]
    before = [p.detach().clone() for p in model.parameters()]
    lens = fit_tuned_lens(prog, corpus, layers=[1], steps=400, progress=False)
    states = [prog.stream(ids.view(1, -1)) for ids in corpus]
    x = torch.cat([s[1][0] for s in states])
    y = torch.cat([s[2][0] for s in states])
    solution = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1)], 1), y - x).solution
    assert (lens.matrices[0] - solution[:-1].T).abs().max() < 1e-5
    assert (lens.biases[0] - solution[-1]).abs().max() < 1e-5
    first, last = lens.fit["loss_first_last"][0]
    assert last < 1e-6 < first
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in prog.decoder.graph_module.parameters())


def test_fitted_lenses_round_trip_and_apply(tmp_path) -> None:
    _, prog = captured("llama")
    corpus = [torch.randint(0, 64, (10,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(9))
    jacobian = fit_jacobian_lens(prog, corpus, skip_first=1, description="two random rows", progress=False)
    tuned = fit_tuned_lens(prog, corpus, steps=5, progress=False)
    for lens in (jacobian, tuned):
        loaded = FittedLens.load(lens.save(tmp_path / lens.kind))
        assert loaded.corpus == lens.corpus and loaded.labels == lens.labels and loaded.fit == lens.fit
        assert torch.equal(loaded.matrices, lens.matrices)
        applied = loaded.apply(prog, ids)
        states = prog.stream(ids)
        for row, s in enumerate(loaded.states):
            assert torch.allclose(applied.logits[row], prog.decoder(lens.transform(row, states[s])))
    h = torch.randn(3, prog.d_model, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(jacobian.transform(0, h), h @ jacobian.matrices[0].T)  # J̄ h, by hand
    assert torch.allclose(tuned.transform(1, h), h + h @ tuned.matrices[1].T + tuned.biases[1])
    assert jacobian.corpus.description == "two random rows" and jacobian.corpus.prompts == 2
    assert jacobian.corpus.positions == 2 * (10 - 1 - 1)


def test_lenses_entry_points_take_text_and_refuse_bad_input() -> None:
    _, prog = captured("llama")
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    assert torch.equal(jetgraph.lenses.logit(prog, ids).logits, iterative_lens(prog, ids, 0).logits)
    assert jetgraph.lenses.jacobian(prog, ids).kind == "jacobian"
    assert jetgraph.lenses.ahead(prog, ids, order=1, ahead=1).kind == "ahead"
    with pytest.raises(ValueError, match="ahead must be a number of states"):
        jetgraph.lenses.ahead(prog, ids, ahead=0)
    with pytest.raises(ValueError, match="no position to average over"):
        fit_jacobian_lens(prog, [torch.arange(5)], progress=False)
    with pytest.raises(ValueError, match="states before h2"):
        fit_jacobian_lens(prog, [torch.arange(20)], layers=[2], skip_first=1, progress=False)
    with pytest.raises(TypeError, match="non-empty list"):
        jetgraph.lenses.fit_tuned(prog, "one text", progress=False)
    other = fit_tuned_lens(captured("gpt2")[1], [torch.arange(8)], steps=1, progress=False)
    other.d_model = prog.d_model + 1
    with pytest.raises(ValueError, match="fitted on a model with d_model"):
        other.apply(prog, ids)


def test_the_divergence_check_reads_the_remainder_alone_and_flags_the_same_tokens() -> None:
    """LensResult.relative_remainder (one pass over the logits, what the divergence check needs)
    equals the token metric ``remainder``; the divergent tokens are the same whether the other
    metrics were computed first or not (overflow included)."""
    from jetgraph.applications.lens import LensResult

    generator = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0, 1.0, 30.0, 1.0, 1.0]).view(5, 1, 1, 1)
    logits = torch.randn(5, 2, 7, 50, generator=generator) * scale
    logits[1, 0, 3, 4] = float("inf")
    true = torch.randn(2, 7, 50, generator=generator)
    norms = torch.rand(5, 2, 2, 7, generator=generator).double()
    norms[:, 1] *= 3
    labels = [f"h{i}" for i in range(5)]
    with pytest.warns(Warning):
        alone = LensResult("iterative", 1, labels, logits, true, 5, coefficient_norms=norms)
    with pytest.warns(Warning):
        full = LensResult("iterative", 1, labels, logits, true, 5, coefficient_norms=norms)
    full.token_metrics  # noqa: B018 - every metric first
    assert "token_metrics" not in alone.__dict__
    torch.testing.assert_close(alone.relative_remainder, full.token_metrics["remainder"], equal_nan=True)
    assert torch.equal(alone.divergent_tokens, full.divergent_tokens) and alone.divergent_tokens.sum() > 1
    # and the criterion applied by hand to the metric's remainder flags the same tokens
    from jetgraph.applications.lens.results import divergent_series

    by_hand = divergent_series(norms.movedim(1, -1), full.token_metrics["remainder"]) | full.diverged_tokens
    assert torch.equal(alone.divergent_tokens, by_hand)
