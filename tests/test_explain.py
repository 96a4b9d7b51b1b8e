"""Head granularity and path attribution (``jetgraph.explain``): heads sum to their attention
unit, the frozen linear maps agree with a jvp and with a Llama computed by hand from its weights
and its own attention patterns, and every attribution adds up to the model's own value."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import fx

import jetgraph
from jetgraph.applications.explain import DecompositionError, FrozenNetwork, explain_program
from jetgraph.applications.explain.network import frozen
from jetgraph.capture.zoo import FAMILIES
from jetgraph.cli import main
from jetgraph.heads import HeadsNotFound, split_heads
from jetgraph.ir import parse_unit_name
from tests.conftest import captured, random_ids


@pytest.mark.parametrize("family", FAMILIES)
def test_heads_sum_to_their_attention_unit(family: str) -> None:
    _, prog = captured(family)
    ids = random_ids(2, 6, seed=1)
    sub = prog.at("sublayer")
    states, side = sub.stream_with_side_inputs(ids)
    heads = prog.at("head")
    groups = heads.head_groups()
    attention = [u for u in sub.units if u.kind == "attn"]
    for unit in attention:
        update = unit(states[unit.reads], side)
        parts = groups[unit.name]
        assert len(parts) >= 2 and all(p.reads == parts[0].reads for p in parts)
        total = sum(part(states[unit.reads], side) for part in parts)
        assert ((total - update).abs().max() / update.abs().max()).item() <= 1e-5, unit.name
    # the head view's stream ends where the model's does, and its names parse
    assert torch.allclose(heads.stream(ids)[-1], states[-1], rtol=0, atol=1e-5)
    assert len(heads.units) == sum(len(g) for g in groups.values())
    assert all(parse_unit_name(u.name) is not None for u in heads.units)


def test_a_head_edit_changes_only_that_head() -> None:
    _, prog = captured("llama", torch.float64)
    ids = random_ids(1, 5, seed=2)
    head = prog.at("head").head_groups()["attn1"][2]
    states, side = prog.at("head").stream_with_side_inputs(ids)
    removed = prog.intervene(ids, {head.name: torch.zeros_like})
    by_hand = prog.intervene(ids, {"attn1": lambda out: out - head(states[head.reads], side)})
    assert torch.allclose(removed, by_hand, atol=1e-10)
    assert not torch.allclose(removed, prog(ids))


def test_a_graph_without_merged_heads_is_refused_by_construct() -> None:
    class NoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8, 8))

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return torch.ops.aten.mm.default(h, self.weight)

    with pytest.raises(HeadsNotFound, match=r"merged into \[\.\.\., heads·head_dim\]"):
        split_heads(fx.symbolic_trace(NoHeads()), "attn0")
    with pytest.raises(ValueError, match="granularity must be"):
        captured("gpt2")[1].at("heads")


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_units_equal_the_units_and_their_linear_maps_equal_a_jvp(family: str) -> None:
    _, prog = captured(family, torch.float64)
    ids = random_ids(1, 6, seed=3)
    view = prog.at("head")
    states, side = view.stream_with_side_inputs(ids)
    generator = torch.Generator().manual_seed(0)
    for unit in [*view.units, view.decoder]:
        x = states[-1] if unit is view.decoder else states[unit.reads]
        args = [side[name] for name in unit.side_inputs]
        piece = frozen(unit)
        value, *held = piece.values(x, *args)
        assert torch.allclose(value, unit(x, side), rtol=1e-12, atol=1e-12)
        tangent = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        _, by_jvp = torch.func.jvp(lambda h, a=args, f=piece: f.values(h, *a)[0], (x,), (tangent,))
        assert piece.linear is not None
        assert torch.allclose(piece.linear(tangent, *args, *held), by_jvp, rtol=1e-10, atol=1e-12)


def _rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def test_frozen_paths_equal_a_llama_computed_by_hand() -> None:
    """The frozen map of each unit written out from the weights (RMSNorm scale, the model's own
    attention pattern per query head, the SiLU gate held) composes into the same path values."""
    model, prog = captured("llama", torch.float64)
    model = copy.deepcopy(model)
    model.config._attn_implementation = "eager"
    ids = random_ids(1, 6, seed=4)
    torch.set_grad_enabled(False)
    try:
        _hand_computed_paths(model, prog, ids)
    finally:
        torch.set_grad_enabled(True)


def _hand_computed_paths(model, prog, ids) -> None:
    out = model(input_ids=ids, output_hidden_states=True, output_attentions=True, use_cache=False)
    eps = model.config.rms_norm_eps
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    dim = model.config.hidden_size // heads
    layers = model.model.layers
    maps = {}
    for i, layer in enumerate(layers):
        h = out.hidden_states[i][0]
        attn = layer.self_attn
        scale = _rms_scale(h, eps)
        pattern = out.attentions[i][0]
        for k in range(heads):
            def head(v, k=k, attn=attn, scale=scale, pattern=pattern, layer=layer):
                normed = layer.input_layernorm.weight * v * scale
                values = normed @ attn.v_proj.weight.T  # [seq, kv * dim]
                group = k // (heads // kv)
                mixed = pattern[k] @ values[:, group * dim:(group + 1) * dim]
                return mixed @ attn.o_proj.weight[:, k * dim:(k + 1) * dim].T
            maps[f"attn{i}.h{k}"] = head
        mid = h + sum(maps[f"attn{i}.h{k}"](h) for k in range(heads))
        mlp, mid_scale = layer.mlp, _rms_scale(mid, eps)
        gate = torch.nn.functional.silu((layer.post_attention_layernorm.weight * mid * mid_scale)
                                        @ mlp.gate_proj.weight.T)

        def mlp_map(v, mlp=mlp, gate=gate, mid_scale=mid_scale, layer=layer):
            normed = layer.post_attention_layernorm.weight * v * mid_scale
            return (gate * (normed @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
        maps[f"mlp{i}"] = mlp_map
        last = mid + mlp_map(mid)  # the maps are exact at the model's own input
        if i + 1 < len(layers):
            assert torch.allclose(last, out.hidden_states[i + 1][0], atol=1e-8)
    normed = model.model.norm.weight * last * _rms_scale(last, eps)  # HF's last hidden state is normed
    assert torch.allclose(normed, out.hidden_states[-1][0], atol=1e-8)
    target = int(out.logits[0, -1].argmax())
    network = FrozenNetwork(prog.at("head"), ids, 5, lambda row: row[..., target])
    readout = (model.model.norm.weight * model.lm_head.weight[target]) * _rms_scale(last, eps)[5]
    embedding = model.model.embed_tokens.weight[ids[0]]
    for units in [(), ("mlp0",), ("attn0.h1",), ("attn0.h3", "mlp1"), ("mlp0", "attn1.h2"),
                  ("attn0.h0", "attn1.h1", "mlp1")]:
        for position in (0, 3, 5):
            v = torch.zeros_like(embedding)
            v[position] = embedding[position]
            for name in units:
                v = maps[name](v)
            by_hand = float(readout @ v[5])
            # float64; HF's eager model and the captured graph differ by ~1e-9 in their states
            value = network.path_value("embed.token", position, units)
            assert value == pytest.approx(by_hand, abs=1e-9), units


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_attribution_adds_up_to_the_model(family: str, dtype: torch.dtype) -> None:
    _, prog = captured(family, dtype)
    ids = random_ids(1, 6, seed=5)
    result = explain_program(prog, ids, budget=60)  # raises DecompositionError unless it adds up
    logits = prog(ids)[0, -1]
    assert result.value == pytest.approx(float(logits.max()), rel=1e-6)
    parts = result.listed_total + result.unexpanded_total + result.remainder
    assert parts == pytest.approx(result.value, abs=1e-9 * abs(result.value) + 1e-12)
    scale = sum(abs(p.contribution) for p in result.paths) + abs(result.value)
    exact = result.working_dtype == "float64"  # a float64 Llama still takes its norms in float32
    if family in ("gpt2", "opt", "residual_mlp"):  # no casts inside: float64 throughout
        assert exact == (dtype == torch.float64)
    assert abs(result.remainder) <= (1e-10 if exact else 2e-5) * scale
    # each listed path is the path computed along it again
    network = FrozenNetwork(prog.at("head"), ids, 5, lambda row: row[..., result.target])
    for path in [p for p in result.paths if p.position is not None][:5]:
        again = network.path_value(path.source, path.position, path.units)
        assert again == pytest.approx(path.contribution, rel=1e-5, abs=1e-7)


def test_the_search_lists_every_path_when_the_budget_allows() -> None:
    _, prog = captured("gpt2", torch.float64)
    ids = random_ids(1, 3, seed=6)
    result = explain_program(prog, ids, granularity="sublayer", budget=10_000, goal=None,
                             contrast=7)
    assert result.stopped.startswith("complete") and not result.groups and result.rest_count == 0
    sources = [p for p in result.paths if p.position is not None and p.source == "embed.token"]
    assert len(sources) == 3 * 2 ** 4  # every path of 4 sequential units from each token
    assert result.completeness == pytest.approx(1.0, abs=1e-9)
    logits = prog(ids)[0, -1]
    assert result.value == pytest.approx(float(logits[result.target] - logits[7]), rel=1e-9)


def test_the_jet_decomposition_adds_up_with_its_remainder() -> None:
    _, prog = captured("llama", torch.float64)
    ids = random_ids(1, 5, seed=7)
    result = explain_program(prog, ids, method="jet", order=1, max_length=2, granularity="sublayer",
                             budget=10_000)
    assert result.groups == [] and result.paths
    assert result.listed_total + result.remainder == pytest.approx(result.value, rel=1e-9)
    with pytest.raises(ValueError, match="over the budget"):
        explain_program(prog, ids, method="jet", order=1, max_length=4, budget=3)


def test_bad_options_are_refused_in_one_line() -> None:
    _, prog = captured("gpt2")
    ids = random_ids(1, 4, seed=8)
    cases = [({"position": 4}, "position 4 is past the input of 4"), ({"budget": 0}, "budget must"),
             ({"goal": 0}, "goal must"), ({"method": "exact"}, "method must"),
             ({"granularity": "layer"}, "granularity must"), ({"target": 10**9}, "outside the vocabulary"),
             ({"target": 3, "contrast": 3}, "the contrast is the target")]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            explain_program(prog, ids, **options)
    with pytest.raises(ValueError, match="one sequence"):
        explain_program(prog, random_ids(2, 4))
    assert issubclass(DecompositionError, ArithmeticError)


def test_the_result_writes_csv_json_and_a_picture(tmp_path) -> None:
    from jetgraph.applications.explain.picture import attribution_graph

    _, prog = captured("llama")
    result = explain_program(prog, random_ids(1, 5, seed=9), budget=40, labels={})
    rows = result.to_csv().splitlines()
    assert rows[0].startswith("rank,position,token,path") and len(rows) == len(result.paths) + 1
    data = json.loads(result.to_json())
    assert data["value"] == result.value and len(data["paths"]) == len(result.paths)
    source = attribution_graph(result, top=5).source
    assert "target" in source and "unexpanded groups" in source and "remainder" in source
    assert "embed.token→" in result.table(5)


def test_cli_explain_errors_before_work(tmp_path, capsys) -> None:
    assert main(["explain", "--help"]) == 0
    assert main(["explain", "m", "text", "--budget", "0"]) == 2
    assert main(["explain", "m", "text", "--granularity", "layer"]) == 2
    assert main(["explain", "m", "  "]) == 2
    assert main(["explain", "m", "text", "--csv", str(tmp_path / "x.txt")]) == 2
    assert main(["explain", "m", "text", "--goal", "2"]) == 2
    assert main(["explain", "m", "text", "--html", str(tmp_path / "x.svg")]) == 2
    assert main(["explain", "m", "text", "--graph-json", str(tmp_path / "x.csv")]) == 2
    assert main(["explain", "m", "text", "--target", " a", "--contrast", " a"]) == 2
    assert list(tmp_path.iterdir()) == []
    capsys.readouterr()


class _LinearResidual(torch.nn.Module):
    """Embedding, three linear residual units, readout: the frozen network is the network."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(50, 16)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(3))
        self.readout = torch.nn.Linear(16, 50, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = h + block(h)
        return self.readout(h)


def test_path_patching_measures_what_a_linear_network_predicts() -> None:
    """On a linear network, cutting a path's last edge in the real model removes exactly the
    group the frozen network predicts, and zero-ablating a unit exactly its gradient × output."""
    from jetgraph.applications.explain.patching import remove_path, remove_unit, unit_attributions

    ids = torch.tensor([[3, 7, 9, 1]])
    prog = jetgraph.capture(_LinearResidual().double().eval(), ids)
    network = FrozenNetwork(prog.at("sublayer"), ids, 3, lambda row: row[..., 5])
    result = explain_program(prog, ids, 5, granularity="sublayer", budget=100, goal=None)
    checked = 0
    for path in (p for p in result.paths if p.position is not None):
        predicted = path.contribution if not path.units else network.group_value(
            path.source, path.position, path.units)
        measured = network.value - remove_path(network, path.source, path.position, path.units)
        assert measured == pytest.approx(predicted, rel=1e-9, abs=1e-12), path.path
        checked += 1
    assert checked >= 8
    for name, (_, patching) in unit_attributions(network).items():
        assert network.value - remove_unit(network, name) == pytest.approx(patching, rel=1e-9)


def test_cli_explain_on_tinystories(tmp_path, capsys) -> None:
    from tests.conftest import require_tinystories

    model = str(require_tinystories())
    out = {"--csv": tmp_path / "p.csv", "--json": tmp_path / "p.json", "--render": tmp_path / "p.dot",
           "--html": tmp_path / "p.html", "--graph-json": tmp_path / "g.json"}
    files = [a for pair in out.items() for a in map(str, pair)]
    assert main(["explain", model, "Once upon a time there was a", "--budget", "80", "--top", "5",
                 *files]) == 0
    printed = capsys.readouterr().out
    assert "embed.token" in printed and "remainder" in printed and "completeness" in printed
    data = json.loads(out["--json"].read_text())
    assert data["granularity"] == "head" and data["paths"]
    assert out["--csv"].read_text().startswith("rank,") and "digraph" in out["--render"].read_text()
    assert 'id="jetgraph-data"' in out["--html"].read_text()
    graph = json.loads(out["--graph-json"].read_text())
    assert graph["metadata"]["schema_version"] == 1 and graph["nodes"] and graph["links"]
    for bad, message in ((["--target", " upon a"], "tokens ["), (["--position", "40"], "past the input"),
                         (["--target", "id:999999"], "outside the vocabulary"),
                         (["--html", str(tmp_path / "x.txt")], "--html")):
        assert main(["explain", model, "Once upon a time", *bad, "--csv", str(tmp_path / "q.csv")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "q.csv").exists()


def test_cli_target_without_its_leading_space_gets_a_note(capsys) -> None:
    from transformers import PreTrainedTokenizerFast

    from jetgraph.cli.explain import _token
    from tests.conftest import GPT2_TOKENIZER, missing

    if not GPT2_TOKENIZER.is_file():
        missing(f"the GPT-2 tokenizer is not at {GPT2_TOKENIZER}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(GPT2_TOKENIZER))
    assert _token(tokenizer, " Paris", 50257, "target") == tokenizer(" Paris").input_ids[0]
    assert "note" not in capsys.readouterr().err
    assert _token(tokenizer, "Paris", 50257, "target") == tokenizer("Paris").input_ids[0]
    assert "without a leading space" in capsys.readouterr().err


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_unit_maps_equal_one_vector_at_a_time(family: str) -> None:
    _, prog = captured(family, torch.float64)
    ids = random_ids(1, 5, seed=10)
    network = FrozenNetwork(prog.at("head"), ids, 4, lambda row: row[..., 3])
    generator = torch.Generator().manual_seed(1)
    vectors = torch.randn((3, *network.final.shape), generator=generator, dtype=torch.float64)
    for unit in network.units:
        batched = network.apply_many(unit.index, vectors)
        alone = torch.stack([network.apply(unit.index, v) for v in vectors])
        assert torch.allclose(batched, alone, rtol=1e-10, atol=1e-12), unit.name
    every = torch.arange(len(network.units))
    assert torch.allclose(network.through_many(vectors)[:, 1], network.through(every, vectors[1]))


# ------------------------------------------------------------------ why a head attends there
def test_score_pairs_equal_a_llama_computed_by_hand() -> None:
    """Each (query path, key path) pair of a head's score equals the query and key of those two
    vectors written out from the weights (held RMSNorm scale, rotary embedding, the key head of
    the query head's group): ``RoPE(W_q ŝ_q a) · RoPE(W_k ŝ_k b) / √d``."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from jetgraph.applications.explain.attention import attention_score_attribution, head_score

    model, prog = captured("llama", torch.float64)
    ids = random_ids(1, 7, seed=5)
    network = FrozenNetwork(prog.at("head"), ids, 6, lambda row: row[..., 3])
    layer, heads = model.model.layers[1], model.config.num_attention_heads
    dim = model.config.hidden_size // heads
    group = heads // model.config.num_key_value_heads
    head, query, key = 2, 6, 4
    result = attention_score_attribution(network, f"attn1.h{head}", query, key)
    unit = next(u for u in network.units if u.name == f"attn1.h{head}")
    stream = network.states[unit.reads]
    assert result.value == pytest.approx(head_score(network, unit.name, query, key), rel=1e-9)
    scale = _rms_scale(stream, model.config.rms_norm_eps)
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(stream.unsqueeze(0), torch.arange(7).unsqueeze(0))

    def rotated(vector: torch.Tensor, row: int, weight: torch.Tensor, index: int) -> torch.Tensor:
        normed = layer.input_layernorm.weight * vector * scale[row]
        projected = (normed @ weight.T)[index * dim:(index + 1) * dim].view(1, 1, 1, dim)
        out, _ = apply_rotary_pos_emb(projected, projected, cos[:, row:row + 1], sin[:, row:row + 1])
        return out.flatten()

    pairs = {(p.query.path if p.query else None, p.key.path if p.key else None): p.contribution
             for p in result.pairs}
    checked = 0
    embedding, through = ("embed.token", query, ()), ("embed.token", query - 2, ("attn0.h0",))
    for query_part, key_part in [(embedding, ("embed.token", key, ())),
                                 (embedding, ("embed.token", key - 1, ("attn0.h1",))),
                                 (through, ("embed.token", 2, ("attn0.h3",)))]:
        a, _ = network.prefix_vector(*query_part)
        b, _ = network.prefix_vector(*key_part)
        with torch.no_grad():
            by_hand = float(rotated(a[query], query, layer.self_attn.q_proj.weight, head)
                            @ rotated(b[key], key, layer.self_attn.k_proj.weight, head // group)) / dim ** 0.5
        name = ("→".join([f"{query_part[0]}@{query_part[1]}", *query_part[2]]),
                "→".join([f"{key_part[0]}@{key_part[1]}", *key_part[2]]))
        assert pairs[name] == pytest.approx(by_hand, rel=1e-7, abs=1e-10), name
        checked += 1
    assert checked == 3
    mass = sum(abs(p.contribution) for p in result.pairs)  # the norms run in float32 (the graph casts)
    assert abs(result.explained - result.value) <= 1e-6 * mass


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox_sequential", "phi", "qwen2"])
def test_score_attribution_adds_up_to_the_real_score(family: str) -> None:
    """Every family whose heads split: the pairs sum to the model's own pre-softmax score (float32,
    the quadratic is exact with the norms held), and the listed attention weight is the model's."""
    from jetgraph.applications.explain.attention import attention_score_attribution, head_score

    _, prog = captured(family)
    ids = random_ids(1, 8, seed=2)
    network = FrozenNetwork(prog.at("head"), ids, 7, lambda row: row[..., 1])
    result = attention_score_attribution(network, "attn1.h0", 7, 3, max_units=1)
    assert result.value == pytest.approx(head_score(network, "attn1.h0", 7, 3), rel=1e-5, abs=1e-6)
    assert result.explained == pytest.approx(result.value, rel=1e-4, abs=1e-5)
    assert 0.0 <= result.pattern <= 1.0
    assert any(p.multi_hop for p in result.pairs)
    assert "rest" in {p.key.path for p in result.pairs if p.key} | {"rest"}
    assert "score at query 7, key 3" in result.table()


def test_score_attribution_refuses_bad_requests() -> None:
    from jetgraph.applications.explain.attention import attention_score_attribution

    _, prog = captured("llama")
    network = FrozenNetwork(prog.at("head"), random_ids(1, 6, seed=2), 5, lambda row: row[..., 1])
    for head, query, key, message in [("attn1", 5, 2, "not a head"), ("attn9.h0", 5, 2, "no head"),
                                      ("attn1.h0", 2, 4, "0 ≤ key ≤ query"),
                                      ("attn1.h0", 9, 2, "0 ≤ key ≤ query")]:
        with pytest.raises(ValueError, match=message):
            attention_score_attribution(network, head, query, key)


def test_explain_attention_entry_point() -> None:
    """``jetgraph.explain_attention`` on a program: negative positions resolve, the pairs add up,
    the result serialises, and a key past the input is refused in one line. (Whether it finds a
    trained induction circuit is the study's question: ``benchmarks/explain_study.py``.)"""
    _, prog = captured("llama")
    ids = torch.tensor([[5, 9, 13, 21, 5, 9]])
    result = jetgraph.explain_attention(prog, ids, "attn1.h0", key=1, query=-1)
    assert result.query == 5 and result.key == 1
    assert abs(result.explained - result.value) <= 2e-4 * sum(abs(p.contribution) for p in result.pairs)
    data = result.to_json()
    assert data["head"] == "attn1.h0" and len(data["pairs"]) == len(result.pairs)
    with pytest.raises(ValueError, match="past the input"):
        jetgraph.explain_attention(prog, ids, "attn1.h0", key=7)
    with pytest.raises(ValueError, match="after query"):
        jetgraph.explain_attention(prog, ids, "attn1.h0", key=4, query=2)
    with pytest.raises(ValueError, match=r"its heads are attn0\.h0 … attn1\.h3"):
        jetgraph.explain_attention(prog, ids, "attn40.h1", key=1)
    assert all(p.multi_hop is False for p in result.pairs if "rest" in (p.query and p.query.path,
                                                                       p.key and p.key.path))
    assert "ScoreAttribution" in result._repr_html_()


def test_jet_paths_print_their_degrees() -> None:
    """At order 1 the same units carry several terms (one per degree pattern): each is printed
    with its degrees, so no two listed jet paths read the same."""
    _, prog = captured("gpt2")
    result = explain_program(prog, random_ids(1, 5, seed=3), 2, method="jet", order=1, max_length=1,
                             granularity="sublayer")
    printed = [p.path for p in result.paths]
    assert len(set(printed)) == len(printed)
    assert any("^1" in p for p in printed)
