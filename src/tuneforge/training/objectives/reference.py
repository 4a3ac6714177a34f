"""The reference model of the preference losses: the model the policy started from, frozen, with no second copy
of the base in memory.

- A run from the base model: the policy with its method disabled (:func:`tuneforge.methods.method_disabled`),
  i.e. the base model itself.
- A run from an SFT run (``init_from``): the base with the SFT adapter, as it was before the first step. The
  policy's trained parameters at that moment (the loaded adapter) are kept as one frozen copy, the adapter's
  size (:class:`FrozenWeights`), and swapped in for the reference forward: each trained parameter is pointed at
  its frozen tensor and back (no copy, no second model, the policy's own forward code), so the reference is
  exactly the SFT model at every step. Loading the adapter a second time as another named adapter would cost the
  same memory but need every method's adapter switching (peft's ``set_adapter`` also flips ``requires_grad``)
  and would be saved with the run.
- Full fine-tuning (which can be neither disabled nor kept twice without doubling the weights): the weights as
  they are, so its reference log-probabilities must all be computed before the first step.

Always without grad and with dropout off (eval mode; the training mode is restored after).

:class:`ReferencedObjective` is what the objectives that use it share (``task: preference``, ``task: kto``): the
reference log-probabilities of a unit (a pair, a KTO example) computed once on first use and cached on it, or on
the fly; full fine-tuning's before step 1; the validation loop.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from tuneforge.methods import get_method, method_disabled
from tuneforge.training.objectives.base import Objective, ObjectiveOutput

if TYPE_CHECKING:
    from tuneforge.config import RunConfig
    from tuneforge.data.dataset import PreparedData
    from tuneforge.data.packing import PackedBatch


class FrozenWeights:
    """A frozen copy of ``model``'s trained parameters as they are now (``[p.detach().clone()]``: the adapter's
    size in memory), which :meth:`swapped_in` puts in their place for a block."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.frozen = [p.detach().clone() for p in self.params]

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.frozen)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Within the block every trained parameter holds its frozen value (the tensors behind the parameters are
        swapped, and swapped back after; the parameters, their gradients and the optimizer's state are untouched).
        Autocast keeps lower-precision casts of trained parameters for the rest of its block, keyed by the
        parameter: they are cleared on the way in and out, so neither model computes with the other's casts."""
        live = [p.data for p in self.params]
        torch.clear_autocast_cache()
        try:
            for p, frozen in zip(self.params, self.frozen, strict=True):
                p.data = frozen
            yield
        finally:
            for p, tensor in zip(self.params, live, strict=True):
                p.data = tensor
            torch.clear_autocast_cache()


@contextlib.contextmanager
def reference_model(model: torch.nn.Module, config: RunConfig, init: FrozenWeights | None = None) -> Iterator[None]:
    """Within the block ``model`` computes the reference: no grad, dropout off, and ``init`` swapped in (a run from
    ``init_from``), else the method disabled (the base model), else (full fine-tuning) the model as it is."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if init is not None:
                with init.swapped_in():
                    yield
            elif get_method(config.method).disable is None:
                yield
            else:
                with method_disabled(model, config):
                    yield
    finally:
        model.train(was_training)


class ReferencedObjective(Objective):
    """An objective that compares the policy with the reference model on *units* (a preference pair, a KTO
    example): each unit's reference log-probabilities (one float per sequence of the unit, ``unit.reference``) are
    computed with :func:`reference_model` the first time the unit is used, and cached on it
    (``reference: precomputed``, see :mod:`tuneforge.training.objectives.preference`), or computed for every
    micro-batch (``on_the_fly``). Full fine-tuning computes every unit's before the first step.

    A subclass gives :meth:`needs_reference`, :meth:`reference_setting`, :meth:`pack_units` (a packed row of units),
    :meth:`units` (a batch's units), :meth:`sequence_logps` (``[k, s]``: each unit's ``s`` summed log-probabilities)
    and :meth:`unit_losses`. ``init_weights``: the frozen init adapter (``init_from``), the reference; ``computed``:
    how many train and validation units' reference log-probabilities were computed, and their time in seconds
    (None without a reference)."""

    unit_name = "pairs"
    metric_names: tuple[str, ...] = ()

    def __init__(self, task: str) -> None:
        super().__init__(task)
        self.init_weights: FrozenWeights | None = None
        self.computed: dict[str, float] | None = None
        self.log = logging.getLogger(type(self).__module__)     # messages under the objective's own module

    # ---------------------------------------------------------------- what a subclass gives

    def needs_reference(self, config: RunConfig) -> bool:
        raise NotImplementedError

    def reference_setting(self, config: RunConfig) -> str:
        """``precomputed`` or ``on_the_fly`` (the task's section's ``reference``)."""
        raise NotImplementedError

    def pack_units(self, units: Sequence[Any]) -> PackedBatch:
        raise NotImplementedError

    def units(self, batch: PackedBatch) -> list[Any]:
        raise NotImplementedError

    def sequence_logps(self, model: torch.nn.Module, batch: PackedBatch, config: RunConfig) -> torch.Tensor:
        """fp32 ``[k, s]``: the summed log-probabilities of the trained tokens of each unit's ``s`` sequences."""
        raise NotImplementedError

    def unit_losses(self, model: torch.nn.Module, batch: PackedBatch, config: RunConfig,
                    split: str = "train") -> tuple[torch.Tensor, dict[str, float]]:
        """(per-unit losses ``[k]`` with autograd, metric sums over the ``k`` units)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- the reference

    def before_training(self, model: torch.nn.Module, data: PreparedData, config: RunConfig,
                        device: torch.device) -> None:
        """With ``init_from``: keep the init adapter (the trained parameters now, before a resumed run loads its
        own) as the frozen reference. Full fine-tuning with ``reference: precomputed``: every unit's reference
        log-probabilities now, from the weights before the first step. Everything else is computed on demand."""
        self.init_weights = self.computed = None
        if not self.needs_reference(config):
            return
        if config.init_from:
            self.init_weights = FrozenWeights(model)
            self.log.info("reference: the init_from run's model (its adapter kept frozen: %.1f MiB)",
                     self.init_weights.bytes / 2**20)
        self.computed = {"train": 0, "validation": 0, "seconds": 0.0}
        if get_method(config.method).disable is None and self.reference_setting(config) == "precomputed":
            per_row = getattr(config, "eval_batch_size", None) or 4 * config.batch_size   # forward-only: larger rows
            for split in ("train", "validation"):
                units = [u for u in getattr(data, split) if hasattr(u, "reference")]
                self.compute_references(model, units, config, device, per_row, progress=config.progress, split=split)
            self.log.info("reference log-probabilities of %d train and %d validation %s computed before step 1 in "
                     "%.1fs (full fine-tuning: from the weights before the first step)", self.computed["train"],
                     self.computed["validation"], self.unit_name, self.computed["seconds"])

    def compute_references(self, model: torch.nn.Module, units: Sequence[Any], config: RunConfig,
                           device: torch.device | str, per_row: int | None = None, progress: bool = False,
                           split: str = "train", packed: PackedBatch | None = None) -> int:
        """Compute and cache (``unit.reference``) the reference log-probabilities of those ``units`` that have
        none yet, ``per_row`` units a packed row (default: all in one), no grad, with the reference model; returns
        how many were computed. ``packed``: ``units`` already packed on ``device`` (a micro-batch), used as it is
        when none of them has a reference yet."""
        missing = [u for u in units if u.reference is None]
        if not missing:
            return 0
        started = time.perf_counter()
        per_row = per_row or len(missing)
        rows = [missing[i:i + per_row] for i in range(0, len(missing), per_row)]
        with reference_model(model, config, self.init_weights):
            for row in tqdm(rows, desc="reference log-probs", unit="batch", disable=not progress):
                whole = packed is not None and len(row) == len(self.units(packed))
                batch = packed if packed is not None and whole else self.pack_units(row).to(device)
                for unit, values in zip(row, self.sequence_logps(model, batch, config).tolist(), strict=True):
                    unit.reference = tuple(values)
        if self.computed is not None:
            self.computed[split] += len(missing)
            self.computed["seconds"] += time.perf_counter() - started
        return len(missing)

    def reference_logps(self, model: torch.nn.Module, batch: PackedBatch, config: RunConfig,
                        split: str = "train") -> torch.Tensor | None:
        """fp32 ``[k, s]``: the reference's :meth:`sequence_logps` of ``batch`` (cached, or computed now: ``split``
        counts them as train or validation units); None when the objective needs no reference."""
        if not self.needs_reference(config):
            return None
        device = batch.input_ids.device
        if self.reference_setting(config) == "precomputed":
            units = self.units(batch)
            self.compute_references(model, units, config, device, split=split, packed=batch)
            return torch.tensor([u.reference for u in units], dtype=torch.float32, device=device)
        with reference_model(model, config, self.init_weights):
            return self.sequence_logps(model, batch, config)

    def after_training(self) -> None:
        if self.computed is not None and self.computed["train"] + self.computed["validation"]:
            self.log.info("reference log-probabilities computed once for %d train and %d validation %s, in %.1fs",
                     self.computed["train"], self.computed["validation"], self.unit_name, self.computed["seconds"])

    # ---------------------------------------------------------------- training and validation

    def normaliser(self, batch: PackedBatch) -> float:
        return len(self.units(batch))

    def loss(self, model: torch.nn.Module, batch: PackedBatch, config: RunConfig) -> ObjectiveOutput:
        losses, metrics = self.unit_losses(model, batch, config)
        return ObjectiveOutput(losses.sum(), len(self.units(batch)), metrics)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batches: list[PackedBatch], device: torch.device,
                 config: RunConfig) -> dict[str, float]:
        """``eval_loss``: the mean loss over the validation units; the metrics ``eval_``-prefixed."""
        was_training = model.training
        model.eval()
        total, units = 0.0, 0
        sums = dict.fromkeys(self.metric_names, 0.0)
        before = dict(self.computed or {})
        for batch in batches:
            losses, metrics = self.unit_losses(model, batch.to(device), config, split="validation")
            total += losses.sum().item()
            units += len(self.units(batch))
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
        model.train(was_training)
        if self.computed is not None and self.computed["validation"] > before.get("validation", 0):
            self.log.info("reference log-probabilities of %d validation %s computed in %.1fs (once: cached for the "
                     "later evaluations)", self.computed["validation"] - before["validation"], self.unit_name,
                     self.computed["seconds"] - before["seconds"])
        out = {"eval_loss": total / max(units, 1)}
        out.update({f"eval_{key}": value for key, value in self.mean_metrics(sums, units).items()})
        return out
