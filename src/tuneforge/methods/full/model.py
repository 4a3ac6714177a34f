"""Full fine-tuning: every weight trains, optionally with the embeddings or some layers frozen.

Trainable parameters: all parameters (tied ``lm_head`` counted once with the embeddings) minus
``vocab * hidden`` with ``freeze_embeddings`` minus the parameters of each layer in ``freeze_layers``
(negative indices count from the last layer).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tuneforge.methods.full.config import FullConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def apply_full(model: PreTrainedModel, cfg: FullConfig) -> PreTrainedModel:
    for p in model.parameters():
        p.requires_grad_(True)
    if cfg.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    if not cfg.freeze_layers:
        return model
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.get_submodule("model")
    layers = list(inner.get_submodule("layers").children())      # model.model.layers; GPT-NeoX: gpt_neox.layers
    for index in cfg.freeze_layers:
        if not -len(layers) <= index < len(layers):
            raise ValueError(f"full.freeze_layers: layer {index} does not exist (the model has {len(layers)})")
        for p in layers[index].parameters():
            p.requires_grad_(False)
    return model


def load_full(base: torch.nn.Module, folder: str | Path, is_trainable: bool = False) -> PreTrainedModel:
    """The saved full model, in ``base``'s dtype (``base`` only supplies the dtype)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=next(base.parameters()).dtype)
    model.requires_grad_(is_trainable)
    return model
