"""Preference losses, one small function each, on per-pair quantities (all ``[n]`` fp32 tensors).

Notation: ``c``, ``r`` the policy's summed log-probabilities of the chosen and rejected answers (their
completion tokens only), ``c_ref``, ``r_ref`` the reference model's, ``n_c``, ``n_r`` the answers' token
counts, ``sigma`` the logistic function, ``beta`` the temperature. DPO's implicit reward of an answer is
``beta * (logp - logp_ref)`` and ``delta = (c - c_ref) - (r - r_ref)`` their difference over ``beta``.

Each function returns the **per-pair** losses ``[n]``; the objective sums them and the loop divides by
the pairs of the whole optimizer step, so the loss is the mean over pairs. The formulas are TRL 1.16's
(``DPOTrainer`` for sigmoid/ipo/hinge/robust, ``CPOTrainer`` for simpo, ``ORPOTrainer`` for orpo),
checked against TRL's own code to 1e-6 in ``tests/test_preference_trl.py``.

KTO (``task: kto``) has no pairs: :func:`kto_loss` takes one completion per example with a label (desirable or
not) and the batch's KL estimate :func:`kl_estimate`; TRL 1.16's ``KTOTrainer._compute_loss``, checked in
``tests/test_kto.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

REFERENCE_FREE = ("simpo", "orpo")


def sigmoid_loss(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023): ``-log sigma(beta * delta)``."""
    return -F.logsigmoid(beta * delta)


