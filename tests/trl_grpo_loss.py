"""Run TRL 1.16's own GRPO code on saved tensors (inside TRL's venv, not ours).

``python trl_grpo_loss.py IN.pt OUT.pt``: ``IN.pt`` holds ``{"losses": [...], "advantages": [...]}``.

* Each of ``losses`` is one optimizer step: ``micro_batches`` (each with per-token log-probabilities ``logps``
  ``[n, T]``, ``old`` (or None: TRL then takes ``logps`` detached), ``ref``, ``advantages [n]``, ``mask [n, T]``) and
  the settings (``loss_type``, ``beta``, ``epsilon``, ``epsilon_high``, ``max_completion_length``). With ``dapo``
  every micro-batch carries the step's completion-token count as ``num_items_in_batch`` (TRL's generation batch is
  the step: ``steps_per_generation`` = the accumulation steps). ``GRPOTrainer._compute_loss`` itself runs on each
  micro-batch with a stub model returning these log-probabilities; the step's loss (TRL's losses summed: each is
  already divided by the accumulation steps) and each micro-batch's logged metrics are written.
* Each of ``advantages`` has ``scores [n, R]`` (NaN: not applicable), ``weights [R]``, ``num_generations`` and
  ``scale_rewards``: the advantage block of ``GRPOTrainer._generate_and_score_completions`` (its source text, cut
  between two of its own lines and run as it is) computes the advantages and the logged reward metrics.
"""

from __future__ import annotations

import inspect
import sys
import textwrap
from collections import defaultdict
from types import SimpleNamespace

import torch


def _accelerator():
    return SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0, gather=lambda x: x,
                           gather_for_metrics=lambda x: x, reduce=lambda x, reduction="sum": x, sync_gradients=True)


def step_loss(inp: dict) -> dict:
    from trl import GRPOTrainer

    micro = inp["micro_batches"]
    metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    model = SimpleNamespace(training=True)
    total, logged = 0.0, []
    for mb in micro:
        n, T = mb["logps"].shape
        stub = SimpleNamespace(
            model=model, accelerator=_accelerator(), aux_loss_enabled=False, top_entropy_quantile=1.0,
            off_policy_mask_threshold=None, importance_sampling_level="token", beta=inp["beta"],
            loss_type=inp["loss_type"], epsilon_low=inp["epsilon"],
            epsilon_high=inp["epsilon_high"] if inp["epsilon_high"] is not None else inp["epsilon"],
            use_vllm=False, vllm_importance_sampling_correction=False, _entropy_bonus_enabled=False,
            current_gradient_accumulation_steps=len(micro), max_completion_length=inp["max_completion_length"],
            args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=len(micro)),
            _metrics=metrics)
        stub._get_per_token_logps_and_entropies = (
            lambda model, input_ids, attention_mask, logits_to_keep, compute_entropy=False, compute_aux_loss=False,
            _lp=mb["logps"], **kw: (_lp, torch.zeros_like(_lp), None))
        stub.get_high_entropy_mask = None
        inputs = {"prompt_ids": torch.ones(n, 3, dtype=torch.long), "prompt_mask": torch.ones(n, 3, dtype=torch.long),
                  "completion_ids": torch.ones(n, T, dtype=torch.long), "completion_mask": mb["mask"].long(),
                  "advantages": mb["advantages"], "num_items_in_batch": torch.tensor(float(inp["num_items"]))}
        if mb.get("old") is not None:
            inputs["old_per_token_logps"] = mb["old"]
        if inp["beta"] != 0.0:
            inputs["ref_per_token_logps"] = mb["ref"]
        total += float(GRPOTrainer._compute_loss(stub, model, inputs))
        logged.append({k: v[-1] for k, v in metrics["train"].items()})
    return {"loss": total, "metrics": logged}


def _advantage_block() -> str:
    """TRL's advantage code and reward metrics, cut from ``_generate_and_score_completions``'s source."""
    from trl import GRPOTrainer

    lines = inspect.getsource(GRPOTrainer._generate_and_score_completions).splitlines()

    def cut(first: str, last: str) -> list[str]:
        start = next(i for i, line in enumerate(lines) if first in line)
        end = next(i for i in range(start, len(lines)) if last in lines[i])
        return lines[start:end + 1]

    block = cut("unscorable_mask = torch.isnan(rewards_per_func)", "advantages = torch.nan_to_num(advantages")
    block += cut("for i, reward_func_name in enumerate(self.reward_func_names):", '"frac_reward_zero_std"')
    return textwrap.dedent("\n".join(block))


def advantages(inp: dict) -> dict:
    from trl.trainer.utils import nanstd

    metrics = {"train": defaultdict(list)}
    n_funcs = inp["scores"].shape[1]
    stub = SimpleNamespace(multi_objective_aggregation="sum_then_normalize", scale_rewards=inp["scale_rewards"],
                           reward_weights=inp["weights"], reward_func_names=[f"f{i}" for i in range(n_funcs)],
                           _metrics=metrics)
    scope = {"self": stub, "torch": torch, "nanstd": nanstd, "rewards_per_func": inp["scores"].clone(),
             "num_generations": inp["num_generations"], "device": torch.device("cpu"), "mode": "train"}
    exec(_advantage_block(), scope)
    return {"advantages": scope["advantages"], **{k: v[-1] for k, v in metrics["train"].items()}}


def main(src: str, dst: str) -> None:
    import trl

    inp = torch.load(src)
    out = {"trl_version": trl.__version__, "losses": [step_loss(case) for case in inp["losses"]],
           "advantages": [advantages(case) for case in inp["advantages"]]}
    torch.save(out, dst)


if __name__ == "__main__":
    main(*sys.argv[1:3])
