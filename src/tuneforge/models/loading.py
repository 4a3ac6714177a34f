"""Load a base model and its tokenizer, ready for training or inference."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tuneforge.models.registry import DEFAULT_MODEL, resolve_model
from tuneforge.models.remote_code import check_remote_code

log = logging.getLogger(__name__)


def load_tokenizer(model: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the tokenizer of ``model`` (a spec accepted by :func:`resolve_model` or a folder).

    The pad token is only used to fill generation batches; training is padding-free, and loss masks
    come from token offsets, never from ``input_ids == pad_token_id`` (SmolLM2 ships pad == eos).
    A model that ships its own code is refused unless ``trust_remote_code`` (:mod:`.remote_code`).
    """
    path = resolve_model(str(model))
    check_remote_code(str(model), path, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def flush_denormals() -> None:
    """Treat denormal floats as zero (FTZ/DAZ), a cheap guard for CPUs where denormal arithmetic is slow.

    On our 2-core AMD EPYC CI machines no denormal penalty was measured (benchmarks/NOTES.md); a 20x
    slowdown first blamed on denormals turned out to be two OpenMP threads competing with other busy
    processes. Kept because it costs nothing and helps on CPUs that do pay for denormals.
    """
    torch.set_flush_denormal(True)


def load_model(model: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               attn_implementation: str = "sdpa", trust_remote_code: bool = False) -> PreTrainedModel:
    flush_denormals()
    path = resolve_model(str(model))
    check_remote_code(str(model), path, trust_remote_code)
    m = from_pretrained_attention(path, attn_implementation, dtype=dtype, trust_remote_code=trust_remote_code)
    return m.to(device)


def from_pretrained_attention(path: str | Path, attn_implementation: str = "sdpa", **kwargs) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with ``attn_implementation``; where that is SDPA and the class has
    no SDPA path (Gemma 2: its soft-capped scores), eager. Every loader of a base model goes through here."""
    try:
        return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation, **kwargs)
    except ValueError as e:
        if attn_implementation != "sdpa" or "scaled_dot_product_attention" not in str(e):
            raise
        return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", **kwargs)


def tiny_config_from(model: str | Path, num_hidden_layers: int = 2, hidden_size: int = 64,
                     intermediate_size: int = 128, num_attention_heads: int = 4, num_key_value_heads: int = 2):
    """A small config of the same architecture and vocabulary as ``model``: for fast unit tests."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model(str(model)))
    config.num_hidden_layers = num_hidden_layers
    config.hidden_size = hidden_size
    config.intermediate_size = intermediate_size
    config.num_attention_heads = num_attention_heads
    config.num_key_value_heads = num_key_value_heads
    config.head_dim = hidden_size // num_attention_heads
    return config


def build_tiny_model(model: str | Path = DEFAULT_MODEL, seed: int = 0, **sizes) -> PreTrainedModel:
    """A randomly initialised small model with the real architecture and vocabulary (tests, benchmarks)."""
    torch.manual_seed(seed)
    config = tiny_config_from(model, **sizes)
    m = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    m.eval()
    return m
