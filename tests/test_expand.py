"""Algorithm 1 (jetgraph.expand): terms + remainder, composition, the lens and linear invariants."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import jetgraph
from jetgraph.capture.zoo import FAMILIES, tiny_model
from jetgraph.passes import expand, source_terms, stream_term
from tests.conftest import captured, random_ids
from tests.taylor_oracles import TermOracle

# Every term is compared with an independent float64 value (tests/taylor_oracles.py: TermOracle,
# nested torch.func.jvp at the materialised centre; at order 0 also the units and the decoder
# composed by hand). The criterion, per term: ‖ours − oracle‖ ≤ tolerance · max(‖oracle‖, S/100),
# S the largest oracle term norm of the expansion (a term far below the others carries the rounding
# of the magnitudes it was computed from, not its own). Stated per precision of our evaluation:
FLOAT32_TOLERANCE = 5e-6  # float32 capture vs float64 oracle: ~40 float32 ulps; measured worst 8.9e-7
FLOAT64_TOLERANCE = 1e-13  # float64 capture vs float64 oracle: ~450 float64 ulps; measured worst 1.2e-15
# HF computes RMSNorm (Llama, Mistral, Qwen2, Gemma) and GPT-Neo's attention scores in float32
# even in a float64 model: their float64 captures are float32-accurate, so they are checked in
# float32 only (the oracle itself then carries float32 rounding, ~1e-7, well inside 5e-6)
FLOAT32_INSIDE = frozenset({"gpt_neo", "llama", "mistral", "qwen2", "gemma"})


def _float64_program(family: str) -> jetgraph.ResidualProgram:
    """The same tiny model (same seed) in float64: the oracles' program (conftest's factory)."""
    return captured(family, torch.float64)[1]


def _assert_terms_match(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                        tolerance: float, label: str = "") -> None:
    """The same term names, and every term within ``tolerance`` of its independent value."""
    assert set(actual) == set(expected), f"{label}: term names differ"
    scale = max(e.norm().item() for e in expected.values())
    assert scale > 0, f"{label}: every expected term is zero"
    for name, value in expected.items():
        ours = actual[name].double()
        value = value.double().expand(ours.shape)
        error = (ours - value).norm().item()
        bound = tolerance * max(value.norm().item(), scale / 100)
        assert error <= bound, f"{label} {name}: error {error:.3e} > {bound:.3e}"


def _assert_matches_oracle(expansion, oracle: TermOracle, ids: torch.Tensor, tolerance: float,
                           label: str = "") -> None:
    """Every term, the target and the remainder of ``expansion`` against the float64 oracle."""
    values = expansion.evaluate(ids)
    expected = {t.name: oracle.value(t) for t in expansion.terms}
    _assert_terms_match(values.terms, expected, tolerance, label)
    target = oracle.target(None if expansion.space == "logits" else expansion.unit)
    magnitude = sum(v.norm().item() for v in expected.values()) + target.norm().item()
    remainder = target - sum(v.expand(target.shape) for v in expected.values())
    assert (values.target.double() - target).norm().item() <= tolerance * target.norm().item(), label
    assert (values.remainder.double() - remainder).norm().item() <= tolerance * magnitude, label


def _composed_by_hand(view: jetgraph.ResidualProgram, ids: torch.Tensor) -> tuple[dict, dict]:
    """The order-0 terms of the composition in test_every_term_equals_its_oracle (unit 0 with
    identity="jet", unit 1 with identity="pass", then the decoder; uniform weights), written out:
    for every encoder addend a, w0·a and w0·γ0(a), then each x of those and w1·γ1(x), then
    w2·Dec(each), with w0 = 1/S, w1 = 1/(2S), w2 = 1/(4S) for S addends."""
    u0, u1 = view.units[0], view.units[1]
    with torch.no_grad():
        addends = view.encoder.addends(ids)
        s = len(addends)
        w0, w1, w2 = 1 / s, 1 / (2 * s), 1 / (4 * s)
        stream, logits = {}, {}
        for name, a in addends.items():
            a = a.expand(ids.shape[0], *a.shape[1:])
            source, through = f"embed.{name}", f"embed.{name}→{u0.name}"
            stream[f"{source}(id)"] = w0 * a  # the identity jet of unit 0 at order 0
            stream[through] = w0 * u0(a)
            stream[f"{source}→{u1.name}"] = w1 * u1(stream[f"{source}(id)"])
            stream[f"{through}→{u1.name}"] = w1 * u1(stream[through])
            logits[f"{source}→unembed"] = w2 * view.decoder(stream[f"{source}(id)"])
            logits[f"{through}→unembed"] = w2 * view.decoder(stream[through])
            for path in (source, through):
                logits[f"{path}→{u1.name}→unembed"] = w2 * view.decoder(stream[f"{path}→{u1.name}"])
    return stream, logits


@pytest.mark.parametrize("granularity", ["block", "sublayer"])
@pytest.mark.parametrize("order", [0, 1, 2])
@pytest.mark.parametrize("family", [*FAMILIES, "hyper_mlp"])  # hyper_mlp: a [batch, seq, 2, d] stream
def test_every_term_equals_its_oracle(family: str, order: int, granularity: str) -> None:
    """Unit 0 at the encoder's addends (identity="jet"), unit 1 at all of those terms
    (identity="pass"), the decoder at all of those (uniform weights): every term of every stage
    equals its float64 oracle, a nested jvp at the materialised centre along variate − centre,
    over k!, times the weight; at order 0 also the units and the decoder composed by hand."""
    _, prog32 = captured(family)
    prog64 = _float64_program(family)
    ids = random_ids(2, 6, seed=order)
    oracle = TermOracle(prog64.at(granularity), ids)
    runs = [("float32", prog32, FLOAT32_TOLERANCE)]
    if family not in FLOAT32_INSIDE:
        runs.append(("float64", prog64, FLOAT64_TOLERANCE))
    for dtype, prog, tolerance in runs:
        view = prog.at(granularity)
        sources = source_terms(view)
        first = expand(view, 0, sources, order=order, weights="uniform", identity="jet")
        second = expand(view, 1, first, order=order, weights="uniform", identity="pass")
        decoded = expand(view, "decoder", second, order=order, weights="uniform")
        # the provenance the oracle follows, by hand: S skip + S(k+1) jets, then N centres passed
        # through + N(k+1) jets at them, then N(k+1) decoder jets; each jet at a previous term
        assert len(first) == len(sources) * (order + 2)
        assert len(second) == len(first) * (order + 2) and len(decoded) == len(second) * (order + 1)
        assert list(second.terms[:len(first)]) == list(first.terms)
        for expansion, centers, unit, skip in ((first, sources, view.units[0].name, True),
                                               (second, first.terms, view.units[1].name, False),
                                               (decoded, second.terms, "unembed", False)):
            passed = {c.uid for c in centers}
            built = [t for t in expansion.terms if t.uid not in passed]
            for center in centers:  # orders 0..k (and one skip branch) at each centre, weight 1/N
                own = [t for t in built if t.center is center]
                assert sorted((t.kind, t.degree if t.kind == "jet" else t.order) for t in own) == (
                    [("identity", order)] * skip + [("jet", j) for j in range(order + 1)])
                assert all(t.unit.name == unit and t.order == order and t.weight == 1 / len(centers)
                           for t in own)
            assert len(built) == len(centers) * (order + 1 + skip)
            _assert_matches_oracle(expansion, oracle, ids, tolerance, f"{family} {dtype} {unit}")
        if order == 0:
            stream, logits = _composed_by_hand(prog64.at(granularity), ids)
            _assert_terms_match(second.evaluate(ids).terms, stream, tolerance, f"{dtype} by hand")
            _assert_terms_match(decoded.evaluate(ids).terms, logits, tolerance, f"{dtype} by hand")


def test_single_center_expansions_are_exact_at_the_true_stream() -> None:
    """Centred at the stream state it reads, a unit's order-0 jet is the unit's own update."""
    _, prog = captured("llama")
    ids = random_ids(1, 5)
    values = expand(prog, 0, [stream_term(prog, 0)], order=0, weights="unit").evaluate(ids)
    assert values.remainder.abs().max().item() <= 1e-5


def test_order_zero_decoder_expansion_is_the_logit_lens() -> None:
    _, prog = captured("gpt2")
    ids = random_ids(2, 7)
    states = prog.at("sublayer").stream(ids)
    for layer in range(len(states)):
        lens = expand(prog.at("sublayer"), "decoder", [stream_term(prog.at("sublayer"), layer)],
                      order=0, weights="unit").evaluate(ids)
        (value,) = lens.terms.values()
        by_hand = prog.decoder.norm(states[layer]) @ prog.decoder.unembedding.T
        torch.testing.assert_close(value, by_hand, rtol=0, atol=1e-5)
        torch.testing.assert_close(value, prog.decoder(states[layer]), rtol=0, atol=0)


class LinearResidual(nn.Module):
    """h_0 = E[ids], h_ℓ = h_{ℓ-1} + A_ℓ h_{ℓ-1}, logits = U h_L: every path is U A_S E."""

    def __init__(self, layers: int = 3, d: int = 8, vocab: int = 11) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.units = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(layers))
        self.readout = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for unit in self.units:
            h = h + unit(h)
        return self.readout(h)


def test_linear_network_order_zero_gives_the_two_to_the_l_products() -> None:
    torch.manual_seed(0)
    model = LinearResidual().double()
    ids = random_ids(1, 4, vocab=11)
    prog = jetgraph.capture(model, ids)
    terms = source_terms(prog)
    for unit in range(len(prog.units)):
        terms = expand(prog, unit, terms, order=0, weights="unit", identity="pass").terms
    logits = expand(prog, "decoder", terms, order=0, weights="unit")
    values = logits.evaluate(ids)
    assert len(values.terms) == 2 ** len(prog.units)
    assert values.remainder.abs().max().item() <= 1e-12
    e = model.embed(ids)
    a = [u.weight for u in model.units]
    u = model.readout.weight
    expected = set()
    for subset in range(2 ** len(a)):
        x = e
        for i, weight in enumerate(a):
            if subset >> i & 1:
                x = x @ weight.T
        expected.add(tuple(torch.round(x @ u.T, decimals=8).flatten().tolist()))
    got = {tuple(torch.round(v, decimals=8).flatten().tolist()) for v in values.terms.values()}
    assert got == expected


def test_two_block_example_four_paths() -> None:
    """x_0 = Enc, x_1 = γ_1(x_0); expand γ_2 at {x_0, x_1}, then Dec at the 4 sub-streams."""
    _, prog = captured("residual_mlp")  # 3 units; use the first two as γ_1, γ_2
    ids = random_ids(1, 5)
    x0 = source_terms(prog)
    first = expand(prog, 0, x0, order=0, weights="unit")  # x_0 and γ_1(x_0)
    second = expand(prog, 1, first, order=0, weights="unit")
    assert [t.name for t in second.terms] == [
        "embed.token", "embed.token→block0", "embed.token→block1", "embed.token→block0→block1"]
    view64 = _float64_program("residual_mlp")
    gamma1, gamma2 = view64.units[0], view64.units[1]
    with torch.no_grad():
        x0_value = view64.encoder.addends(ids)["token"]
        by_hand = {"embed.token": x0_value, "embed.token→block0": gamma1(x0_value),
                   "embed.token→block1": gamma2(x0_value),
                   "embed.token→block0→block1": gamma2(gamma1(x0_value))}
    _assert_terms_match(second.evaluate(ids).terms, by_hand, FLOAT32_TOLERANCE)
    graph = second.to_networkx()
    assert graph.number_of_nodes() == 4 and graph.number_of_edges() == 3


def test_identity_jet_weights_the_skip_branch() -> None:
    _, prog = captured("llama")
    ids = random_ids(1, 5)
    centers = [stream_term(prog, 0)]
    passed = expand(prog, 0, centers, order=1, weights=0.5, identity="pass").evaluate(ids)
    jetted = expand(prog, 0, centers, order=1, weights=0.5, identity="jet").evaluate(ids)
    h0 = prog.stream(ids)[0]
    torch.testing.assert_close(next(iter(passed.terms.values())), h0)
    torch.testing.assert_close(next(iter(jetted.terms.values())), 0.5 * h0)


def test_tensor_weights_per_position_and_coordinate() -> None:
    _, prog = captured("gpt2")
    ids = random_ids(1, 5)
    centers = source_terms(prog)  # token and position embeddings: they sum to h_0
    assert len(centers) == 2
    per_position = torch.rand(2, 5, 1)
    per_coordinate = torch.rand(2, prog.d_model)
    oracle = TermOracle(_float64_program("gpt2"), ids)
    for weights in (per_position, per_coordinate, torch.tensor([0.3, 0.7])):
        expansion = expand(prog, 0, centers, order=1, weights=weights)
        _assert_matches_oracle(expansion, oracle, ids, FLOAT32_TOLERANCE, str(tuple(weights.shape)))


def test_faithfulness_report() -> None:
    _, prog = captured("gpt2")
    ids = random_ids(2, 6)
    report = expand(prog, "decoder", [stream_term(prog, len(prog.units))], order=0,
                    weights="unit").faithfulness(ids)
    assert report["relative_remainder"] <= 1e-6 and report["top1"] == 1.0
    assert report["cosine"] == pytest.approx(1.0, abs=1e-6) and report["kl"] <= 1e-6


def test_bad_input_errors() -> None:
    _, prog = captured("llama")
    center = [stream_term(prog, 0)]
    with pytest.raises(IndexError, match="out of range"):
        expand(prog, 7, center)
    with pytest.raises(IndexError, match="out of range"):
        stream_term(prog, 9)
    with pytest.raises(ValueError, match="one leading entry per centre"):
        expand(prog, 0, center, weights=torch.ones(3))
    with pytest.raises(ValueError, match="weights must be"):
        expand(prog, 0, center, weights="fancy")
    with pytest.raises(ValueError, match="at least one centre"):
        expand(prog, 0, [])
    decoded = expand(prog, "decoder", center)
    with pytest.raises(TypeError, match="stream-space Terms"):
        expand(prog, 0, decoded)
    with pytest.raises(ValueError, match="identity"):
        expand(prog, 0, center, identity="skip")  # type: ignore[arg-type]


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_remainders_have_order_k_plus_one(order: int) -> None:
    """For a real unit and the decoder (float64), remainder(c + t v) / t^(k+1) tends to a
    non-zero constant as t → 0."""

    # GPT-2: computed in float64 throughout (HF's Llama RMSNorm casts to float32 internally)
    prog = jetgraph.capture(tiny_model("gpt2").double(), random_ids(1, 6)).at("sublayer")
    ids = random_ids(1, 6, seed=5)
    states = prog.stream(ids)
    generator = torch.Generator().manual_seed(order)
    for fn, center in ((prog.units[0], states[0]), (prog.units[1], states[1]), (prog.decoder, states[-1])):
        v = torch.randn(center.shape, generator=generator, dtype=torch.float64)
        ratios = []
        for t in (1e-3, 5e-4, 2.5e-4):
            point = center + t * v
            remainder = fn(point) - jetgraph.jet(fn, center, point, order=order).value
            ratios.append((remainder.norm() / t ** (order + 1)).item())
        assert ratios[-1] > 1e-8, "the remainder vanished faster than t^(k+1)"
        coarse, fine = abs(ratios[1] / ratios[0] - 1), abs(ratios[2] / ratios[1] - 1)
        assert fine < 0.02 and fine <= coarse + 1e-3, ratios  # converging to a constant


def test_fitted_weights_lower_the_logit_space_remainder() -> None:
    _, prog = captured("gpt2")
    view = prog.at("sublayer")
    ids = random_ids(1, 6)
    centers = source_terms(view)  # token and position embeddings
    uniform = expand(view, 0, centers, order=1, weights="uniform", identity="jet")
    fitted = expand(view, 0, centers, order=1, weights="fit", identity="jet", fit_on=ids, fit_steps=60)
    assert len(fitted.fit_losses) == 60 and fitted.fit_losses[-1] < fitted.fit_losses[0]
    u = view.decoder.unembedding

    def loss(expansion) -> float:
        r = expansion.evaluate(ids).remainder @ u.T
        return (r.pow(2).sum() / r.numel()).item()

    assert loss(fitted) < loss(uniform)
    assert loss(fitted) == pytest.approx(fitted.fit_losses[-1], rel=0.05)
    weights = torch.stack([t.weight for t in fitted.terms if t.kind == "identity"])
    torch.testing.assert_close(weights.sum(0), torch.ones_like(weights[0]))  # softmax over centres
    _assert_matches_oracle(fitted, TermOracle(_float64_program("gpt2").at("sublayer"), ids), ids,
                           FLOAT32_TOLERANCE)
    with pytest.raises(ValueError, match="fit_on"):
        expand(view, 0, centers, weights="fit")


@pytest.mark.parametrize("order", [1, 2, 3])
def test_split_jets_sum_to_the_univariate_jets(order: int) -> None:
    """With centres that add up to the stream, the per-monomial terms of each centre sum to
    its univariate jet: both expansions leave the same remainder."""
    import math

    _, prog = captured("gpt2")
    view = prog.at("sublayer")
    ids = random_ids(1, 5)
    centers = source_terms(view)  # token + position = h_0, the stream attn0 reads
    whole = expand(view, 0, centers, order=order, weights="unit").evaluate(ids)
    split = expand(view, 0, centers, order=order, weights="unit", split=True)
    n = len(centers)
    assert sum(t.kind == "jet" for t in split.terms) == n * math.comb(n - 1 + order, order)
    values = split.evaluate(ids)
    torch.testing.assert_close(values.remainder, whole.remainder, rtol=1e-4, atol=1e-5)
    # each monomial term: w · D^|α| γ(c)[d^α] / α! along the other centre, by nested jvp
    _assert_matches_oracle(split, TermOracle(_float64_program("gpt2").at("sublayer"), ids), ids,
                           FLOAT32_TOLERANCE)
    graph = split.to_networkx()
    assert any(data["role"] == "direction" for *_, data in graph.edges(data=True))


def test_split_mixed_term_is_the_directional_derivative() -> None:
    _, prog = captured("gpt2")
    view = prog.at("sublayer")
    ids = random_ids(1, 5)
    token, position = source_terms(view)
    split = expand(view, 0, [token, position], order=2, weights="unit", split=True)
    values = split.evaluate(ids)
    term = next(t for t in split.terms if t.monomial == (2,) and t.center is token)
    assert term.name == "embed.token→attn0[embed.position^2]"
    addends = view.encoder.addends(ids)
    f = view.units[0]
    c, v = addends["token"], addends["position"]
    second = torch.func.jvp(lambda x: torch.func.jvp(f, (x,), (v,))[1], (c,), (v,))[1] / 2
    torch.testing.assert_close(values.terms[term.name], second, rtol=1e-4, atol=1e-5)



class ReluResidual(nn.Module):
    """Token + position embeddings, units h + relu(W h) (no norms, no biases), linear readout."""

    def __init__(self, layers: int = 2, d: int = 16, vocab: int = 13, positions: int = 8) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, d)
        self.positions = nn.Embedding(positions, d)
        self.units = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(layers))
        self.readout = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.tokens(input_ids) + self.positions(torch.arange(input_ids.shape[1]))
        for unit in self.units:
            h = h + torch.relu(unit(h))
        return self.readout(h)


def test_relu_network_first_order_expansion_is_exact_with_lemma_2_weights() -> None:
    """Lemma 2: with coordinate-wise weights on a centre whose pre-activation has the sign of
    the stream's, Σ_i w_i J^1 γ(c_i)(h) = γ(h) exactly for γ = relu∘W."""
    torch.manual_seed(0)
    model = ReluResidual().double()
    ids = random_ids(2, 6, vocab=13)
    prog = jetgraph.capture(model, ids)
    centers = source_terms(prog)  # token and position embeddings: they sum to h_0
    assert len(centers) == 2
    addends = list(prog.encoder.addends(ids).values())
    w = model.units[0].weight
    z = [a @ w.T for a in addends]
    positive = (z[0] + z[1]) > 0
    first = torch.where(positive, z[0] > 0, z[0] <= 0).double()  # pick centre 0 where it agrees
    weights = torch.stack([first, 1 - first])
    values = expand(prog, 0, centers, order=1, weights=weights, identity="pass").evaluate(ids)
    assert values.remainder.abs().max().item() <= 1e-12
    uniform = expand(prog, 0, centers, order=1, weights="uniform").evaluate(ids)
    assert uniform.remainder.abs().max().item() > 1e-3  # the weights matter


