"""Bad input to capture: clear CaptureErrors that name the model, the module and what is supported."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import jetgraph
from jetgraph.capture.zoo import VOCAB
from tests.conftest import random_ids


class NoResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.hidden = nn.Linear(16, 16)
        self.out = nn.Linear(16, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(self.embed(input_ids))))


class DataDependentGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.sum() > 0:  # Python control flow on a tensor value: not capturable
            return self.linear(h)
        return h


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.gate = DataDependentGate()
        self.out = nn.Linear(16, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        return self.out(h + self.gate(h))


class NotLogits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids).sum(-1)


def test_model_without_residual_structure() -> None:
    with pytest.raises(jetgraph.CaptureError, match="no residual add") as info:
        jetgraph.capture(NoResidual(), random_ids(1, 5))
    assert info.value.model_class == "NoResidual"
    assert "NoResidual" in str(info.value) and "captures pre-LN residual" in str(info.value)


def _pre_norm_sums(model: torch.nn.Module, ids: torch.Tensor,
                   norms: list[torch.nn.Module]) -> list[torch.Tensor]:
    """The inputs of ``norms`` (each post-LN block's sums h + f(h), before its norm), in call
    order, recorded by forward hooks on the model itself."""
    seen: list[torch.Tensor] = []
    hooks = [norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach())) for norm in norms]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def test_post_ln_opt_is_rejected() -> None:
    """OPT's post-LN MLP runs on the stream flattened to [batch*seq, d]; the mixed walk that
    expresses post-LN blocks needs the skip's input in the stream's own shape, so this one stays
    refused by the first walk, naming the add."""
    config = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, word_embed_proj_dim=32,
                                    do_layer_norm_before=False, max_position_embeddings=64)
    model = transformers.OPTForCausalLM(config).eval()
    with pytest.raises(jetgraph.CaptureError, match="post-LN") as info:
        jetgraph.capture(model, random_ids(1, 6))
    assert info.value.model_class == "OPTForCausalLM"
    assert info.value.module is not None and info.value.module.startswith("model.decoder.layers.")
    assert info.value.node is not None


def test_post_ln_bert_is_a_stream_of_pre_norm_sums() -> None:
    """Post-LN (``LN(h + f(h))``) is a composition of mixed steps: the stream is the sums before
    each norm, x' = LN(x) + f(LN(x)), and the unit x' − x holds the norm of the skip. The
    program's states are the model's own pre-norm sums (forward hooks), its logits the model's."""
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, is_decoder=True)
    model = transformers.BertLMHeadModel(config).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # norms that differ by layer: a block bound to another layer's norm shows
        for name, value in model.named_parameters():
            if "LayerNorm" in name:
                value.add_(0.3 * torch.randn_like(value))
    ids = random_ids(1, 6)
    prog = jetgraph.capture(model, ids)
    norms = [n for layer in model.bert.encoder.layer for n in (layer.attention.output.LayerNorm,
                                                                layer.output.LayerNorm)]
    sums = _pre_norm_sums(model, ids, norms)
    states = prog.at("sublayer").stream(ids)
    assert len(states) == len(sums) + 1
    for state, expected in zip(states[1:], sums, strict=True):
        torch.testing.assert_close(state, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(prog(ids), reference, rtol=1e-4, atol=1e-5)


def test_export_failure_names_the_failing_module() -> None:
    with pytest.raises(jetgraph.CaptureError, match=r"torch\.export failed") as info:
        jetgraph.capture(Branchy(), random_ids(1, 5))
    assert info.value.model_class == "Branchy"
    assert info.value.module == "gate"
    assert "control flow" in str(info.value)


def test_forward_that_does_not_return_logits() -> None:
    with pytest.raises(jetgraph.CaptureError, match=r"not logits of shape \[batch, seq, vocab\]"):
        jetgraph.capture(NotLogits(), random_ids(1, 5))


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (torch.randn(1, 4), "integer tensor"),
        (torch.zeros(1, 0, dtype=torch.long), "non-empty"),
        ([1, 2, 3], "torch.LongTensor"),
    ],
)
def test_bad_example_input_ids(ids: object, message: str) -> None:
    from jetgraph.capture.zoo import ResidualMLP

    with pytest.raises(jetgraph.CaptureError, match=message):
        jetgraph.capture(ResidualMLP(), ids)  # type: ignore[arg-type]


def test_capture_error_is_a_jetgraph_error() -> None:
    assert issubclass(jetgraph.CaptureError, jetgraph.JetgraphError)


class Lgamma(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.lgamma(torch.sigmoid(self.linear(h)) + 1.0)  # lgamma has no Taylor rule


class NoRuleResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.mlp = Lgamma()
        self.out = nn.Linear(16, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        return self.out(h + self.mlp(h))


def test_unit_without_an_order_one_jet_is_refused_at_capture() -> None:
    with pytest.raises(jetgraph.CaptureError, match=r"no order-1 jet.*aten\.lgamma") as info:
        jetgraph.capture(NoRuleResidual(), random_ids(1, 5))
    assert info.value.model_class == "NoRuleResidual"
    assert info.value.module is not None and info.value.module.startswith("mlp")


def test_jet_through_an_expanded_view_and_a_cast() -> None:
    # issue 27's second error: a rule wrote in place into an expanded (stride-0) series; and a
    # callable's dtype cast left an assert node without a rule
    x = torch.randn(3, 5, dtype=torch.float64)
    v = torch.randn(3, 5, dtype=torch.float64)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x.float()).unsqueeze(1).expand(-1, 4, -1) * 2.0

    result = jetgraph.jet(f, x, v, order=1, increment=True)
    expected = (2 * torch.cos(x) * v).float().unsqueeze(1).expand(-1, 4, -1)
    torch.testing.assert_close(result.coefficient(1), expected)


def test_shared_capture_binds_no_block_to_another_layers_weights() -> None:
    """A post-LN block's unit holds the previous layer's norm (the skip of the mixed step), so a
    copy of block 0's graph bound to layer 1's weights would be another model, even where its
    logits come out close (Marian's decoder: 1.6e-4 of their scale). Shared capture refuses such a
    stack (the caller then exports the whole model), whose blocks here have equal norms, so the
    logits alone could not tell."""
    from jetgraph.capture.shared import capture_shared

    config = transformers.MarianConfig(vocab_size=VOCAB, d_model=32, decoder_layers=3,
                                       decoder_attention_heads=4, decoder_ffn_dim=64, pad_token_id=0,
                                       decoder_start_token_id=0, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.MarianForCausalLM(config).eval()
    ids = random_ids(1, 6)
    assert capture_shared(model, ids, None, "block") is None
    prog = jetgraph.capture(model, ids)  # the whole model, exported once
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits
    assert prog.num_layers == 3
    torch.testing.assert_close(prog(ids), reference, rtol=1e-4, atol=1e-6)
