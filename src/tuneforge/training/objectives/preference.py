"""Preference fine-tuning (``task: preference``): DPO and its family on padding-free packed pairs.

A micro-batch of ``k`` pairs is one packed row of ``2k`` examples, ``chosen_0, rejected_0, chosen_1, ...``,
so a pair is never split across micro-batches and nothing is padded. One forward gives, from
:func:`tuneforge.methods.loss.packed_example_loss_sums` (fp32 segment sums over each example's answer
tokens; the LM head runs on those positions only), every answer's log-probability ``-sum``. The losses
are :mod:`tuneforge.training.preference_losses`; the loss sum is the sum of per-pair losses and the
normaliser the number of pairs, so the step's loss is the mean over all its pairs whatever the
accumulation (8 pairs x 1 == 2 x 4).

The reference model is the model the policy started from, frozen (:mod:`.reference`): the policy with its
method disabled (the base model: no second model in memory), or with ``init_from`` the init run's model (the
base with that run's adapter, a frozen copy of the adapter swapped in). By default
(``preference.reference: precomputed``) the reference log-probabilities of a pair are computed once, no grad
and dropout off, the first time the pair is used: in the training step of its micro-batch (before the
policy's forward) or, for validation pairs, at the first evaluation; they are cached on the pair
(:attr:`TokenizedPair.reference`, two floats), so a later epoch reuses them and a run that visits part of the
data pays only for that part. The values do not depend on when they are computed (the reference never
changes), only on which pairs share the packed row, to float rounding; a resumed run computes again what it
needs (the cache is not saved). Full fine-tuning, whose reference is its own weights before the first step,
computes every train and validation pair before step 1. ``on_the_fly`` runs the reference forward for every
micro-batch instead. ``simpo`` and ``orpo`` need no reference. How many pairs were computed, and the time
they took, is logged at the first evaluation and at the end of training.

Metrics carry TRL's names: ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (and ``eval_``-prefixed on validation pairs,
where ``eval_loss`` is the mean preference loss that picks the best checkpoint).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch

from tuneforge.data.packing import PackedBatch, epoch_order, pack
from tuneforge.data.preference import TokenizedPair, prepare_pairs
from tuneforge.methods.loss import packed_example_loss_sums
from tuneforge.training.objectives.reference import ReferencedObjective
from tuneforge.training.preference_losses import REFERENCE_FREE, preference_loss

if TYPE_CHECKING:
    from tuneforge.config import RunConfig
    from tuneforge.data.dataset import PreparedData

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


@dataclass
class PairBatch(PackedBatch):
    """A packed row of pairs: examples ``2i`` and ``2i + 1`` are pair ``i``'s chosen and rejected sides."""

    pairs: list[TokenizedPair] = field(default_factory=list)

    @property
    def num_pairs(self) -> int:
        return len(self.pairs)

    def to(self, device: torch.device | str) -> PairBatch:
        moved = PackedBatch.to(self, device)
        return PairBatch(**{f.name: getattr(moved, f.name) for f in fields(PackedBatch)}, pairs=self.pairs)


def pack_pairs(pairs: Sequence[TokenizedPair]) -> PairBatch:
    """``pairs`` as one padding-free row of ``2 * len(pairs)`` examples (chosen, rejected, chosen, ...)."""
    row = pack([side for p in pairs for side in (p.chosen, p.rejected)])
    return PairBatch(**{f.name: getattr(row, f.name) for f in fields(PackedBatch)}, pairs=list(pairs))


def pair_micro_batches(pairs: Sequence[TokenizedPair], batch_size: int, seed: int, epoch: int, shuffle: bool = True,
                       start: int = 0) -> Iterator[PairBatch]:
    """One epoch of micro-batches of ``batch_size`` pairs in :func:`tuneforge.data.packing.epoch_order` (the order
    examples train in), from micro-batch ``start`` on."""
    for ids in epoch_order(len(pairs), batch_size, seed, epoch, shuffle, start):
        batch = pack_pairs([pairs[i] for i in ids])
        batch.example_ids = ids
        yield batch


