"""Small random-init models of every supported family, for tests, examples and benchmarks.

All configs share a tiny size (d=32, 2 layers, vocab 128) so a capture takes a few seconds.
``ResidualMLP`` is a plain torch residual network, not from transformers, to show that capture
needs no Hugging Face structure. :mod:`.conformance_zoo` adds families built to break
assumptions (a BOS-adding tokenizer, mixed sliding/full attention, MoE, a large sparse
vocabulary), each saved with its tokenizer, for the conformance matrix (docs/conformance.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

VOCAB = 128


def _configs(layers: int = 2) -> dict[str, Callable[[], object]]:
    import transformers as tf

    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    n = layers
    return {
        "gpt2": lambda: tf.GPT2Config(n_embd=32, n_layer=n, n_head=4, n_positions=64, **common),
        "gpt_neo": lambda: tf.GPTNeoConfig(
            hidden_size=32, num_layers=n, num_heads=4, attention_types=[[["global", "local"], n // 2]],
            window_size=4, max_position_embeddings=64, **common),
        "gpt_neox": lambda: tf.GPTNeoXConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=n, num_attention_heads=4,
            use_parallel_residual=True, max_position_embeddings=64, **common),
        "gpt_neox_sequential": lambda: tf.GPTNeoXConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=n, num_attention_heads=4,
            use_parallel_residual=False, max_position_embeddings=64, **common),
        "gptj": lambda: tf.GPTJConfig(n_embd=32, n_layer=n, n_head=4, rotary_dim=4, n_positions=64,
                                      **common),
        "llama": lambda: tf.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=n, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, **common),
        "mistral": lambda: tf.MistralConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=n, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, sliding_window=4, **common),
        "qwen2": lambda: tf.Qwen2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=n, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, **common),
        "gemma": lambda: tf.GemmaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=n, num_attention_heads=4,
            num_key_value_heads=1, head_dim=8, max_position_embeddings=64, **common),
        "opt": lambda: tf.OPTConfig(
            hidden_size=32, ffn_dim=64, num_hidden_layers=n, num_attention_heads=4,
            word_embed_proj_dim=32, do_layer_norm_before=True, max_position_embeddings=64, **common),
        "phi": lambda: tf.PhiConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=n, num_attention_heads=4,
            partial_rotary_factor=0.5, max_position_embeddings=64, **common),
    }


FAMILIES: tuple[str, ...] = (
    "gpt2", "gpt_neo", "gpt_neox", "gpt_neox_sequential", "gptj", "llama", "mistral", "qwen2",
    "gemma", "opt", "phi", "residual_mlp",
)
PARALLEL_FAMILIES: tuple[str, ...] = ("gpt_neox", "gptj", "phi")


class ResidualMLP(nn.Module):
    """Embedding, L residual units h + W2·act(W1·LN(h)), final LayerNorm and readout."""

    def __init__(self, vocab: int = VOCAB, d: int = 32, hidden: int = 64, layers: int = 3,
                 activation: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, hidden), activation(), nn.Linear(hidden, d))
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d)
        self.readout = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for block in self.blocks:
            h = h + block(h)
        return self.readout(self.norm(h))


class HyperConnectedMLP(nn.Module):
    """A residual MLP on ``streams`` parallel residual streams (hyper-connections with static
    mixing, the simplest form): the stream is [batch, seq, n, d]; the encoder writes the token
    embedding into every stream; block ℓ reads the mix ``Σ_i a_ℓi·H_i`` and writes its output
    into stream i scaled by ``b_ℓi``; the decoder reads ``Σ_i c_i·H_i``. Every block is still
    ``H + γ(H)``, so the model is one additive stream with a per-position shape [n, d]."""

    def __init__(self, vocab: int = VOCAB, d: int = 16, hidden: int = 32, layers: int = 2,
                 streams: int = 2) -> None:
        super().__init__()
        self.streams = streams
        self.embed = nn.Embedding(vocab, d)
        self.read = nn.Parameter(torch.randn(layers, streams) / streams)  # a_ℓ
        self.write = nn.Parameter(torch.randn(layers, streams))  # b_ℓ
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
            for _ in range(layers)
        )
        self.collapse = nn.Parameter(torch.randn(streams) / streams)  # c
        self.norm = nn.LayerNorm(d)
        self.readout = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        e = self.embed(input_ids)
        h = e.unsqueeze(-2).expand(*e.shape[:-1], self.streams, e.shape[-1])
        for layer, block in enumerate(self.blocks):
            update = block(torch.einsum("bsnd,n->bsd", h, self.read[layer]))
            h = h + self.write[layer][:, None] * update.unsqueeze(-2)
        return self.readout(self.norm(torch.einsum("bsnd,n->bsd", h, self.collapse)))


def tiny_model(family: str, seed: int = 0, layers: int | None = None) -> nn.Module:
    """A random-init model of ``family`` (one of :data:`FAMILIES`), in eval mode, with 2 layers
    (3 for the residual MLP) unless ``layers`` says otherwise (even for gpt_neo, whose layers
    alternate global and local attention)."""
    torch.manual_seed(seed)
    if family == "residual_mlp":
        return ResidualMLP(layers=layers or 3).eval()
    if family == "hyper_mlp":  # not in FAMILIES: the multi-stream tests (tests/test_streams.py)
        return HyperConnectedMLP(layers=layers or 2).eval()
    if layers is not None and (layers < 1 or (family == "gpt_neo" and layers % 2)):
        raise ValueError(f"layers must be a positive integer (even for gpt_neo), got {layers}")
    configs = _configs(layers or 2)
    if family not in configs:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    import transformers

    return transformers.AutoModelForCausalLM.from_config(configs[family]()).eval()


def gpt2_small_config(layers: int = 12, **overrides: object) -> object:
    """A GPT-2-small-size config (d=768, 12 heads) for benchmarks; ``overrides`` replace any field
    (``n_embd=1024, n_head=16``: GPT-2 medium's width)."""
    import transformers

    return transformers.GPT2Config(**{"n_embd": 768, "n_layer": layers, "n_head": 12, **overrides})
