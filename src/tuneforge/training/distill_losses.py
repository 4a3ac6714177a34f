"""Logit distillation's divergences per token (``task: distill``), apart from the loop.

For ``K`` trained positions, the student's logits ``z_s [K, V]`` and the teacher's ``z_t [K, V]`` (logits or
log-probabilities: a constant shift per row changes nothing) are turned into distributions at temperature ``T``::

    s = log_softmax(z_s / T)        t = log_softmax(z_t / T)

and each position's divergence is GKD's generalised Jensen-Shannon divergence (Agarwal et al. 2024, eq. 1, as TRL's
``GKDTrainer.generalized_jsd_loss`` computes it)::

    beta = 0:   KL(t || s) = sum_v e^t (t - s)                  forward KL: the student covers the teacher's mass
    beta = 1:   KL(s || t) = sum_v e^s (s - t)                  reverse KL: the student seeks the teacher's modes
    otherwise:  m = log(beta e^t + (1 - beta) e^s)
                JSD_beta = beta KL(t || m) + (1 - beta) KL(s || m)

TRL's loss is the mean of these over the trained tokens (``batchmean`` with labels), without a ``T^2`` factor; the
objective sums them and divides by the step's trained tokens, the same mean.

**Top-k teacher.** With the teacher's log-probs on a support of ``k`` token ids per position (``support [K, k]``,
a cached top-k), both distributions are restricted to that support and renormalised on it (``s`` from
``z_s.gather(support)``), so every divergence above stays finite (the teacher's mass off the support is unknown,
and a reverse KL against a teacher that is 0 there would be infinite). With ``k = V`` the support is a permutation
of the vocabulary and the value equals the full one (to float rounding).
"""

from __future__ import annotations

import math

import torch

DIVERGENCE_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0}


def loss_beta(loss: str, beta: float) -> float:
    """The generalised JSD's ``beta`` of ``distill.loss`` (``jsd``: ``distill.beta``)."""
    return DIVERGENCE_BETA.get(loss, beta)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature: float = 1.0,
                    support: torch.Tensor | None = None) -> torch.Tensor:
    """``[K]`` fp32 (fp64 for fp64 inputs): each position's generalised JSD (module docstring).

    ``student_logits [K, V]`` (with autograd); ``teacher_logits [K, V]``, or ``[K, k]`` on ``support [K, k]`` (token
    ids); ``beta`` in ``[0, 1]``; ``temperature > 0``."""
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    z_s = student_logits.to(dtype)
    if support is not None:
        z_s = z_s.gather(1, support)
    s = torch.log_softmax(z_s / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    if beta == 0:
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1)
    m = torch.logsumexp(torch.stack([s + math.log1p(-beta), t + math.log(beta)]), dim=0)
    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)


def token_cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[K]`` fp32: ``-log softmax(z_s)[target]`` at temperature 1 (the SFT loss mixed in with ``alpha``)."""
    logits = student_logits.float()
    return torch.logsumexp(logits, dim=-1) - logits.gather(1, targets[:, None]).squeeze(1)
