"""A zoo of tiny models built to break assumptions, each saved as a folder with its tokenizer.

The conformance matrix (``tests/test_conformance.py``, ``benchmarks/conformance.py``,
docs/conformance.md) runs every public entry point on every family here. Each family breaks one
assumption a feature could silently rest on:

==================  ==========================================================================
family              what it breaks
==================  ==========================================================================
``gpt2``            learned positions, LayerNorm with biases, tied embeddings; a tokenizer that
                    adds no start token (the default read-out mixes over expected first tokens)
``llama_bos``       a tokenizer whose post-processor adds BOS (``tok("a")`` starts with it,
                    ``add_special_tokens=False`` does not); RMSNorm, RoPE, tied embeddings
``llama_untied``    untied embeddings, biases on attention and MLP projections, grouped key-value
                    heads; no BOS
``gemma3_mixed``    sliding (window 4) and full attention in one stack, two RoPE bases, a
                    scaled embedding, pre- and post-norms; inputs longer than the window
``mixtral_moe``     a top-2 routed mixture of experts, untied, BOS
``qwen2_moe``       routed experts plus a gated shared expert, no BOS
``sparse_vocab``    a 24,000-token vocabulary at hidden size 16 whose low ids are ``<pad>``,
                    ``<bos>``, ``<eos>``, ``<unk>``, 99 ``<unusedN>``, 256 byte tokens
                    ``<0x00>``…``<0xFF>`` and HTML tags, ordinary words only after them (as in
                    Gemma 3's tokenizer); their (tied) embeddings are doubled, so the model
                    predicts them most: rows "chosen by the model" must leave them out; BOS, tied
``gpt_neox``        parallel attention and MLP in one block (from :mod:`.zoo`), no BOS
``hyper_connections``  two residual streams per position mixed by input-dependent weights
                    (DeepSeek-V4's manifold hyper-connections), hash-routed MoE, no BOS
``per_layer_inputs``   every layer also reads a projection of the token embeddings (Gemma 4), BOS
==================  ==========================================================================

Every tokenizer is a real ``tokenizers`` WordLevel model (lower-casing, whitespace split)
wrapped in ``transformers.PreTrainedTokenizerFast``; its ordinary words start with a few English
words, so ``"The capital of France is"`` encodes to real tokens. Models are random-init, in eval
mode, with eager attention (the matrix's reference is the Hugging Face model run directly).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from jetgraph.capture.zoo import _configs

SLIDING, FULL = "sliding_attention", "full_attention"
WORDS = ("the capital of france is a once upon time there was little girl who lived in small house "
         "with her mother and father she liked to play outside garden one day saw big red ball").split()
HTML_TAGS = ("<div>", "</div>", "<p>", "</p>", "<span>", "</span>", "<a>", "</a>", "<b>", "</b>", "<i>",
             "</i>", "<br>", "<table>", "</table>", "<tr>", "<td>", "<li>", "<ul>", "<h1>")
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0..3 in every zoo tokenizer
BOS_ID, EOS_ID, PAD_ID = 1, 2, 0


@dataclass(frozen=True)
class Family:
    """One zoo family: how to build its config, and the tokenizer that goes with it.

    ``vocab``: the model's vocabulary (the tokenizer fills it exactly). ``bos``: whether the
    tokenizer's post-processor adds ``<bos>`` before a text. ``placeholders``: ``<unusedN>``,
    byte and HTML tokens at the low ids. ``tied``: input and output embeddings shared.
    ``parallel``: attention and MLP read the same stream state in each block. ``breaks``: the
    assumption the family is there to break, in words."""

    name: str
    config: Callable[[], object]
    vocab: int
    bos: bool
    tied: bool
    breaks: str
    placeholders: bool = False
    parallel: bool = False


def _common(vocab: int, tied: bool) -> dict:
    return dict(vocab_size=vocab, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                tie_word_embeddings=tied, attn_implementation="eager")


def _gpt2() -> object:
    config = _configs(2)["gpt2"]()
    config.pad_token_id, config.bos_token_id, config.eos_token_id = PAD_ID, BOS_ID, EOS_ID
    config._attn_implementation = "eager"
    return config


def _gpt_neox() -> object:
    config = _configs(2)["gpt_neox"]()
    config.pad_token_id, config.bos_token_id, config.eos_token_id = PAD_ID, BOS_ID, EOS_ID
    config._attn_implementation = "eager"
    return config


def _llama_bos() -> object:
    import transformers

    return transformers.LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    **_common(192, True))


def _llama_untied() -> object:
    # not Qwen2: transformers 5 loads any folder of model type qwen2 with its Qwen2Tokenizer, whatever
    # tokenizer the folder holds (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS), so the zoo's would be lost
    import transformers

    return transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    attention_bias=True, mlp_bias=True, **_common(128, False))


def _gemma3_mixed() -> object:
    import transformers

    return transformers.Gemma3TextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8, max_position_embeddings=64,
        sliding_window=4,
        layer_types=[SLIDING, SLIDING, FULL, SLIDING, FULL],
        rope_parameters={SLIDING: {"rope_type": "default", "rope_theta": 10.0},
                         FULL: {"rope_type": "default", "rope_theta": 10000.0}},
        **_common(160, True))


def _mixtral_moe() -> object:
    import transformers

    return transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                      num_experts_per_tok=2, max_position_embeddings=64,
                                      **_common(128, False))


def _qwen2_moe() -> object:
    import transformers

    return transformers.Qwen2MoeConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                                       shared_expert_intermediate_size=48, num_experts=4,
                                       num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, max_position_embeddings=64,
                                       **_common(128, False))


def _hyper_connections() -> object:
    import transformers

    return transformers.DeepseekV4Config(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, qk_rope_head_dim=8, q_lora_rank=32,
        o_groups=2, o_lora_rank=16, index_n_heads=2, index_head_dim=16, index_topk=4,
        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, num_hash_layers=1,
        hc_mult=2, hc_sinkhorn_iters=3, sliding_window=8, max_position_embeddings=64,
        **_common(128, False))


def _per_layer_inputs() -> object:
    import transformers

    return transformers.Gemma4TextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, global_head_dim=8, max_position_embeddings=64,
        sliding_window=4, layer_types=[SLIDING, FULL], hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=128, **_common(128, True))


SPARSE_VOCAB = 24_000


def _sparse_vocab() -> object:
    import transformers

    return transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                    **_common(SPARSE_VOCAB, True))


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("gpt2", _gpt2, 128, bos=False, tied=True,
           breaks="learned positions, LayerNorm with biases, tied; no BOS (mixture read-out)"),
    Family("llama_bos", _llama_bos, 192, bos=True, tied=True,
           breaks="a tokenizer that adds BOS; RMSNorm, RoPE, tied"),
    Family("llama_untied", _llama_untied, 128, bos=False, tied=False,
           breaks="untied embeddings, attention and MLP biases, grouped KV heads; no BOS"),
    Family("gemma3_mixed", _gemma3_mixed, 160, bos=True, tied=True,
           breaks="sliding (window 4) + full attention, two RoPE bases, scaled embedding; BOS"),
    Family("mixtral_moe", _mixtral_moe, 128, bos=True, tied=False,
           breaks="top-2 routed mixture of experts, untied; BOS"),
    Family("qwen2_moe", _qwen2_moe, 128, bos=False, tied=False,
           breaks="routed experts + gated shared expert; no BOS"),
    Family("sparse_vocab", _sparse_vocab, SPARSE_VOCAB, bos=True, tied=True, placeholders=True,
           breaks="V=24,000 at d=16; special, <unusedN>, byte and HTML tokens at the low ids; BOS, tied"),
    Family("gpt_neox", _gpt_neox, 128, bos=False, tied=False, parallel=True,
           breaks="parallel attention + MLP per block; no BOS"),
    Family("hyper_connections", _hyper_connections, 128, bos=False, tied=False,
           breaks="2 residual streams [batch, seq, 2, d] mixed by input-dependent (Sinkhorn) "
                  "weights, hash-routed MoE, sinks (DeepSeek-V4); no BOS"),
    Family("per_layer_inputs", _per_layer_inputs, 128, bos=True, tied=True,
           breaks="every layer reads a projection of the token embeddings (Gemma 4); BOS, tied"),
)}


def vocabulary(family: Family) -> list[str]:
    """The tokenizer's tokens in id order: the four specials, then (``placeholders``) 99
    ``<unusedN>``, 256 ``<0xNN>`` byte tokens and HTML tags, then ordinary words (:data:`WORDS`,
    then ``w<id>`` fillers) up to ``family.vocab``."""
    tokens = list(SPECIALS)
    if family.placeholders:
        tokens += [f"<unused{i}>" for i in range(99)] + [f"<0x{b:02X}>" for b in range(256)] + list(HTML_TAGS)
    tokens += list(WORDS)
    tokens += [f"w{i}" for i in range(len(tokens), family.vocab)]
    if len(tokens) != family.vocab:
        raise ValueError(f"{family.name}: {len(tokens)} tokens for a vocabulary of {family.vocab}")
    return tokens


def build_tokenizer(family: Family) -> object:
    """A ``PreTrainedTokenizerFast`` over :func:`vocabulary`: WordLevel, lower-cased, split on
    whitespace; with ``family.bos`` a TemplateProcessing post-processor puts ``<bos>`` before
    every text (``add_special_tokens=False`` leaves it out)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = vocabulary(family)
    raw = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    raw.normalizer = normalizers.Lowercase()
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    if family.bos:
        raw.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def first_ordinary(family: Family) -> int:
    """The id of the first ordinary word (after the specials and any placeholders)."""
    return len(SPECIALS) + (99 + 256 + len(HTML_TAGS) if family.placeholders else 0)


def build_model(family: Family | str, seed: int = 0) -> nn.Module:
    """The family's random-init model (seeded), in eval mode, eager attention. With
    ``placeholders`` the embeddings below :func:`first_ordinary` are doubled (tied: the model then
    predicts those tokens most, 19 of its top 20)."""
    import transformers

    family = FAMILIES[family] if isinstance(family, str) else family
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(family.config(), attn_implementation="eager")
    if family.placeholders:
        with torch.no_grad():
            model.get_input_embeddings().weight[: first_ordinary(family)] *= 2
    return model.eval()


def save_family(family: Family | str, folder: str | os.PathLike, seed: int = 0) -> Path:
    """Build the family's model and tokenizer and save both to ``folder`` (``config.json``,
    ``model.safetensors``, ``tokenizer.json``): what ``jetgraph.load_model``, ``load_lazy`` and
    the command line read."""
    family = FAMILIES[family] if isinstance(family, str) else family
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_model(family, seed).save_pretrained(folder)
    build_tokenizer(family).save_pretrained(folder)
    return folder
