"""Capture and lift every supported family: logits, stream identity, units, views."""

from __future__ import annotations

import networkx as nx
import pytest
import torch

from jetgraph.capture.zoo import FAMILIES, PARALLEL_FAMILIES
from tests.conftest import captured, random_ids, reference_logits

LOGIT_ATOL = 1e-5  # float32, stated in the capture issue


@pytest.mark.parametrize("family", FAMILIES)
def test_program_reproduces_logits_on_new_shapes(family: str) -> None:
    model, prog = captured(family)
    assert prog.dynamic, "batch and sequence length should stay dynamic"
    for batch, seq in [(1, 8), (3, 13), (2, 2)]:
        ids = random_ids(batch, seq, seed=batch * 100 + seq)
        with torch.no_grad():
            error = (prog(ids) - reference_logits(model, ids)).abs().max().item()
        assert error <= LOGIT_ATOL, f"{family} {batch}x{seq}: max abs logit error {error:.3g}"


@pytest.mark.parametrize("granularity", ["block", "sublayer"])
@pytest.mark.parametrize("family", FAMILIES)
def test_unit_update_is_stream_difference(family: str, granularity: str) -> None:
    _, prog = captured(family)
    view = prog.at(granularity)
    ids = random_ids(2, 9, seed=7)
    with torch.no_grad():
        states = view.stream(ids)
        side = view.side_inputs(ids)
        assert len(states) == len(view.units) + 1
        for unit in view.units:
            before, after = states[unit.index], states[unit.index + 1]
            update = unit(states[unit.reads], side)
            scale = max(1.0, after.abs().max().item())
            error = (update - (after - before)).abs().max().item()
            assert error <= 1e-5 * scale, f"{family} {unit.name}: γ(h) != h_next - h ({error:.3g})"


@pytest.mark.parametrize("family", FAMILIES)
def test_units_have_kinds_layers_and_module_paths(family: str) -> None:
    _, prog = captured(family)
    leaves = prog.at("sublayer").units
    if family == "residual_mlp":
        assert [u.kind for u in leaves] == ["mlp"] * 3
        assert [u.module_path for u in leaves] == ["blocks.0", "blocks.1", "blocks.2"]
    else:
        assert len(prog.blocks) == 2 and len(leaves) == 4
        assert sorted(u.kind for u in leaves) == ["attn", "attn", "mlp", "mlp"]
        for block in prog.blocks:
            assert block.kind == "attn" and len(block.children) == 2
            assert {c.layer for c in block.children} == {block.layer}
            assert all(c.module_path.startswith(block.module_path) for c in block.children)
    assert len({u.name for u in leaves}) == len(leaves)
    assert all(u.op_count > 0 and u.num_parameters > 0 for u in leaves)


@pytest.mark.parametrize("family", FAMILIES)
def test_parallel_blocks_read_one_stream(family: str) -> None:
    _, prog = captured(family)
    parallel = family in PARALLEL_FAMILIES
    assert all(block.parallel == parallel for block in prog.blocks)
    for block in prog.blocks:
        reads = {child.reads for child in block.children}
        if parallel:
            assert reads == {block.children[0].index}
        else:
            assert reads == {child.index for child in block.children}


