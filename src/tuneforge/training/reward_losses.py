"""The reward model's loss: Bradley-Terry on chosen/rejected pairs, on per-pair scalar rewards (``[n]`` fp32).

Notation: ``r_c``, ``r_r`` the model's scalar rewards of the chosen and rejected sequences (the score head at
each sequence's last token), ``m`` the pair's optional margin (a ``margin`` column: how much better the chosen
answer is), ``sigma`` the logistic function, ``c`` the centering coefficient (Eisenstein et al. 2023, eq. 2).

Per pair: ``-log sigma(r_c - r_r - m) + c * (r_c + r_r)^2``. The objective sums them and the loop divides by
the pairs of the whole optimizer step, so the step's loss is the mean over pairs: TRL 1.16's
``RewardTrainer.compute_loss`` (``-logsigmoid(r_c - r_r - m).mean() + c * mean((r_c + r_r)^2)``), checked
against TRL's own code to 1e-6 in ``tests/test_reward_trl.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coefficient: float | None = None) -> torch.Tensor:
    """Per-pair losses ``[n]``: ``-log sigma(r_c - r_r - m)`` (``m``: ``margin [n]``, 0 when None), plus
    ``center_coefficient * (r_c + r_r)^2`` when set (keeps the rewards centred on 0)."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    losses = -F.logsigmoid(diff)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen + rejected) ** 2
    return losses
