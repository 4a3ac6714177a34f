"""KTO (``task: kto``): thumbs-up / thumbs-down data without pairs, on padding-free packed rows.

A micro-batch of ``k`` examples (prompt + completion, labelled desirable or not: :mod:`tuneforge.data.kto`) is
one packed row of ``k`` examples, trained with grad; the completion's summed log-probability comes from
:func:`tuneforge.methods.loss.packed_example_loss_sums` as the DPO family's answers do. The loss
(:func:`tuneforge.training.preference_losses.kto_loss`) compares it with the reference model's, which is the
preference objective's (:class:`~tuneforge.training.objectives.reference.ReferencedObjective`: the base with the
method disabled, or the ``init_from`` model; cached on the example the first time it is used with
``kto.reference: precomputed``, or computed for every micro-batch ``on_the_fly``).

The KL estimate (``kto.loss: kto``), as the KTO paper and TRL's ``KTOTrainer``: the micro-batch's completions
rotated by one (:func:`~tuneforge.training.preference_losses.mismatched_partners`: prompt ``i`` with completion
``i - 1``) make a second packed row of ``k`` mismatched sequences, built from tokens
(:func:`tuneforge.data.kto.mismatched_sequence`, cut to ``data.max_length``); the policy's log-probabilities of
it (no grad, the model's current mode, as TRL) minus the reference's, averaged over the row, clamped at 0 and
detached, is ``z0`` for every example of the micro-batch. The mismatched pairs change with every micro-batch, so
their reference log-probabilities are computed in each step (one no-grad forward of ``k`` sequences), never
cached; full fine-tuning, which has no reference model beside the policy, trains ``kto.loss: apo_zero_unpaired``
only (the config refuses ``kto``).

**Gradient accumulation.** The loss sum is the sum of the examples' weighted losses and the normaliser the number
of examples, so the step's loss is the mean over all its examples whatever the accumulation. The KL estimate,
however, is per micro-batch, as TRL's (its ``KL_completion_ids`` are rotated within each per-device batch and its
``kl`` averaged over that batch): 2 x 4 equals 1 x 8 exactly for ``apo_zero_unpaired`` (no KL term) and for
``kto`` when both estimates clamp to 0 (e.g. the first step, policy == reference); otherwise the two runs differ
by the KL estimate of 4 pairs against that of 8. Several processes (DDP) estimate it on each process's own
micro-batch (TRL averages it over the processes).

Metrics carry TRL's names (the ``chosen`` ones are the desirable examples, the ``rejected`` ones the undesirable):
``kl`` (the estimate, averaged over the step's examples), ``rewards/chosen``, ``rewards/rejected`` (the mean
reward ``beta * (logp - logp_ref)`` of the desirable and of the undesirable examples), ``rewards/margins`` (the
first minus the second), ``logps/chosen``, ``logps/rejected``; a step without examples of a label has none of its
means. Validation: ``eval_loss`` (the mean KTO loss, which picks the best checkpoint) and the same, ``eval_``-
prefixed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch

from tuneforge.data.kto import KTOExample, mismatched_sequence, prepare_kto
from tuneforge.data.packing import PackedBatch, epoch_order, pack
from tuneforge.methods.loss import packed_example_loss_sums
from tuneforge.training.objectives.reference import ReferencedObjective, reference_model
from tuneforge.training.preference_losses import kl_estimate, kto_loss, mismatched_partners

if TYPE_CHECKING:
    from tuneforge.config import RunConfig
    from tuneforge.data.dataset import PreparedData

LABELS = {"chosen": True, "rejected": False}      # TRL's metric names: desirable = chosen
METRICS = ("kl", *(f"{kind}/{label}" for kind in ("rewards", "logps", "count") for label in LABELS))


@dataclass
class KTOBatch(PackedBatch):
    """A packed row of KTO examples (example ``i`` is ``examples[i]``: prompt + completion)."""

    examples: list[KTOExample] = field(default_factory=list)

    def to(self, device: torch.device | str) -> KTOBatch:
        moved = PackedBatch.to(self, device)
        return KTOBatch(**{f.name: getattr(moved, f.name) for f in fields(PackedBatch)}, examples=self.examples)

    def desirable(self, device: torch.device | str) -> torch.Tensor:
        """``[k]`` bool: each example's label."""
        return torch.tensor([e.desirable for e in self.examples], dtype=torch.bool, device=device)

    def mismatched(self, max_length: int) -> PackedBatch:
        """The row of KTO's mismatched sequences: prompt ``i`` with the completion of example
        :func:`mismatched_partners` ``(k)[i]``, each cut to ``max_length``."""
        partners = mismatched_partners(len(self.examples))
        return pack([mismatched_sequence(e, self.examples[j], max_length)
                     for e, j in zip(self.examples, partners, strict=True)])


def pack_kto(examples: Sequence[KTOExample]) -> KTOBatch:
    """``examples`` as one padding-free row."""
    row = pack(examples)
    return KTOBatch(**{f.name: getattr(row, f.name) for f in fields(PackedBatch)}, examples=list(examples))