@pytest.mark.parametrize("family", FAMILIES)
def test_unit_graph_counts_paths(family: str) -> None:
    """The unrolled unit graph has 2^N embed→unembed paths (3 per parallel block)."""
    _, prog = captured(family)
    for granularity in ("block", "sublayer"):
        graph = prog.at(granularity).to_networkx()
        assert nx.is_directed_acyclic_graph(graph)
        paths = sum(1 for _ in nx.all_simple_paths(graph, "embed", "unembed"))
        if granularity == "sublayer" and family in PARALLEL_FAMILIES:
            expected = 3 ** len(prog.blocks)
        else:
            expected = 2 ** len(prog.at(granularity).units)
        assert paths == expected


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama", "gpt_neo"])
def test_encoder_addends_and_decoder_readout(family: str) -> None:
    model, prog = captured(family)
    ids = random_ids(2, 6, seed=3)
    with torch.no_grad():
        addends = prog.encoder.addends(ids)
        h0 = prog.encoder(ids)
        expected = ("token", "position") if family in ("gpt2", "opt", "gpt_neo") else ("token",)
        assert tuple(addends) == expected
        torch.testing.assert_close(sum(addends.values()), h0, rtol=0, atol=1e-6)
        if "position" in addends:  # positional addends do not depend on token identity
            torch.testing.assert_close(prog.encoder.addends(ids.flip(1))["position"], addends["position"])
        decoder = prog.decoder
        assert decoder.norm is not None and decoder.unembedding is not None
        h = prog.stream(ids)[-1]
        logits = decoder.norm(h) @ decoder.unembedding.T
        if decoder.unembedding_bias is not None:
            logits = logits + decoder.unembedding_bias
        torch.testing.assert_close(logits, decoder(h), rtol=0, atol=1e-5)
        assert decoder.unembedding.shape[0] == reference_logits(model, ids).shape[-1]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_units_callable_on_stream_alone(family: str) -> None:
    """Side inputs depend on positions only, so a unit can be called on h without input_ids."""
    _, prog = captured(family)
    assert prog.side.positions_only
    h = torch.randn(3, 5, prog.d_model, generator=torch.Generator().manual_seed(0))
    ids = random_ids(3, 5)
    for unit in prog.at("sublayer").units:
        torch.testing.assert_close(unit(h), unit(h, prog.side_inputs(ids)), rtol=0, atol=0)


def test_attention_units_mix_positions_mlp_units_do_not() -> None:
    _, prog = captured("llama")
    h = torch.randn(1, 6, prog.d_model, generator=torch.Generator().manual_seed(0))
    moved = h.clone()
    moved[:, 0] += 1.0
    for unit in prog.at("sublayer").units:
        changed = not torch.allclose(unit(h)[:, 1:], unit(moved)[:, 1:])
        assert changed == (unit.kind == "attn"), unit.name
        # causal: later positions never change earlier ones
        late = h.clone()
        late[:, -1] += 1.0
        torch.testing.assert_close(unit(h)[:, :-1], unit(late)[:, :-1], rtol=0, atol=0)


def test_summary_and_views() -> None:
    _, prog = captured("gpt2")
    table = prog.summary_table()
    for expected in ("block0", "block1", "embed", "unembed", "transformer.h.0", "params"):
        assert expected in table
    sub = prog.at("sublayer")
    assert sub.at("block") is not prog and sub.at("block").units == prog.units
    assert "transformer.h.1.mlp" in sub.summary_table()
    assert [u.name for u in sub.units] == ["attn0", "mlp0", "attn1", "mlp1"]
    assert sub.blocks is prog.blocks  # views share graphs and weights
    with pytest.raises(ValueError, match="granularity"):
        prog.at("layer")  # type: ignore[arg-type]


def test_unit_update_is_an_fx_graph_module_of_core_ops() -> None:
    _, prog = captured("gpt2")
    attn = prog.at("sublayer").units[0]
    assert isinstance(attn.update, torch.fx.GraphModule)
    targets = {str(n.target) for n in attn.update.graph.nodes if n.op == "call_function"}
    assert "aten.scaled_dot_product_attention.default" not in targets
    assert "aten.layer_norm.default" not in targets
    assert {"aten.matmul.default", "aten._softmax.default", "aten.rsqrt.default"} <= targets
    placeholders = [n.name for n in attn.update.graph.nodes if n.op == "placeholder"]
    assert placeholders[0] == "h" and placeholders[1:] == list(attn.side_inputs)


def test_program_rejects_bad_input_ids() -> None:
    _, prog = captured("llama")
    with pytest.raises(TypeError, match="integer tensor"):
        prog(torch.randn(1, 4))
    with pytest.raises(ValueError, match="batch, seq"):
        prog(torch.zeros(1, 2, 3, dtype=torch.long))


def test_a_program_is_immutable_and_replace_shares_its_graphs() -> None:
    import dataclasses

    _, prog = captured("llama")
    with pytest.raises(dataclasses.FrozenInstanceError):
        prog.max_positions = 7  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        prog.blocks[0].kind = "mlp"  # type: ignore[misc]
    fixed = prog.replace(max_positions=7)
    assert fixed.max_positions == 7 and prog.max_positions != 7
    assert fixed.blocks is prog.blocks and fixed.decoder is prog.decoder
    view = prog.at("sublayer")
    assert view.blocks is prog.blocks and [u.name for u in view.units][:2] == ["attn0", "mlp0"]
    assert [u.kind for u in view.units][:2] == ["attn", "mlp"]  # found at capture, never patched in
