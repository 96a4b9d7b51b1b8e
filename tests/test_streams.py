"""Several parallel residual streams (hyper-connections): the stream is [batch, seq, n, d].

The worked example of docs/paths.md ("Several parallel streams"): a 2-stream toy
(:class:`jetgraph.capture.zoo.HyperConnectedMLP`) whose order-0 paths are written out by hand
from its weights, then the entry points on it (lens, tables, explanations, emitted code), each
against an independent computation, and a real hyper-connected architecture (transformers'
HY-V4) captured and expanded. Every term of the toy against its float64 oracle (nested jvp)
is in tests/test_expand.py (``test_every_term_equals_its_oracle[hyper_mlp-…]``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import jetgraph
from jetgraph.applications.ngrams.convention import InputConvention
from jetgraph.capture.zoo import VOCAB
from tests.conftest import captured, random_ids
from tests.test_codegen import assert_matches_interpreter

TOLERANCE = 1e-5  # float32 against the same float32 arithmetic composed by hand


def _mlp(toy, layer: int, x: torch.Tensor) -> torch.Tensor:
    return toy.blocks[layer](x)


def _decode(toy, mixed: torch.Tensor) -> torch.Tensor:
    """U·LN(x) for x already collapsed to one stream."""
    return toy.readout(toy.norm(mixed))


def test_two_stream_paths_written_out_by_hand() -> None:
    """H_0 = [e, e]; γ_ℓ(H) = b_ℓ ⊗ MLP_ℓ(a_ℓ·H); Dec(H) = U·LN(c·H). The four order-0 paths:
    E→U = U·LN((Σc)e), E→block_ℓ→U = U·LN((c·b_ℓ)·MLP_ℓ((Σa_ℓ)e)), E→block0→block1→U =
    U·LN((c·b_1)·MLP_1((a_1·b_0)·MLP_0((Σa_0)e))): the mixing scalars are part of each path's
    value (the paper's linear case)."""
    toy, prog = captured("hyper_mlp")
    ids = random_ids(2, 5, seed=3)
    assert tuple(prog.stream(ids)[0].shape) == (2, 5, 2, 16)
    assert jetgraph.count_paths(prog, "block") == 4
    paths = jetgraph.expand_paths(prog, order=0)
    terms = paths.expansion().evaluate(ids).terms
    a, b, c = toy.read.detach(), toy.write.detach(), toy.collapse.detach()
    with torch.no_grad():
        e = toy.embed(ids)
        first = _mlp(toy, 0, a[0].sum() * e)
        by_hand = {
            "→unembed": _decode(toy, c.sum() * e),
            "→block0→unembed": _decode(toy, (c @ b[0]) * first),
            "→block1→unembed": _decode(toy, (c @ b[1]) * _mlp(toy, 1, a[1].sum() * e)),
            "→block0→block1→unembed": _decode(toy, (c @ b[1]) * _mlp(toy, 1, (a[1] @ b[0]) * first)),
        }
    assert len(terms) == 4
    for name, value in terms.items():
        suffix = name[name.index("→"):]
        torch.testing.assert_close(value, by_hand[suffix], rtol=TOLERANCE, atol=TOLERANCE)


def test_two_stream_lens_tables_explanations_and_code() -> None:
    toy, prog = captured("hyper_mlp")
    ids = random_ids(1, 6, seed=4)
    states = prog.stream(ids)
    c = toy.collapse.detach()
    # the logit lens decodes each stream state [seq, 2, d] whole: U·LN(c·h_ℓ)
    lens = jetgraph.lens(prog, ids, orders=(0,), progress=False)[0]
    with torch.no_grad():
        expected = torch.stack([_decode(toy, torch.einsum("bsnd,n->bsd", h, c)) for h in states])
    torch.testing.assert_close(lens.logits, expected, rtol=TOLERANCE, atol=TOLERANCE)

    # a bigram table of E→block0→U reads each source token alone: the hand path at each
    table = jetgraph.ngrams(prog, "E→block0→U", sources=8, top=4, convention=InputConvention(),
                            progress=False)
    tokens = table.contexts.first  # the 8 source tokens the table sampled
    with torch.no_grad():
        e = toy.embed(tokens)
        logits = _decode(toy, (c @ toy.write[0].detach()) * _mlp(toy, 0, toy.read[0].detach().sum() * e))
    best = logits.log_softmax(-1).flatten().topk(4)  # row i: source token i, ranked by prob
    assert table.top_index.tolist() == best.indices.tolist()
    torch.testing.assert_close(table.top_logits, logits.flatten()[best.indices],
                               rtol=TOLERANCE, atol=TOLERANCE)

    # explain: the value it decomposes is the model's own logit (the paths adding up to it is
    # checked inside explain)
    attribution = jetgraph.explain(prog, ids, granularity="block")
    with torch.no_grad():
        assert abs(attribution.value - float(toy(ids)[0, -1, attribution.target])) <= 1e-4

    # emitted code: the same terms as the interpreter, here and on another shape (codegen's check)
    assert_matches_interpreter(jetgraph.expand_paths(prog, order=1).expansion(), ids, dynamic=True)


def _sweep():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "sweep_architectures.py"
    spec = importlib.util.spec_from_file_location("sweep_architectures", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _hy_v4() -> torch.nn.Module:
    """A tiny HY-V4: DeepSeek-V4-style hyper-connections (4 streams of width 64), MoE, indexed
    attention with sinks."""
    transformers = pytest.importorskip("transformers")
    config_class = getattr(transformers, "HYV4Config", None)
    if config_class is None:
        pytest.skip(f"transformers {transformers.__version__} has no hy_v4")
    config = config_class(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, q_lora_rank=64,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, index_head_dim=16,
        index_n_heads=4, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=4,
        n_shared_experts=1, num_experts_per_tok=2, layer_types=["indexed_attention"] * 2,
        mlp_layer_types=["dense", "sparse"], hc_mult=4, max_position_embeddings=64, bos_token_id=0,
        eos_token_id=1, pad_token_id=None)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def test_hyper_connections_capture_exactly_and_every_unit_has_its_jet() -> None:
    """HY-V4 keeps hc_mult = 4 streams, mixed into each block's input by input-dependent weights
    and written back into each: the stream is [batch, seq, 4, d], each update a pure function of
    it. Captured exactly on a padded batch; every sublayer's order-1 jet equals torch.func.jvp of
    its own graph (the sweep's oracle); the path E→U equals the model's readout of the embedding
    in its 4 streams."""
    model = _hy_v4()
    ids = random_ids(2, 6, seed=1)
    prog = jetgraph.capture(model, ids[:1])
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logits = prog(ids, attention_mask=mask)
    assert (logits[1] - reference[1]).abs().max() <= 1e-4 * reference[1].abs().max()
    assert (logits[0, 2:] - reference[0, 2:]).abs().max() <= 1e-4 * reference[0].abs().max()
    assert prog.stream(ids[1:])[0].shape[-2:] == (model.config.hc_mult, model.config.hidden_size)
    # the sweep's oracle: torch.func.jvp of each unit's graph, or Richardson-extrapolated central
    # differences where the graph holds ops of other libraries (the MoE's grouped matmul)
    error, _ = _sweep()._order_one_error(prog, ids[1:])
    assert error <= 1, f"an order-1 jet is off the oracle by {error} x its tolerance"
    # the path E→U on the 4-stream state, against the model's own modules: the embedding copied
    # into every stream (as its forward does), collapsed by its hc_head, normed, unembedded
    terms = jetgraph.expand_paths(prog, paths=["E→U"]).expansion().evaluate(ids[1:]).terms
    with torch.no_grad():
        e = model.get_input_embeddings()(ids[1:])
        streams = e.unsqueeze(2).expand(-1, -1, model.config.hc_mult, -1).contiguous()
        by_hand = model.lm_head(model.model.norm(model.model.hc_head(streams)))
    torch.testing.assert_close(terms["embed.token→unembed"], by_hand, rtol=1e-4,
                               atol=1e-4 * by_hand.abs().max().item())
