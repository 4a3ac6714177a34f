"""AdamW for bf16 weights without an fp32 copy: fp32 moments and Kahan-compensated updates.

A bf16 weight near 1.0 moves in steps of 2^-8 (0.0039): an AdamW update of 1e-4 rounds to nothing, every step, and
a full fine-tune in plain bf16 silently stops learning once its updates get that small. Keeping an fp32 master
copy fixes it at 4 bytes per parameter. Kahan summation fixes it at 2: each weight keeps a bf16 compensation
buffer holding what rounding took from its last update, added to the next update before rounding again; the
pair (weight, compensation) carries about 16 bits of mantissa (Zamirai et al. 2020, "Revisiting BFloat16
Training"; optimi's Kahan-summed optimizers). The moments are fp32, as in a mixed-precision run. The update
is torch's AdamW (decoupled weight decay, bias correction); on fp32 weights this optimizer is that AdamW.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch


class CompensatedAdamW(torch.optim.Optimizer):
    """AdamW whose updates of low-precision (bf16/fp16) parameters are Kahan-compensated; state per parameter:
    ``step``, ``exp_avg`` and ``exp_avg_sq`` (fp32) and ``compensation`` (the parameter's dtype)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"CompensatedAdamW: invalid lr {lr}, betas {betas}, eps {eps} or weight_decay "
                             f"{weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32,
                                                           memory_format=torch.preserve_format)
                    state["compensation"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                grad = p.grad.float()
                exp_avg, exp_avg_sq, compensation = state["exp_avg"], state["exp_avg_sq"], state["compensation"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
                weight = p.to(torch.float32, copy=True)
                # the update torch's AdamW makes (decay first, then the moment step), plus what rounding kept back
                update = exp_avg.div(denom).mul_(-lr / (1 - beta1 ** t))
                if decay:
                    update.add_(weight, alpha=-lr * decay)
                update.add_(compensation.float())
                p.copy_(weight + update)                               # rounds to the parameter's dtype
                compensation.copy_(update.sub_(p.float() - weight))    # what that rounding lost
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, which casts every floating state to its parameter's dtype; the moments are put back in fp32,
        as saved (a bf16 round trip would lose what they hold)."""
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(saved_ids, params, strict=True):
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state_dict["state"].get(i, {}):
                    self.state[p][key] = state_dict["state"][i][key].to(device=p.device, dtype=torch.float32)
