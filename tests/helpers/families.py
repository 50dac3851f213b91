"""Tiny random decoder models of the families users fine-tune, built from transformers configs.

Two layers, hidden width 16, grouped-query attention where the family has it, eager attention,
float64, no dropout, offline. ``VOCAB`` matches the shipped tiny-pythia tokenizer so the same models
can be handed to ``test_model_configuration``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tests.helpers.assets import tiny_gpt2, tiny_neox

VOCAB = 8192  # the tokenizer of bergson/assets/tiny-pythia

SHARED = dict(
    vocab_size=VOCAB,
    hidden_size=16,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=0,
    eos_token_id=0,
    attn_implementation="eager",
)
"""Settings every family's config spells the same way."""
COMMON = dict(SHARED, intermediate_size=32, num_hidden_layers=2)
GQA = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=4)


def _build(config_cls: str, model_cls: str, **kwargs) -> nn.Module:
    import transformers

    cfg = getattr(transformers, config_cls)(**{**COMMON, **kwargs})
    return getattr(transformers, model_cls)(cfg)


def gpt_neo() -> nn.Module:
    import transformers

    cfg = transformers.GPTNeoConfig(
        num_layers=2,
        num_heads=2,
        intermediate_size=32,
        attention_types=[[["global", "local"], 1]],
        window_size=4,  # shorter than the documents: the local layer's mask matters
        embed_dropout=0.0,
        attention_dropout=0.0,
        resid_dropout=0.0,
        **SHARED,
    )
    return transformers.GPTNeoForCausalLM(cfg)


def llama() -> nn.Module:
    return _build("LlamaConfig", "LlamaForCausalLM", **GQA)


def mistral() -> nn.Module:
    return _build("MistralConfig", "MistralForCausalLM", **GQA, sliding_window=4)


def qwen2() -> nn.Module:  # biases on q, k, v
    return _build("Qwen2Config", "Qwen2ForCausalLM", **GQA)


def qwen3() -> nn.Module:  # q/k RMS norms per head
    return _build("Qwen3Config", "Qwen3ForCausalLM", **GQA)


def olmo2() -> nn.Module:
    return _build("Olmo2Config", "Olmo2ForCausalLM", **GQA)


def gemma2() -> nn.Module:  # attention and final logit soft-capping, alternating sliding window
    return _build(
        "Gemma2Config",
        "Gemma2ForCausalLM",
        **GQA,
        sliding_window=4,
        query_pre_attn_scalar=4,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        layer_types=["sliding_attention", "full_attention"],
    )


def gemma3() -> nn.Module:  # text-only causal LM
    return _build(
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        **GQA,
        sliding_window=4,
        query_pre_attn_scalar=4,
        layer_types=["sliding_attention", "full_attention"],
    )


def phi3() -> nn.Module:  # fused qkv_proj and gate_up_proj
    return _build("Phi3Config", "Phi3ForCausalLM", num_attention_heads=4, num_key_value_heads=2)


def falcon() -> nn.Module:  # fused query_key_value, multi-query attention
    import transformers

    cfg = transformers.FalconConfig(
        num_hidden_layers=2,
        num_attention_heads=4,
        multi_query=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **SHARED,
    )
    return transformers.FalconForCausalLM(cfg)


def llama_lora() -> nn.Module:
    import peft

    base = llama()
    lora = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return peft.get_peft_model(base, lora)


FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "gpt2": lambda: tiny_gpt2(vocab=VOCAB),
    "gpt_neox": lambda: tiny_neox(vocab=VOCAB),
    "gpt_neo": gpt_neo,
    "llama": llama,
    "mistral": mistral,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "olmo2": olmo2,
    "gemma2": gemma2,
    "gemma3": gemma3,
    "phi3": phi3,
    "falcon": falcon,
    "llama_lora": llama_lora,
}


def make_family(name: str, seed: int = 0) -> nn.Module:
    """The family's tiny model, seeded, in float64, in eval mode."""
    torch.manual_seed(seed)
    return FAMILIES[name]().to(torch.float64).eval()
