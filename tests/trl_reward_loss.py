"""Run TRL 1.16's ``RewardTrainer.compute_loss`` itself on saved rewards (inside TRL's venv, not ours).

``python trl_reward_loss.py IN.pt OUT.pt``: ``IN.pt`` is a list of inputs, each with the rewards of ``n`` pairs'
chosen and rejected sequences (``chosen``, ``rejected``: ``[n]``), a ``margin`` (``[n]`` or None) and a
``center_rewards_coefficient`` (a float or None). ``compute_loss`` runs with a stub model whose ``logits`` are
those rewards (``[2n, 1]``: the chosen rows, then the rejected, as TRL's collator stacks them). Writes, for each
input, the loss and TRL's logged metrics to ``OUT.pt``.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from types import SimpleNamespace

import torch


def reward_loss(inp: dict) -> dict:
    from trl import RewardTrainer

    n = inp["chosen"].shape[0]
    logits = torch.cat([inp["chosen"], inp["rejected"]])[:, None]
    model = SimpleNamespace(training=True)

    def forward(**kwargs):
        return SimpleNamespace(logits=logits)

    accelerator = SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x)
    metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    stub = SimpleNamespace(model=model, accelerator=accelerator, _metrics=metrics, _total_train_tokens=0, _tp_size=1,
                           args=SimpleNamespace(center_rewards_coefficient=inp["center_rewards_coefficient"]))
    inputs = {"input_ids": torch.ones(2 * n, 4, dtype=torch.long),
              "attention_mask": torch.ones(2 * n, 4, dtype=torch.long)}
    if inp["margin"] is not None:
        inputs["margin"] = inp["margin"]
    loss = RewardTrainer.compute_loss(stub, forward, inputs)
    return {"loss": float(loss), **{k: v[-1] for k, v in metrics["train"].items()}}


def main(in_path: str, out_path: str) -> None:
    import trl

    results = [{"trl_version": trl.__version__, **reward_loss(inp)} for inp in torch.load(in_path)]
    torch.save(results, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