def test_rank_export_and_logit_space_evaluation(tmp_path) -> None:
    import csv
    import json

    _, prog = captured("gpt2")
    view = prog.at("sublayer")
    ids = random_ids(1, 5)
    expansion = expand(view, 0, source_terms(view), order=1, weights="uniform")
    ranked = expansion.rank(ids)
    norms = [n for _, n in ranked]
    assert norms == sorted(norms, reverse=True) and len(ranked) == len(expansion.terms)
    assert len(expansion.rank(ids, top=2)) == 2
    rows = json.loads(expansion.export(tmp_path / "terms.json", ids).read_text())
    assert {r["name"] for r in rows} == {t.name for t in expansion.terms}
    assert all(isinstance(r["norm"], float) for r in rows)
    with (expansion.export(tmp_path / "terms.csv")).open() as handle:
        assert [r["name"] for r in csv.DictReader(handle)] == [t.name for t in expansion.terms]
    with pytest.raises(ValueError, match=r"csv or \.json"):
        expansion.export(tmp_path / "terms.txt")
    logits = expansion.evaluate(ids, space="logits")
    torch.testing.assert_close(logits.target, view(ids))
    assert set(logits.terms) == {f"{t.name}→unembed" for t in expansion.terms}
    with pytest.raises(ValueError, match="space"):
        expansion.evaluate(ids, space="tokens")  # type: ignore[arg-type]
