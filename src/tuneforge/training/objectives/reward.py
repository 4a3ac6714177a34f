"""Reward models (``task: reward``): a scalar head on the model, trained with Bradley-Terry on chosen/rejected pairs.

The data are the preference pairs of ``task: preference`` (:mod:`tuneforge.data.preference`, with an optional
numeric ``margin`` per pair), in the same padding-free micro-batches: ``k`` pairs are one packed row of ``2k``
examples, ``chosen_0, rejected_0, chosen_1, ...`` (:func:`.preference.pair_micro_batches`), and one forward of the
method's model gives every sequence's reward, the head ``score`` at its last token
(:func:`tuneforge.methods.reward_head.packed_rewards`). The per-pair losses are
:func:`tuneforge.training.reward_losses.bradley_terry_loss` (``reward.center_rewards_coefficient`` adds the
centering term); the loss sum is their sum and the normaliser the number of pairs, so a step's loss is the mean
over its pairs whatever the accumulation, as TRL's ``RewardTrainer`` computes it.

The head is attached before the first step (:meth:`RewardObjective.before_training`: a trainable fp32
``[1, H]`` weight the optimizer trains with the method's parameters, LoRA or full), restored by ``--resume`` with
the other trained parameters, and written in every checkpoint beside the method's files
(:data:`tuneforge.methods.reward_head.HEAD_FILE`), so the run's output holds it. ``init_from`` a reward run also
continues its head; from any other run the head starts fresh.

Metrics carry TRL's names: ``accuracy`` (share of pairs whose chosen reward is the higher), ``margin`` (mean
``r_c - r_r``), ``rewards/chosen``, ``rewards/rejected``; on validation pairs ``eval_``-prefixed, with
``eval_loss``. ``eval_accuracy`` (higher is better) picks the best checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tuneforge.data.packing import PackedBatch
from tuneforge.data.preference import prepare_pairs
from tuneforge.methods.reward_head import HEAD_FILE, add_score_head, load_score_head, packed_rewards, save_score_head
from tuneforge.training.objectives.base import Objective, ObjectiveOutput
from tuneforge.training.objectives.preference import PairBatch, pair_micro_batches
from tuneforge.training.reward_losses import bradley_terry_loss

if TYPE_CHECKING:
    from tuneforge.config import RunConfig
    from tuneforge.data.dataset import PreparedData

METRICS = ("accuracy", "margin", "rewards/chosen", "rewards/rejected")


def pair_rewards(model: torch.nn.Module, batch: PairBatch, config: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``([k], [k])``: the rewards of each pair's chosen and rejected sequences, from one packed forward."""
    rewards = packed_rewards(model, batch, config.method)
    return rewards[0::2], rewards[1::2]


def pair_margins(batch: PairBatch, device: torch.device | str) -> torch.Tensor | None:
    """``[k]`` fp32: each pair's ``margin`` (0 for a pair without one), or None when no pair of the batch has one."""
    if all(p.margin is None for p in batch.pairs):
        return None
    return torch.tensor([p.margin or 0.0 for p in batch.pairs], dtype=torch.float32, device=device)


class RewardObjective(Objective):
    """Bradley-Terry reward modelling (module docstring)."""

    eval_metric = "eval_accuracy"
    higher_is_better = True

    def prepare_data(self, config: RunConfig, tokenizer: Any) -> PreparedData:
        return prepare_pairs(config.data, tokenizer, config.seed)

    def micro_batches(self, examples: Sequence[Any], batch_size: int, seed: int, epoch: int, shuffle: bool = True,
                      start: int = 0) -> Iterator[PackedBatch]:
        return pair_micro_batches(examples, batch_size, seed, epoch, shuffle, start)

    def normaliser(self, batch: PackedBatch) -> float:
        return batch.num_examples // 2

    def before_training(self, model: torch.nn.Module, data: PreparedData, config: RunConfig,
                        device: torch.device) -> None:
        """Attach the score head (``init_from`` a reward run: with that run's head)."""
        if config.init_from and (Path(config.init_from) / HEAD_FILE).is_file():
            load_score_head(model, config.init_from)
        else:
            add_score_head(model)

    def save(self, model: torch.nn.Module, folder: Path) -> None:
        save_score_head(model, folder)

    def pair_losses(self, model: torch.nn.Module, batch: PairBatch,
                    config: RunConfig) -> tuple[torch.Tensor, dict[str, float]]:
        """(per-pair losses ``[k]`` with autograd, metric sums over the ``k`` pairs)."""
        chosen, rejected = pair_rewards(model, batch, config)
        losses = bradley_terry_loss(chosen, rejected, pair_margins(batch, chosen.device),
                                    config.reward.center_rewards_coefficient)
        c, r = chosen.detach(), rejected.detach()
        metrics = {"accuracy": (c > r).float().sum().item(), "margin": (c - r).sum().item(),
                   "rewards/chosen": c.sum().item(), "rewards/rejected": r.sum().item()}
        return losses, metrics

    def loss(self, model: torch.nn.Module, batch: PackedBatch, config: RunConfig) -> ObjectiveOutput:
        if not isinstance(batch, PairBatch):
            raise TypeError("task 'reward' trains on PairBatch rows (RewardObjective.micro_batches)")
        losses, metrics = self.pair_losses(model, batch, config)
        return ObjectiveOutput(losses.sum(), batch.num_pairs, metrics)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batches: list[PackedBatch], device: torch.device,
                 config: RunConfig) -> dict[str, float]:
        was_training = model.training
        model.eval()
        total, pairs = 0.0, 0
        sums = dict.fromkeys(METRICS, 0.0)
        for batch in batches:
            assert isinstance(batch, PairBatch)
            losses, metrics = self.pair_losses(model, batch.to(device), config)
            total += losses.sum().item()
            pairs += batch.num_pairs
            for key, value in metrics.items():
                sums[key] += value
        model.train(was_training)
        out = {"eval_loss": total / max(pairs, 1)}
        out.update({f"eval_{key}": value / max(pairs, 1) for key, value in sums.items()})
        return out