def kto_micro_batches(examples: Sequence[KTOExample], batch_size: int, seed: int, epoch: int, shuffle: bool = True,
                      start: int = 0) -> Iterator[KTOBatch]:
    """One epoch of micro-batches of ``batch_size`` examples in :func:`tuneforge.data.packing.epoch_order`, from
    micro-batch ``start`` on."""
    for ids in epoch_order(len(examples), batch_size, seed, epoch, shuffle, start):
        batch = pack_kto([examples[i] for i in ids])
        batch.example_ids = ids
        yield batch


def completion_logps(model: torch.nn.Module, batch: PackedBatch, config: RunConfig) -> torch.Tensor:
    """fp32 ``[k]``: each example's summed log-probability of its trained (completion) tokens."""
    return -packed_example_loss_sums(model, batch, config.method, config.chunked_loss)


def metric_sums(logps: torch.Tensor, rewards: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
                ) -> dict[str, float]:
    """A micro-batch's metric sums (``[k]`` each; ``kl`` a scalar), which :meth:`KTOObjective.mean_metrics` turns
    into the logged means: ``kl`` times ``k``, and per label the sums of rewards and log-probabilities and the
    count."""
    out = {"kl": kl.item() * len(logps)}
    for label, value in LABELS.items():
        mask = desirable == value
        out[f"rewards/{label}"] = rewards[mask].sum().item()
        out[f"logps/{label}"] = logps.detach()[mask].sum().item()
        out[f"count/{label}"] = float(mask.sum().item())
    return out


class KTOObjective(ReferencedObjective):
    """KTO (module docstring); a unit is one example."""

    eval_metric = "eval_loss"
    higher_is_better = False
    unit_name = "examples"
    metric_names = METRICS

    def prepare_data(self, config: RunConfig, tokenizer: Any) -> PreparedData:
        return prepare_kto(config.data, tokenizer, config.seed)

    def micro_batches(self, examples: Sequence[Any], batch_size: int, seed: int, epoch: int, shuffle: bool = True,
                      start: int = 0) -> Iterator[PackedBatch]:
        return kto_micro_batches(examples, batch_size, seed, epoch, shuffle, start)

    def needs_reference(self, config: RunConfig) -> bool:
        return True

    def reference_setting(self, config: RunConfig) -> str:
        return config.kto.reference

    def pack_units(self, units: Sequence[Any]) -> PackedBatch:
        return pack_kto(units)

    def units(self, batch: PackedBatch) -> list[Any]:
        if not isinstance(batch, KTOBatch):
            raise TypeError("task 'kto' trains on KTOBatch rows (KTOObjective.micro_batches)")
        return batch.examples

    def sequence_logps(self, model: torch.nn.Module, batch: PackedBatch, config: RunConfig) -> torch.Tensor:
        return completion_logps(model, batch, config)[:, None]

    def kl(self, model: torch.nn.Module, batch: KTOBatch, config: RunConfig) -> torch.Tensor:
        """KTO's ``z0`` for ``batch`` (fp32 scalar, detached): 0 for ``apo_zero_unpaired``."""
        device = batch.input_ids.device
        if config.kto.loss != "kto":
            return torch.zeros((), device=device)
        row = batch.mismatched(config.data.max_length).to(device)
        with reference_model(model, config, self.init_weights):
            reference = completion_logps(model, row, config)
        with torch.no_grad():
            policy = completion_logps(model, row, config)
        return kl_estimate(policy, reference)

    def unit_losses(self, model: torch.nn.Module, batch: PackedBatch, config: RunConfig,
                    split: str = "train") -> tuple[torch.Tensor, dict[str, float]]:
        """(per-example losses ``[k]`` with autograd, metric sums over the ``k`` examples); the reference and the
        KL estimate first, then the policy's forward with grad."""
        assert isinstance(batch, KTOBatch)
        kto = config.kto
        reference = self.reference_logps(model, batch, config, split)
        assert reference is not None
        kl = self.kl(model, batch, config)
        logps = completion_logps(model, batch, config)
        desirable = batch.desirable(logps.device)
        losses, rewards = kto_loss(logps, reference[:, 0], desirable, kl, kto.beta, kto.desirable_weight,
                                   kto.undesirable_weight, kto.loss)
        return losses, metric_sums(logps, rewards, desirable, kl)

    def mean_metrics(self, sums: dict[str, float], normaliser: float) -> dict[str, float]:
        """``kl`` averaged over the examples; the rewards and log-probabilities over the examples of their label
        (TRL's means), absent for a label without examples; ``rewards/margins`` when both are there."""
        out = {"kl": sums.get("kl", 0.0) / max(normaliser, 1)}
        for label in LABELS:
            count = sums.get(f"count/{label}", 0.0)
            if count:
                out[f"rewards/{label}"] = sums[f"rewards/{label}"] / count
                out[f"logps/{label}"] = sums[f"logps/{label}"] / count
        if "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out
