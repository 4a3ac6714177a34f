"""Tiny random models of the popular decoder families, built from configs (no downloads).

Each family function returns a transformers config with 2 layers, hidden size 64, and the family's own
features kept (grouped-query attention, Gemma's ``(1 + w)`` RMSNorm and soft-capping, query/key norms,
sliding windows smaller than the test rows so that they matter, tied or untied embeddings, Phi-3's fused
``qkv_proj`` / ``gate_up_proj``, MoE experts and router, GPT-NeoX's LayerNorm and fused attention).
:func:`save_tiny` writes one with the SmolLM2 tokenizer into a folder usable as ``model:`` in a run config.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)


def _config(model_type: str, **kwargs) -> PretrainedConfig:
    return AutoConfig.for_model(model_type, **{**COMMON, **kwargs})


def llama3() -> PretrainedConfig:
    """Llama 3: GQA (4 query heads, 2 key/value heads), untied embeddings, rope theta 500k."""
    return _config("llama", num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=False,
                   rope_theta=500000.0)


def mistral() -> PretrainedConfig:
    """Mistral: GQA and a sliding window (4 tokens, shorter than the test rows)."""
    return _config("mistral", num_key_value_heads=2, intermediate_size=128, sliding_window=4,
                   tie_word_embeddings=False)


def qwen2_5() -> PretrainedConfig:
    """Qwen 2.5 (small sizes): GQA, bias on q/k/v, tied embeddings."""
    return _config("qwen2", num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True)


def qwen3() -> PretrainedConfig:
    """Qwen3: GQA, query/key RMSNorm, head_dim set apart from hidden/heads, tied embeddings."""
    return _config("qwen3", num_key_value_heads=2, head_dim=32, intermediate_size=128, tie_word_embeddings=True)


def gemma2() -> PretrainedConfig:
    """Gemma 2: (1 + w) RMSNorm, attention and final-logit soft-capping, alternating sliding window, scaled
    embeddings, query_pre_attn_scalar, tied embeddings."""
    return _config("gemma2", num_key_value_heads=2, head_dim=16, intermediate_size=128, sliding_window=4,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16)


def gemma3() -> PretrainedConfig:
    """Gemma 3 (text): (1 + w) RMSNorm, query/key norm, sliding window on all but every 2nd layer."""
    return _config("gemma3_text", num_key_value_heads=2, head_dim=16, intermediate_size=128, sliding_window=4,
                   layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16)


def phi3() -> PretrainedConfig:
    """Phi-3: fused qkv_proj and gate_up_proj, untied embeddings."""
    return _config("phi3", num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=False)


def qwen3_moe() -> PretrainedConfig:
    """Qwen3-MoE: 4 experts, 2 per token, a router per layer, query/key norm."""
    return _config("qwen3_moe", num_key_value_heads=2, head_dim=16, intermediate_size=128, moe_intermediate_size=32,
                   num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                   tie_word_embeddings=False)


def gpt_neox() -> PretrainedConfig:
    """GPT-NeoX: LayerNorm (no RMSNorm), fused query_key_value, partial rotary, parallel residual."""
    return _config("gpt_neox", intermediate_size=128, rotary_pct=0.25, use_parallel_residual=True,
                   tie_word_embeddings=False)


# transformers has no SDPA path for Gemma 2 (its attention soft-capping): eager
ATTENTION = {"gemma2": "eager"}

MOE = {"qwen3-moe"}

FAMILIES = {"llama3": llama3, "mistral": mistral, "qwen2.5": qwen2_5, "qwen3": qwen3, "gemma2": gemma2,
            "gemma3": gemma3, "phi3": phi3, "qwen3-moe": qwen3_moe, "gpt-neox": gpt_neox}


def build(family: str, tokenizer, seed: int = 0, dtype: torch.dtype = torch.float32):
    """The family's tiny random model (eval mode) with ``tokenizer``'s vocabulary and special ids."""
    config = FAMILIES[family]()
    config.vocab_size = len(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    # MoE experts default to torch._grouped_mm, which has no float64 kernel: the loop over experts then
    experts = {"experts_implementation": "eager"} if dtype == torch.float64 and family in MOE else {}
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=ATTENTION.get(family, "sdpa"),
                                             **experts)
    return model.eval()


def save_tiny(family: str, tokenizer, folder: Path) -> Path:
    """Save the family's tiny model and ``tokenizer`` to ``folder`` (a ``model:`` value); return it."""
    build(family, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
