"""Stages composed: train, then evaluate when the run config's ``eval.after_training`` asks for it.

The stages stand side by side (training never imports evaluation); what chains them sits on top: this
module, the CLI and the quickstart. ``tuneforge.train`` and ``tuneforge train`` run :func:`train_and_evaluate`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuneforge.evaluation.api import check_before_training, evaluate
from tuneforge.training.trainer import train

if TYPE_CHECKING:
    from tuneforge.config import RunConfig
    from tuneforge.training.trainer import RunResult


def train_and_evaluate(config: RunConfig, resume: bool = False) -> RunResult:
    """:func:`~tuneforge.training.trainer.train`; with ``eval.after_training``, the evaluation's inputs are
    checked before the first step (a bad test file fails in one line, not after the last step) and
    ``tuneforge eval`` runs on the finished run (its report in ``<run>/eval/``)."""
    after = config.eval is not None and config.eval.after_training
    if after:
        check_before_training(config)
    result = train(config, resume=resume)
    if after:
        evaluate(result.run_dir, progress=config.progress)
    return result
