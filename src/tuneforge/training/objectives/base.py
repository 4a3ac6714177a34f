"""The objective seam: the interface every training objective implements."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tuneforge.training.strategies import SingleProcess, Strategy

if TYPE_CHECKING:
    from tuneforge.config import RunConfig
    from tuneforge.data.dataset import PreparedData
    from tuneforge.data.packing import PackedBatch


@dataclass
class ObjectiveOutput:
    """One micro-batch's contribution.

    ``loss_sum``: fp32 scalar, a *sum* over the micro-batch's units (tokens, pairs, ...); the loop divides
    it by the normaliser of the whole optimizer step, so gradient accumulation equals one big batch.
    ``normaliser``: this micro-batch's units (the same number :meth:`Objective.normaliser` gave).
    ``metrics``: sums to be added over the step's micro-batches and turned into the logged values by
    :meth:`Objective.mean_metrics` (by default divided by the step's normaliser: e.g. a preference objective's
    chosen-minus-rejected reward margin).
    """

    loss_sum: torch.Tensor
    normaliser: float
    metrics: dict[str, float] = field(default_factory=dict)


class Objective:
    """Base class: an objective named after its ``task:``.

    Attributes:
        eval_metric: the key of :meth:`evaluate`'s result that picks the best checkpoint.
        higher_is_better: which way ``eval_metric`` improves.
        local_normaliser: whether :meth:`normaliser` does work that only the process training the micro-batch
            should do (GRPO: its rollout). The loop then asks each process for its own share of the step's
            micro-batches only and sums the normalisers (and the step's tokens) over the processes; otherwise every
            process asks for all of the step's micro-batches (no communication).
        processes: the run's processes (the loop's :class:`~tuneforge.training.strategies.Strategy`, set before
            :meth:`prepare_data`; one process by default): ``rank``, ``world``, ``is_main`` and the collectives an
            objective may call where every process calls them (:meth:`end_step`, :meth:`evaluate`).
    """

    eval_metric: str = "eval_loss"
    higher_is_better: bool = False
    # whether the loop's divergence and collapse checks apply to this objective's loss (a loss that starts near 0
    # and changes sign, or a gradient that is exactly 0 while there is nothing to learn yet, as RL's, does not)
    watches_divergence: bool = True
    local_normaliser: bool = False

    def __init__(self, task: str) -> None:
        self.task = task
        self.processes: Strategy = SingleProcess()

    def prepare_data(self, config: RunConfig, tokenizer: Any) -> PreparedData:
        """Load, render and tokenize ``config.data`` into train and validation examples (and rejects)."""
        raise NotImplementedError

    def micro_batches(self, examples: Sequence[Any], batch_size: int, seed: int, epoch: int, shuffle: bool = True,
                      start: int = 0) -> Iterator[PackedBatch]:
        """One epoch of packed micro-batches of ``batch_size`` units (examples; pairs for preference), shuffled by
        ``(seed, epoch)``, from micro-batch ``start`` on."""
        from tuneforge.data.packing import micro_batches

        return micro_batches(examples, batch_size, seed, epoch, shuffle, start)

    def repeats(self, config: RunConfig) -> int:
        """How many optimizer steps train on each micro-batch in a row (GRPO's ``num_iterations``): an epoch is this
        many times ``ceil(examples / batch_size)`` micro-batches. Default: 1."""
        return 1

    def before_training(self, model: torch.nn.Module, data: PreparedData, config: RunConfig,
                        device: torch.device) -> None:
        """Called once the model is set up, before the first step (and before a resumed run loads its trained
        weights): e.g. a preference objective's reference log-probabilities. Default: nothing."""

    def save(self, model: torch.nn.Module, folder: Path) -> None:
        """Write what the objective adds to the model into a checkpoint ``folder``, beside the method's files (a
        reward model's head). Called in every checkpoint, on the main process. Default: nothing."""

    def save_state(self, folder: Path) -> None:
        """Write the objective's own training state into a resumable checkpoint ``folder`` (one with the trainer
        state; never copied into the run's output): e.g. how much of GRPO's samples.jsonl it covers.
        Called on the main process. Default: nothing."""

    def save_process_state(self, folder: Path) -> None:
        """Write what this process alone holds of the objective's training state into a resumable checkpoint
        ``folder``: called on every process, before the main process writes the checkpoint (:meth:`save_state`);
        e.g. GRPO's rollouts of its own micro-batches. Default: nothing."""

    def load_state(self, folder: Path, device: torch.device) -> None:
        """Read back what :meth:`save_state` (and :meth:`save_process_state`) wrote into ``folder``, on ``--resume``
        (after the trained weights and the trainer state), on every process. Default: nothing."""

    def after_training(self) -> None:
        """Called once the loop has ended (not after an interruption): e.g. a summary for the log. Default:
        nothing."""

    def end_step(self) -> None:
        """Called on every process once a step's micro-batches have trained, before :meth:`mean_metrics` (every
        process reaches it: collectives through :attr:`processes` are allowed): e.g. GRPO gathers its rollouts'
        metrics and samples. Default: nothing."""

    def normaliser(self, batch: PackedBatch) -> float:
        """Units this micro-batch contributes to the step's normaliser, known before any forward."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: PackedBatch, config: RunConfig) -> ObjectiveOutput:
        """The loss sum of ``batch`` (on the model's device), with autograd."""
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, batches: list[PackedBatch], device: torch.device,
                 config: RunConfig) -> dict[str, float]:
        """Validation metrics, including :attr:`eval_metric`; the model is in eval mode, no grad."""
        raise NotImplementedError

    def mean_metrics(self, sums: dict[str, float], normaliser: float) -> dict[str, float]:
        """The logged metrics of a step (or a validation pass) from the sums of its micro-batches'
        :attr:`ObjectiveOutput.metrics` and its normaliser. Default: each sum divided by the normaliser (a mean per
        token or pair); an objective whose metrics are means over other counts (KTO: per label) overrides it."""
        return {key: value / max(normaliser, 1) for key, value in sums.items()}

    def uniform_loss(self, vocab_size: int | None) -> float | None:
        """The training loss of a model that has collapsed to a uniform guess (the collapse check's mark);
        None when the objective has no such value."""
        return None

    def worse(self, score: float, reference: float, tolerance: float) -> bool:
        """Whether ``score`` is worse than ``reference`` by more than ``tolerance`` (relative) in this objective's
        direction."""
        margin = tolerance * abs(reference)
        return score < reference - margin if self.higher_is_better else score > reference + margin

    def improved(self, score: float, best: float | None, tolerance: float = 1e-6) -> bool:
        """Whether ``score`` beats ``best`` in this objective's direction."""
        if best is None:
            return True
        return score > best + tolerance if self.higher_is_better else score < best - tolerance
