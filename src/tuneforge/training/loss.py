"""Causal-LM loss on a packed row, computing the LM head only where a target exists.

With ``logits_to_keep=positions`` transformers projects just the ``L`` hidden states that carry a loss
through the (vocab-sized) LM head, instead of all ``T`` positions. For assistant-only SFT, ``L`` is a
small fraction of ``T``; logits are ``(L, V)`` instead of ``(T, V)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge.data.packing import PackedBatch
from tuneforge.methods import method_forward


def packed_loss_sum(model: torch.nn.Module, batch: PackedBatch, method: str = "lora") -> torch.Tensor:
    """Sum (not mean) of token cross-entropies over the row's targets, in fp32.

    The logits come from :func:`tuneforge.methods.method_forward`, which keeps examples of the row from
    attending to each other for every method (prefix and prompt tuning need their own forward for that).
    """
    logits = method_forward(model, method, batch.input_ids, batch.position_ids, batch.loss_positions)
    targets = batch.targets[0, batch.loss_positions]
    return F.cross_entropy(logits.float(), targets, reduction="sum")


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: list[PackedBatch], device: torch.device, method: str = "lora") -> float:
    """Token-weighted mean loss over ``batches`` (the validation loss)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        if batch.num_loss_tokens == 0:
            continue
        total += packed_loss_sum(model, batch, method).item()
        count += batch.num_loss_tokens
    model.train(was_training)
    return total / max(count, 1)