def answer_logps(model: torch.nn.Module, batch: PackedBatch, config: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``([k], [k])``: the summed log-probabilities of each pair's chosen and rejected answer tokens."""
    logps = -packed_example_loss_sums(model, batch, config.method, config.chunked_loss)
    return logps[0::2], logps[1::2]


def answer_tokens(batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``([k], [k])`` answer token counts of the chosen and rejected sides."""
    assert batch.loss_example is not None
    counts = torch.bincount(batch.loss_example, minlength=batch.num_examples).float()
    return counts[0::2], counts[1::2]


class PreferenceObjective(ReferencedObjective):
    """The DPO family (module docstring); the reference log-probabilities, their cache and the validation loop are
    :class:`~tuneforge.training.objectives.reference.ReferencedObjective`'s, a unit being a pair."""

    eval_metric = "eval_loss"
    higher_is_better = False
    unit_name = "pairs"
    metric_names = METRICS

    def prepare_data(self, config: RunConfig, tokenizer: Any) -> PreparedData:
        return prepare_pairs(config.data, tokenizer, config.seed)

    def micro_batches(self, examples: Sequence[Any], batch_size: int, seed: int, epoch: int, shuffle: bool = True,
                      start: int = 0) -> Iterator[PackedBatch]:
        return pair_micro_batches(examples, batch_size, seed, epoch, shuffle, start)

    def needs_reference(self, config: RunConfig) -> bool:
        return config.preference.loss not in REFERENCE_FREE

    def reference_setting(self, config: RunConfig) -> str:
        return config.preference.reference

    def pack_units(self, units: Sequence[Any]) -> PackedBatch:
        return pack_pairs(units)

    def units(self, batch: PackedBatch) -> list[Any]:
        if not isinstance(batch, PairBatch):
            raise TypeError("task 'preference' trains on PairBatch rows (PreferenceObjective.micro_batches)")
        return batch.pairs

    def sequence_logps(self, model: torch.nn.Module, batch: PackedBatch, config: RunConfig) -> torch.Tensor:
        return torch.stack(answer_logps(model, batch, config), dim=1)

    def _reference(self, model: torch.nn.Module, batch: PairBatch, config: RunConfig,
                   split: str = "train") -> tuple[torch.Tensor | None, torch.Tensor | None]:
        ref = self.reference_logps(model, batch, config, split)
        return (None, None) if ref is None else (ref[:, 0], ref[:, 1])

    def unit_losses(self, model: torch.nn.Module, batch: PackedBatch, config: RunConfig,
                    split: str = "train") -> tuple[torch.Tensor, dict[str, float]]:
        """(per-pair losses ``[k]`` with autograd, metric sums over the ``k`` pairs); the reference first (computed
        now for pairs that have none: ``split`` counts them as train or validation pairs)."""
        assert isinstance(batch, PairBatch)
        pref = config.preference
        ref_chosen, ref_rejected = self._reference(model, batch, config, split)
        chosen, rejected = answer_logps(model, batch, config)
        chosen_tokens, rejected_tokens = (t.to(chosen.device) for t in answer_tokens(batch))
        sft_weight = pref.sft_weight if pref.sft_weight is not None else (1.0 if pref.loss == "orpo" else 0.0)
        losses, chosen_rewards, rejected_rewards = preference_loss(
            pref.loss, chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens, pref.beta,
            pref.label_smoothing, pref.simpo_gamma, sft_weight)
        metrics = {
            "rewards/chosen": chosen_rewards.sum().item(),
            "rewards/rejected": rejected_rewards.sum().item(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum().item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum().item(),
            "logps/chosen": chosen.detach().sum().item(),
            "logps/rejected": rejected.detach().sum().item(),
        }
        return losses, metrics

