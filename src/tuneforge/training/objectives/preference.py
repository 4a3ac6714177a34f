"""Preference fine-tuning (``task: preference``): DPO and its family on padding-free packed pairs.

A micro-batch of ``k`` pairs is one packed row of ``2k`` examples, ``chosen_0, rejected_0, chosen_1, ...``,
so a pair is never split across micro-batches and nothing is padded. One forward gives, from
:func:`tuneforge.methods.loss.packed_example_loss_sums` (fp32 segment sums over each example's answer
tokens; the LM head runs on those positions only), every answer's log-probability ``-sum``. The losses
are :mod:`tuneforge.training.preference_losses`; the loss sum is the sum of per-pair losses and the
normaliser the number of pairs, so the step's loss is the mean over all its pairs whatever the
accumulation (8 pairs x 1 == 2 x 4).

The reference model is the policy with its method disabled (:func:`tuneforge.methods.method_disabled`):
no second model in memory. By default (``preference.reference: precomputed``) its log-probabilities of
every train and validation pair are computed once, before the first step, in one no-grad pass with
dropout off, and stored on the pairs; full fine-tuning, which cannot be disabled, takes them from its
weights before the first step, i.e. from the base model. ``on_the_fly`` runs the disabled forward at
every step instead. ``simpo`` and ``orpo`` need no reference.

Metrics carry TRL's names: ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (and ``eval_``-prefixed on validation pairs,
where ``eval_loss`` is the mean preference loss that picks the best checkpoint).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from tuneforge.data.packing import PackedBatch, epoch_order, pack
from tuneforge.data.preference import TokenizedPair, prepare_pairs
from tuneforge.methods import get_method, method_disabled
from tuneforge.methods.loss import packed_example_loss_sums
from tuneforge.training.objectives.base import Objective, ObjectiveOutput
from tuneforge.training.preference_losses import REFERENCE_FREE, preference_loss

if TYPE_CHECKING:
    from tuneforge.config import RunConfig
    from tuneforge.data.dataset import PreparedData

log = logging.getLogger(__name__)

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

    def reference(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """The precomputed reference log-probabilities ``([k], [k])`` of the chosen and rejected answers."""
        if any(p.reference is None for p in self.pairs):
            raise RuntimeError("reference log-probabilities were not computed for these pairs "
                               "(PreferenceObjective.before_training)")
        ref = torch.tensor([p.reference for p in self.pairs], dtype=torch.float32, device=device)
        return ref[:, 0], ref[:, 1]


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


@contextlib.contextmanager
def reference_model(model: torch.nn.Module, config: RunConfig) -> Iterator[None]:
    """No grad, dropout off, and the method disabled (full fine-tuning: the model as it is)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if get_method(config.method).disable is None:
                yield
            else:
                with method_disabled(model, config):
                    yield
    finally:
        model.train(was_training)


class PreferenceObjective(Objective):
    eval_metric = "eval_loss"
    higher_is_better = False

    def prepare_data(self, config: RunConfig, tokenizer: Any) -> PreparedData:
        return prepare_pairs(config.data, tokenizer, config.seed)

    def micro_batches(self, examples: Sequence[Any], batch_size: int, seed: int, epoch: int, shuffle: bool = True,
                      start: int = 0) -> Iterator[PackedBatch]:
        return pair_micro_batches(examples, batch_size, seed, epoch, shuffle, start)

    def normaliser(self, batch: PackedBatch) -> float:
        return batch.num_examples // 2

    @staticmethod
    def needs_reference(config: RunConfig) -> bool:
        return config.preference.loss not in REFERENCE_FREE

    def before_training(self, model: torch.nn.Module, data: PreparedData, config: RunConfig,
                        device: torch.device) -> None:
        """``reference: precomputed``: every pair's reference log-probabilities, in one no-grad pass with the
        method disabled and dropout off, before the first step (for full fine-tuning: from the base weights)."""
        if not self.needs_reference(config) or config.preference.reference != "precomputed":
            return
        pairs = [p for p in [*data.train, *data.validation] if isinstance(p, TokenizedPair)]
        started = time.time()
        per_row = getattr(config, "eval_batch_size", None) or 4 * config.batch_size   # forward-only: larger rows
        batches = list(pair_micro_batches(pairs, per_row, config.seed, 0, shuffle=False))
        with reference_model(model, config):
            for batch in tqdm(batches, desc="reference log-probs", unit="batch", disable=not config.progress):
                chosen, rejected = answer_logps(model, batch.to(device), config)
                for pair, c, r in zip(batch.pairs, chosen.tolist(), rejected.tolist(), strict=True):
                    pair.reference = (c, r)
        log.info("reference log-probabilities of %d pairs computed in %.1fs (method disabled, dropout off)",
                 len(pairs), time.time() - started)

    def _reference(self, model: torch.nn.Module, batch: PairBatch,
                   config: RunConfig) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.needs_reference(config):
            return None, None
        if config.preference.reference == "precomputed":
            return batch.reference(batch.input_ids.device)
        with reference_model(model, config):
            return answer_logps(model, batch, config)

    def pair_losses(self, model: torch.nn.Module, batch: PairBatch,
                    config: RunConfig) -> tuple[torch.Tensor, dict[str, float]]:
        """(per-pair losses ``[k]`` with autograd, metric sums over the ``k`` pairs)."""
        pref = config.preference
        ref_chosen, ref_rejected = self._reference(model, batch, config)
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

    def loss(self, model: torch.nn.Module, batch: PackedBatch, config: RunConfig) -> ObjectiveOutput:
        if not isinstance(batch, PairBatch):
            raise TypeError("task 'preference' trains on PairBatch rows (PreferenceObjective.micro_batches)")
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