def hinge_loss(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC hinge: ``max(0, 1 - beta * delta)``."""
    return torch.relu(1 - beta * delta)


def ipo_loss(chosen_ratio: torch.Tensor, rejected_ratio: torch.Tensor, chosen_tokens: torch.Tensor,
             rejected_tokens: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17) on per-token log-ratios, as TRL does:
    ``((c - c_ref) / n_c - (r - r_ref) / n_r - 1 / (2 beta))^2``."""
    delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
    return (delta - 1 / (2 * beta)) ** 2


def robust_loss(delta: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024) for labels flipped with probability ``eps = label_smoothing``:
    ``(-(1 - eps) log sigma(beta delta) + eps log sigma(-beta delta)) / (1 - 2 eps)``."""
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)


def simpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO (Meng et al. 2024), reference-free on length-normalised log-probs ``c / n_c``, ``r / n_r``, with
    the target margin ``gamma``: ``x = beta (c/n_c - r/n_r) - gamma``, loss
    ``-(1 - eps) log sigma(x) - eps log sigma(-x)``."""
    x = beta * (chosen_avg - rejected_avg) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable at both ends (Maechler 2012): ``log(-expm1(x))`` for
    ``x > -ln 2``, ``log1p(-exp(x))`` below."""
    t = -math.log(2)   # each branch sees only its own side of t, so the unused one cannot put a NaN in the gradient
    return torch.where(x > t, torch.log(-torch.expm1(x.clamp(min=t))), torch.log1p(-torch.exp(x.clamp(max=t))))


def orpo_odds_ratio_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float) -> torch.Tensor:
    """ORPO's odds-ratio term (Hong et al. 2024, eqs. 4 and 7) on length-normalised log-probs
    ``a = c/n_c``, ``b = r/n_r``: ``log_odds = (a - b) - (log(1 - e^a) - log(1 - e^b))``, loss
    ``-beta log sigma(log_odds)`` (``beta`` is the paper's lambda). ORPO adds the chosen answer's NLL
    (``sft_weight`` 1 by default)."""
    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
    return -beta * F.logsigmoid(log_odds)


def preference_loss(loss: str, chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor | None,
                    ref_rejected: torch.Tensor | None, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
                    beta: float, label_smoothing: float = 0.0, simpo_gamma: float = 0.5, sft_weight: float = 0.0,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards), each ``[n]``.

    Rewards are TRL's: ``beta * (logp - logp_ref)`` for the losses with a reference, ``beta * logp / n``
    for simpo and orpo. ``sft_weight`` adds ``sft_weight * (-c / n_c)``, the chosen answer's mean token
    NLL, to each pair (RPO; ORPO's own NLL term). Rewards are detached.
    """
    chosen_avg, rejected_avg = chosen / chosen_tokens.clamp(min=1), rejected / rejected_tokens.clamp(min=1)
    if loss in REFERENCE_FREE:
        chosen_rewards, rejected_rewards = beta * chosen_avg.detach(), beta * rejected_avg.detach()
        losses = (simpo_loss(chosen_avg, rejected_avg, beta, simpo_gamma, label_smoothing) if loss == "simpo"
                  else orpo_odds_ratio_loss(chosen_avg, rejected_avg, beta))
    else:
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f"preference loss {loss!r} needs the reference log-probabilities")
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        delta = chosen_ratio - rejected_ratio
        if loss == "sigmoid":
            losses = sigmoid_loss(delta, beta)
        elif loss == "hinge":
            losses = hinge_loss(delta, beta)
        elif loss == "ipo":
            losses = ipo_loss(chosen_ratio, rejected_ratio, chosen_tokens, rejected_tokens, beta)
        elif loss == "robust":
            losses = robust_loss(delta, beta, label_smoothing)
        else:
            raise ValueError(f"unknown preference loss {loss!r}")
        chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    if sft_weight:
        losses = losses - sft_weight * chosen_avg
    return losses, chosen_rewards, rejected_rewards


KTO_LOSSES = ("kto", "apo_zero_unpaired")


def mismatched_partners(k: int) -> list[int]:
    """KTO's mismatched pairs of a batch of ``k`` examples: prompt ``i`` with completion ``(i - 1) mod k``, i.e. the
    completions rotated by one, ``[k - 1, 0, 1, ..., k - 2]`` (TRL's ``[c[-1]] + c[:-1]``). The mismatched
    completions are the batch's own, paired with other prompts (the paper's advice); ``k == 1`` pairs an example with
    itself."""
    return [(i - 1) % k for i in range(k)]


def kl_estimate(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point ``z0`` (Ethayarajh et al. 2024, eq. 7 and sec. 4.1): the batch's estimate of
    ``KL(pi || pi_ref)``, the mean over its mismatched pairs ``(x_i, y_j)`` of ``log pi(y_j|x_i) - log
    pi_ref(y_j|x_i)`` (``[k]`` each), clamped at 0 and detached: a fp32 scalar no gradient flows through."""
    return (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0, loss: str = "kto",
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-example losses ``[n]``, rewards ``[n]``, detached) of ``n`` completions with summed log-probabilities
    ``logps`` (``ref_logps`` the reference's) and labels ``desirable`` (``[n]`` bool).

    With ``r = logps - ref_logps`` and ``z0 = kl`` (:func:`kl_estimate`):

    - ``kto`` (eq. 7 of the KTO paper): desirable ``w_d * (1 - sigma(beta (r - z0)))``, undesirable
      ``w_u * (1 - sigma(beta (z0 - r)))``;
    - ``apo_zero_unpaired`` (APO-zero, D'Oosterlinck et al. 2024, unpaired; no KL term): desirable
      ``w_d * (1 - sigma(beta r))``, undesirable ``w_u * sigma(beta r)``.

    The reward of a completion is ``beta * r``. The objective sums the losses and divides by the examples of the
    optimizer step: TRL's ``losses.nanmean()``.
    """
    ratio = logps - ref_logps
    if loss == "kto":
        desirable_losses = 1 - torch.sigmoid(beta * (ratio - kl))
        undesirable_losses = 1 - torch.sigmoid(beta * (kl - ratio))
    elif loss == "apo_zero_unpaired":
        desirable_losses = 1 - torch.sigmoid(beta * ratio)
        undesirable_losses = torch.sigmoid(beta * ratio)
    else:
        raise ValueError(f"unknown KTO loss {loss!r}; losses: {', '.join(KTO_LOSSES)}")
    losses = torch.where(desirable, desirable_weight * desirable_losses, undesirable_weight * undesirable_losses)
    return losses, beta * ratio.detach()
