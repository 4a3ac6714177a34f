"""The optimizer tuneforge trains with: torch's AdamW, fused where torch has a fused kernel for the parameters.

torch's default AdamW on CPU loops over the parameters in Python (LoRA on SmolLM2: 420 tensors, ~10 ops
each); ``fused=True`` runs one kernel per parameter group and device: 37 -> 15 ms a step on the bench,
the same update up to float rounding.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

FUSED_DEVICE_TYPES = ("cpu", "cuda")


def adamw(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over ``params`` (fused when every parameter is a dense float tensor on a CPU or CUDA device)."""
    params = list(params)
    fused = bool(params) and all(p.is_floating_point() and not p.is_sparse and p.device.type in FUSED_DEVICE_TYPES
                                 for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
