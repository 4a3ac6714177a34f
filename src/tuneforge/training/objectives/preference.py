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

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from tuneforge.data.packing import PackedBatch, epoch_order, pack
from tuneforge.data.preference import TokenizedPair, prepare_pairs
from tuneforge.methods import get_method
from tuneforge.methods.loss import packed_example_loss_sums
from tuneforge.training.objectives.base import Objective, ObjectiveOutput
from tuneforge.training.objectives.reference import FrozenWeights, reference_model
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
                               "(PreferenceObjective.compute_references)")
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


class PreferenceObjective(Objective):
    """The DPO family (module docstring). ``init_weights``: the frozen init adapter (``init_from``), the reference;
    ``computed``: how many train and validation pairs' reference log-probabilities were computed, and their time
    in seconds (None for a loss without a reference)."""

    eval_metric = "eval_loss"
    higher_is_better = False

    def __init__(self, task: str) -> None:
        super().__init__(task)
        self.init_weights: FrozenWeights | None = None
        self.computed: dict[str, float] | None = None

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
        """With ``init_from``: keep the init adapter (the trained parameters now, before a resumed run loads its
        own) as the frozen reference. Full fine-tuning with ``reference: precomputed``: every pair's reference
        log-probabilities now, from the weights before the first step. Everything else is computed on demand."""
        self.init_weights = self.computed = None
        if not self.needs_reference(config):
            return
        if config.init_from:
            self.init_weights = FrozenWeights(model)
            log.info("reference: the init_from run's model (its adapter kept frozen: %.1f MiB)",
                     self.init_weights.bytes / 2**20)
        self.computed = {"train": 0, "validation": 0, "seconds": 0.0}
        if get_method(config.method).disable is None and config.preference.reference == "precomputed":
            per_row = getattr(config, "eval_batch_size", None) or 4 * config.batch_size   # forward-only: larger rows
            for split in ("train", "validation"):
                pairs = [p for p in getattr(data, split) if isinstance(p, TokenizedPair)]
                self.compute_references(model, pairs, config, device, per_row, progress=config.progress, split=split)
            log.info("reference log-probabilities of %d train and %d validation pairs computed before step 1 in "
                     "%.1fs (full fine-tuning: from the weights before the first step)", self.computed["train"],
                     self.computed["validation"], self.computed["seconds"])

    def compute_references(self, model: torch.nn.Module, pairs: Sequence[TokenizedPair], config: RunConfig,
                           device: torch.device | str, per_row: int | None = None, progress: bool = False,
                           split: str = "train", packed: PairBatch | None = None) -> int:
        """Compute and cache (``pair.reference``) the reference log-probabilities of those ``pairs`` that have
        none yet, ``per_row`` pairs a packed row (default: all in one), no grad, with the reference model; returns
        how many were computed. ``packed``: ``pairs`` already packed on ``device`` (a micro-batch), used as it is
        when none of them has a reference yet."""
        missing = [p for p in pairs if p.reference is None]
        if not missing:
            return 0
        started = time.perf_counter()
        per_row = per_row or len(missing)
        rows = [missing[i:i + per_row] for i in range(0, len(missing), per_row)]
        with reference_model(model, config, self.init_weights):
            for row in tqdm(rows, desc="reference log-probs", unit="batch", disable=not progress):
                whole = packed is not None and len(row) == len(packed.pairs)
                batch = packed if packed is not None and whole else pack_pairs(row).to(device)
                chosen, rejected = answer_logps(model, batch, config)
                for pair, c, r in zip(row, chosen.tolist(), rejected.tolist(), strict=True):
                    pair.reference = (c, r)
        if self.computed is not None:
            self.computed[split] += len(missing)
            self.computed["seconds"] += time.perf_counter() - started
        return len(missing)

    def _reference(self, model: torch.nn.Module, batch: PairBatch, config: RunConfig,
                   split: str = "train") -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.needs_reference(config):
            return None, None
        device = batch.input_ids.device
        if config.preference.reference == "precomputed":
            self.compute_references(model, batch.pairs, config, device, split=split, packed=batch)
            return batch.reference(device)
        with reference_model(model, config, self.init_weights):
            return answer_logps(model, batch, config)

    def after_training(self) -> None:
        if self.computed is not None and self.computed["train"] + self.computed["validation"]:
            log.info("reference log-probabilities computed once for %d train and %d validation pairs, in %.1fs",
                     self.computed["train"], self.computed["validation"], self.computed["seconds"])

    def pair_losses(self, model: torch.nn.Module, batch: PairBatch, config: RunConfig,
                    split: str = "train") -> tuple[torch.Tensor, dict[str, float]]:
        """(per-pair losses ``[k]`` with autograd, metric sums over the ``k`` pairs); the reference first (computed
        now for pairs that have none: ``split`` counts them as train or validation pairs)."""
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
        before = dict(self.computed or {})
        for batch in batches:
            assert isinstance(batch, PairBatch)
            losses, metrics = self.pair_losses(model, batch.to(device), config, split="validation")
            total += losses.sum().item()
            pairs += batch.num_pairs
            for key, value in metrics.items():
                sums[key] += value
        model.train(was_training)
        if self.computed is not None and self.computed["validation"] > before.get("validation", 0):
            log.info("reference log-probabilities of %d validation pairs computed in %.1fs (once: cached for the "
                     "later evaluations)", self.computed["validation"] - before["validation"],
                     self.computed["seconds"] - before["seconds"])
        out = {"eval_loss": total / max(pairs, 1)}
        out.update({f"eval_{key}": value / max(pairs, 1) for key, value in sums.items()})
        return out
