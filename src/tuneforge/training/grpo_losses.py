"""GRPO's advantages and clipped policy-ratio loss, as pure functions on tensors (``task: grpo``).

Notation: ``G`` completions per prompt (a *group*), ``n = prompts x G`` completions in a micro-batch (group ``j``
is rows ``j*G .. j*G+G-1``), ``T`` the longest completion, ``mask [n, T]`` 1 on completion tokens (the end-of-turn
token included), ``logp``, ``logp_old``, ``logp_ref [n, T]`` per-token log-probabilities of the completion under
the policy (with grad), the policy that sampled it (detached), and the reference model.

**Advantages** (:func:`group_advantages`): the weighted sum of the reward functions' scores ``r = sum_k w_k r_k``
(a score of None is NaN: "does not apply", left out of the sums), then ``A = r - mean_group(r)``, divided by
``std + 1e-4`` where ``scale_rewards`` is ``group`` (the group's std, Bessel-corrected) or ``batch`` (the std over
all ``n``), not divided with ``none`` (Dr. GRPO). A completion no function scored gets ``A = 0``.

**Per token** (:func:`per_token_losses`): ``ratio = exp(logp - logp_old)``,
``loss_t = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * kl_t`` with the k3 estimate
``kl_t = exp(logp_ref - logp) - (logp_ref - logp) - 1`` (no KL term when ``beta == 0``).

**Per micro-batch** (:func:`loss_sum`): a *sum* and the units it is divided by over the whole optimizer step (the
loop adds both over the step's micro-batches), chosen so that sum / units equals TRL's loss summed over its
gradient-accumulation micro-batches (TRL divides each by the accumulation steps), for micro-batches of the same
number of completions:

=========== ================================================= =========================================
``loss``    sum of a micro-batch                              units
=========== ================================================= =========================================
``grpo``    sum over completions of the completion's token     completions
            mean (each sequence weighs the same)
``bnpo``    the micro-batch's token mean x its completions     completions (so: the mean over micro-batches)
``dr_grpo`` token sum / ``max_completion_length``              completions
``dapo``    token sum                                          completion tokens (of the whole step)
=========== ================================================= =========================================

All equal TRL 1.16's ``GRPOTrainer._compute_loss`` and its advantage code on the same tensors to 1e-6
(``tests/test_grpo_trl.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
STD_EPS = 1e-4


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bessel-corrected std ignoring NaNs (NaN where fewer than 2 values)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(variance, float("nan")))
    std = torch.sqrt(variance * correction)
    return std.squeeze() if dim is None else std.squeeze(dim)


@dataclass
class Advantages:
    """:func:`group_advantages`'s result: ``advantages [n]``, ``rewards [n]`` (the weighted sums; NaN where no
    function scored), ``zero_std [n]`` bool (the completion's group, or the batch with ``scale_rewards: batch``,
    has rewards of zero std: nothing to learn from it)."""

    advantages: torch.Tensor
    rewards: torch.Tensor
    zero_std: torch.Tensor


def group_advantages(scores: torch.Tensor, weights: torch.Tensor, group_size: int,
                     scale_rewards: str = "group") -> Advantages:
    """``scores [n, R]`` (NaN: the function does not apply), ``weights [R]``: the group-normalised advantages
    (module docstring)."""
    if scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} completions are not whole groups of {group_size}")
    unscored = torch.isnan(scores).all(dim=1)
    rewards = (scores * weights.to(scores)[None]).nansum(dim=1)
    rewards[unscored] = torch.nan
    mean = torch.nanmean(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size)
    if scale_rewards in ("group", "none"):
        std = (nanstd(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size) if group_size > 1
               else torch.zeros_like(rewards))
    elif scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        raise ValueError(f"scale_rewards {scale_rewards!r}: group, batch or none")
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPS)
    zero_std = torch.isclose(std, torch.zeros_like(std))
    return Advantages(torch.nan_to_num(advantages, nan=0.0), rewards, zero_std)


@dataclass
class TokenLosses:
    """:func:`per_token_losses`'s result, ``[n, T]`` each: the loss, the k3 KL (None with ``beta == 0``), and where the
    ratio was clipped below (``A < 0``) and above (``A > 0``)."""

    loss: torch.Tensor
    kl: torch.Tensor | None
    low_clipped: torch.Tensor
    high_clipped: torch.Tensor


def per_token_losses(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
                     advantages: torch.Tensor, beta: float, epsilon_low: float, epsilon_high: float) -> TokenLosses:
    """The clipped policy-ratio loss of each completion token (module docstring); ``advantages [n]``."""
    adv = advantages[:, None]
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference log-probabilities")
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        loss = loss + beta * kl
    return TokenLosses(loss, kl, (ratio < 1 - epsilon_low) & (adv < 0), (ratio > 1 + epsilon_high) & (adv > 0))


def loss_sum(token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str,
             max_completion_length: int) -> tuple[torch.Tensor, float]:
    """(the micro-batch's loss sum, its units) for ``loss_type`` (the table of the module docstring);
    ``token_loss``, ``mask [n, T]``."""
    mask = mask.to(token_loss.dtype)
    masked = token_loss * mask
    n = token_loss.shape[0]
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum(), float(n)
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0) * n, float(n)
    if loss_type == "dr_grpo":
        return masked.sum() / max_completion_length, float(n)
    if loss_type == "dapo":
        return masked.sum(), float(mask.sum().item())
    raise ValueError(f"loss_type {loss_type!r}: one of {', '.join(LOSS_TYPES)}")
