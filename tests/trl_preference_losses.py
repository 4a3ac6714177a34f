"""Run TRL 1.16's own preference-loss code on saved tensors (inside TRL's venv, not ours).

``python trl_preference_losses.py IN.pt OUT.pt``: ``IN.pt`` is a list of inputs, each with per-token
log-probabilities of the answers (``chosen_tok``, ``rejected_tok``: ``[n, T]``, zero outside each answer;
``chosen_mask``, ``rejected_mask``), reference sums and settings. For each DPO loss type,
``DPOTrainer._compute_loss`` itself runs with a stub model that returns these per-token log-probabilities
(what TRL's fused LM head returns); SimPO is ``CPOTrainer.cpo_loss`` on average log-probs, ORPO's
odds-ratio term ``ORPOTrainer.odds_ratio_loss``.
Writes, for each input, the mean loss and TRL's logged metrics per loss type to ``OUT.pt``.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from types import SimpleNamespace

import torch


def _accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x,
                           unwrap_model=lambda m: m)


def dpo(inp: dict, loss_type: str) -> dict:
    from trl import DPOTrainer

    n, T = inp["chosen_tok"].shape
    log_probs = torch.cat([inp["chosen_tok"], inp["rejected_tok"]])             # [2n, T]: per-token, shifted
    completion = torch.cat([inp["chosen_mask"], inp["rejected_mask"]]).long()   # [2n, T]
    completion_mask = torch.cat([torch.zeros(2 * n, 1, dtype=torch.long), completion], dim=1)   # unshifted
    outputs = SimpleNamespace(log_probs=log_probs, entropy=torch.zeros_like(log_probs),
                              mean_logits=torch.zeros_like(log_probs), is_top1=torch.zeros_like(completion).bool())
    model = SimpleNamespace(training=True)

    def forward(**kwargs):
        return outputs

    metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    stub = SimpleNamespace(model=model, accelerator=_accelerator(), aux_loss_enabled=False, ld_alpha=None,
                           precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
                           loss_weights=[1.0], beta=inp["beta"], label_smoothing=inp["label_smoothing"],
                           use_weighting=False, _metrics=metrics, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.ones(2 * n, T + 1, dtype=torch.long),
              "attention_mask": torch.ones(2 * n, T + 1, dtype=torch.long), "completion_mask": completion_mask,
              "ref_chosen_logps": inp["ref_chosen"], "ref_rejected_logps": inp["ref_rejected"]}
    loss = DPOTrainer._compute_loss(stub, forward, inputs, False)
    return {"loss": float(loss), **{k: v[-1] for k, v in metrics["train"].items()}}


def simpo(inp: dict) -> dict:
    from trl.experimental.cpo import CPOTrainer

    stub = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=inp["simpo_gamma"], beta=inp["beta"],
                           label_smoothing=inp["label_smoothing"], accelerator=_accelerator())
    chosen = inp["chosen_tok"].sum(1) / inp["chosen_mask"].sum(1)
    rejected = inp["rejected_tok"].sum(1) / inp["rejected_mask"].sum(1)
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(stub, chosen, rejected)
    return {"loss": float(losses.mean()), "rewards/chosen": float(chosen_rewards.mean()),
            "rewards/rejected": float(rejected_rewards.mean())}


def orpo(inp: dict) -> dict:
    from trl.experimental.orpo import ORPOTrainer

    stub = SimpleNamespace(beta=inp["beta"], accelerator=_accelerator())
    chosen = inp["chosen_tok"].sum(1) / inp["chosen_mask"].sum(1)
    rejected = inp["rejected_tok"].sum(1) / inp["rejected_mask"].sum(1)
    losses, chosen_rewards, rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(stub, chosen, rejected)
    # ORPOTrainer.get_batch_loss_metrics: loss = policy_nll_loss - losses.mean(), the NLL being the token mean of
    # the chosen answers' cross-entropy over the batch
    nll = -inp["chosen_tok"].sum() / inp["chosen_mask"].sum()
    return {"loss": float(nll - losses.mean()), "odds_ratio_loss": float(-losses.mean()),
            "rewards/chosen": float(chosen_rewards.mean()), "rewards/rejected": float(rejected_rewards.mean())}


def main(in_path: str, out_path: str) -> None:
    import trl

    out = []
    for inp in torch.load(in_path):
        row = {loss: dpo(inp, loss) for loss in ("sigmoid", "ipo", "hinge", "robust", "sft")}
        row["simpo"] = simpo(inp)
        row["orpo"] = orpo(inp)
        row["trl_version"] = trl.__version__
        out.append(row)
    torch.save(out, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:3])
