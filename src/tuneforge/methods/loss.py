"""Causal-LM loss on a packed row, computing the LM head only where a target exists.

With ``logits_to_keep=positions`` transformers projects just the ``L`` hidden states that carry a loss
through the (vocab-sized) LM head, instead of all ``T`` positions. For assistant-only SFT, ``L`` is a
small fraction of ``T``; logits are ``(L, V)`` instead of ``(T, V)``. When even those would be large
(long rows, every token trained) the loss is computed in chunks of positions without ever holding the
``(L, V)`` logits (:mod:`tuneforge.kernels.chunked_loss`).
"""

from __future__ import annotations

import torch

from tuneforge.data.packing import PackedBatch
from tuneforge.kernels.chunked_loss import chunked_cross_entropy_sum, lm_head_bypassed, use_chunked_loss
from tuneforge.kernels.cross_entropy import cross_entropy_segment_sums, cross_entropy_sum
from tuneforge.methods.dispatch import method_forward


def packed_loss_sum(model: torch.nn.Module, batch: PackedBatch, method: str = "lora",
                    chunked: str = "auto") -> torch.Tensor:
    """Sum (not mean) of token cross-entropies over the row's targets, in fp32.

    The logits come from :func:`tuneforge.methods.method_forward`, which keeps examples of the row from
    attending to each other for every method (prefix and prompt tuning need their own forward for that).
    ``chunked``: ``auto`` (chunk when the logits would exceed 256 MiB), ``on`` or ``off``.
    """
    return _packed_cross_entropy(model, batch, method, chunked, per_example=False)


def packed_example_loss_sums(model: torch.nn.Module, batch: PackedBatch, method: str = "lora",
                             chunked: str = "auto") -> torch.Tensor:
    """``[n]`` fp32: each example's summed token cross-entropy over its targets (a segment sum over
    ``batch.loss_example``); minus it is the example's completion log-probability, what preference
    objectives compare. Same forward and LM-head positions as :func:`packed_loss_sum`; the gradient flows."""
    return _packed_cross_entropy(model, batch, method, chunked, per_example=True)


def _packed_cross_entropy(model: torch.nn.Module, batch: PackedBatch, method: str, chunked: str,
                          per_example: bool) -> torch.Tensor:
    targets = batch.targets[0, batch.loss_positions]
    segment = batch.loss_example if per_example else None
    if per_example and segment is None:
        raise ValueError("per-example sums need a batch from tuneforge.data.packing.pack (it records loss_example)")
    if use_chunked_loss(model, targets.numel(), chunked):
        with lm_head_bypassed(model) as head:
            hidden = method_forward(model, method, batch.input_ids, batch.position_ids, batch.loss_positions,
                                    lengths=batch.lengths or None, cu_seqlens=batch.cu_seqlens)
        if segment is None:
            return chunked_cross_entropy_sum(hidden, head, targets)
        return chunked_cross_entropy_sum(hidden, head, targets, segment=segment, n=batch.num_examples)
    logits = method_forward(model, method, batch.input_ids, batch.position_ids, batch.loss_positions,
                            lengths=batch.lengths or None, cu_seqlens=batch.cu_seqlens)
    if segment is None:
        return cross_entropy_sum(logits, targets)
    return cross_entropy_segment_sums(logits, targets, segment, batch.num_examples)


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: list[PackedBatch], device: torch.device, method: str = "lora",
                  chunked: str = "auto") -> float:
    """Token-weighted mean loss over ``batches`` (the validation loss)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        if batch.num_loss_tokens == 0:
            continue
        total += packed_loss_sum(model, batch, method, chunked).item()
        count += batch.num_loss_tokens
    model.train(was_training)
    return total / max(count, 1)
