"""Training objectives: what the loop minimises, behind one seam.

An :class:`~tuneforge.training.objectives.base.Objective` prepares its data, gives per micro-batch a loss
*sum*, the normaliser it is divided by (summed over the whole optimizer step) and metrics, and evaluates
a validation set with one metric and which way is better. The training loop (``training/trainer.py``)
does not know which objective runs. ``task:`` in the run config selects one:

| ``task:``  | objective                           | loss sum / normaliser                          |
|------------|-------------------------------------|------------------------------------------------|
| ``sft``    | :class:`CausalLMObjective`          | token cross-entropy / trained (assistant) tokens |
| ``pretrain`` | :class:`CausalLMObjective`        | token cross-entropy / all tokens               |
| ``preference`` | :class:`PreferenceObjective`    | DPO-family loss summed over pairs / pairs      |
| ``kto``    | :class:`KTOObjective`               | KTO loss summed over labelled examples / examples |
| ``reward`` | :class:`RewardObjective`            | Bradley-Terry loss summed over pairs / pairs   |
| ``grpo``   | :class:`GRPOObjective`              | clipped ratio loss on sampled completions / completions |
| ``distill`` | :class:`DistillObjective`          | teacher-student divergence (+ alpha x CE) / trained tokens |
"""

from __future__ import annotations

from tuneforge.training.objectives.base import Objective, ObjectiveOutput
from tuneforge.training.objectives.causal_lm import CausalLMObjective
from tuneforge.training.objectives.distill import DistillObjective
from tuneforge.training.objectives.grpo import GRPOObjective
from tuneforge.training.objectives.kto import KTOObjective
from tuneforge.training.objectives.preference import PreferenceObjective
from tuneforge.training.objectives.reward import RewardObjective

OBJECTIVES: dict[str, type[Objective]] = {"sft": CausalLMObjective, "pretrain": CausalLMObjective,
                                          "preference": PreferenceObjective, "kto": KTOObjective,
                                          "reward": RewardObjective, "grpo": GRPOObjective,
                                          "distill": DistillObjective}


def register_objective(task: str, objective: type[Objective]) -> None:
    """Make ``task: <task>`` run ``objective`` (a task registered twice is an error)."""
    if task in OBJECTIVES:
        raise ValueError(f"task {task!r} already has an objective ({OBJECTIVES[task].__name__})")
    OBJECTIVES[task] = objective


def get_objective(task: str) -> Objective:
    if task not in OBJECTIVES:
        raise ValueError(f"task {task!r} has no objective; tasks: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[task](task)


__all__ = ["OBJECTIVES", "CausalLMObjective", "DistillObjective", "GRPOObjective", "KTOObjective", "Objective",
           "ObjectiveOutput", "PreferenceObjective", "RewardObjective", "get_objective", "register_objective"]
