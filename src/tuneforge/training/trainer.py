"""The training recipe: ``setup -> fit -> finish``, a plain loop you can read top to bottom.

:class:`TrainingRecipe` sets up the device and dtype, the tokenizer, the data (through the objective),
the model and its method, the optimizer and schedule; ``fit`` runs the loop: gradient accumulation over
packed micro-batches, the objective's loss sum divided by the normaliser of the whole step (target tokens
for SFT), clipping, evaluation every ``eval_every`` steps with the best checkpoint kept by the objective's
metric, optional early stopping, checkpoints that always exist (``training/checkpoint.py``); ``finish``
writes the run directory (see :class:`RunResult`). The loop never branches on the method or the
objective: the method registry (``methods/``) and the objective (``training/objectives/``) do.
All mutable training state lives in one :class:`~tuneforge.training.state.TrainState`.
``train(config)`` is the three calls in a row.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from tuneforge.config import RunConfig, dump_config
from tuneforge.data.dataset import write_rejects
from tuneforge.data.packing import PackedBatch, batches_per_epoch, micro_batches
from tuneforge.methods import apply_method, count_parameters, get_method, load_base_model, save_trained
from tuneforge.models.dtype import pick_device, pick_dtype
from tuneforge.models.loading import flush_denormals, load_tokenizer
from tuneforge.models.registry import resolve_model
from tuneforge.training.checkpoint import CheckpointDir, copy_files
from tuneforge.training.metrics import MetricsLog, plot_loss_curve
from tuneforge.training.objectives import get_objective
from tuneforge.training.optimizer import adamw
from tuneforge.training.packed_attention import NAME as PACKED_ATTENTION
from tuneforge.training.packed_attention import set_attention
from tuneforge.training.rms_norm import fuse_rms_norm
from tuneforge.training.run_record import base_model_record, data_fingerprints, library_versions
from tuneforge.training.state import STATE_FILE, TrainState

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    final_loss: float | None
    best_eval_loss: float | None
    best_step: int | None
    trainable_params: int
    total_params: int
    wall_time_s: float
    metrics: list[dict] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _configure_cpu(threads: int | None) -> None:
    flush_denormals()
    if threads:
        torch.set_num_threads(threads)


def total_steps(config: RunConfig, num_train: int) -> int:
    per_step = config.batch_size * config.gradient_accumulation_steps
    steps_per_epoch = max(1, math.ceil(num_train / per_step))
    return config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))


class _GradientCheckpointing(Protocol):
    """transformers' switches, on its models and passed on to them by the wrappers (peft's, the bottleneck
    adapter's) that every method's ``apply`` returns."""

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None: ...

    def enable_input_require_grads(self) -> None: ...


def prepare_for_training(model: torch.nn.Module, config: RunConfig) -> None:
    """What :func:`train` does to a model after ``apply_method``: its attention (``config.attention``), the
    one-function RMSNorm (``config.fused_rms_norm``), activation checkpointing, training mode."""
    set_attention(model, PACKED_ATTENTION if config.attention == "packed_sdpa" else config.attention)
    if config.fused_rms_norm:
        fuse_rms_norm(model)
    if config.gradient_checkpointing:
        hf_model = cast(_GradientCheckpointing, model)
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            hf_model.enable_input_require_grads()
    model.train()


def make_optimizer(config: RunConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer :func:`train` steps: the method's own (QLoRA's ``qlora.optimizer``), else AdamW (fused where
    torch can)."""
    method = get_method(config.method)
    if method.make_optimizer is not None:
        return method.make_optimizer(config, params)
    return adamw(params, lr=config.learning_rate, weight_decay=config.weight_decay)


class TrainingRecipe:
    """One training run: ``setup()``, ``fit()``, ``finish()`` (or :func:`train` for all three)."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.objective = get_objective(config.task)
        self.run_dir = Path(config.output_dir)
        self.checkpoints = CheckpointDir(self.run_dir / "checkpoints")

    # ------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        config = self.config
        self.started = time.time()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(config))
        for stale in self.checkpoints.clean_stale():
            log.info("removed %s, left by an interrupted save", stale)
        seed_everything(config.seed)
        _configure_cpu(config.threads)

        self.device = pick_device(config.device)
        self.dtype, self.dtype_reason = pick_dtype(config.dtype, self.device)
        log.info("device %s, dtype %s (%s)", self.device, str(self.dtype).removeprefix("torch."), self.dtype_reason)

        self.tokenizer = load_tokenizer(config.model)
        self.data = data = self.objective.prepare_data(config, self.tokenizer)
        if data.rejects:
            write_rejects(data.rejects, self.run_dir / "rejects.jsonl")
        self.val_batches = list(micro_batches(data.validation, config.batch_size, config.seed, 0, shuffle=False))
        log.info("data: %d train / %d validation examples (%s), %d train tokens, %d rejected",
                 len(data.train), len(data.validation), ", ".join(f"{k}: {v}" for k, v in data.formats.items()),
                 data.train_tokens, len(data.rejects))

        base = load_base_model(config, dtype=self.dtype, device=self.device)
        self.model = model = apply_method(base, config, self.tokenizer)
        prepare_for_training(model, config)
        self.trainable, self.total = count_parameters(model)
        log.info("trainable parameters: %s of %s (%.4f%%)", f"{self.trainable:,}", f"{self.total:,}",
                 100 * self.trainable / self.total)

        self.params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(config, self.params)
        self.steps = total_steps(config, len(data.train))
        warmup = config.warmup_steps if config.warmup_steps is not None else round(config.warmup_ratio * self.steps)
        scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=warmup,
                                  num_training_steps=self.steps)
        self.eval_every = config.eval_every or max(1, self.steps // 5)
        self.state = TrainState(optimizer=optimizer, scheduler=scheduler)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")

    # -------------------------------------------------------------------------------------- fit

    def _next_micro_batches(self, n: int) -> list[PackedBatch]:
        """The next ``n`` micro-batches at the state's data cursor (epochs reshuffled), advancing the cursor."""
        state, config = self.state, self.config
        per_epoch = batches_per_epoch(len(self.data.train), config.batch_size)
        out: list[PackedBatch] = []
        while len(out) < n:
            if state.micro_batch >= per_epoch:
                state.epoch, state.micro_batch = state.epoch + 1, 0
            stream = micro_batches(self.data.train, config.batch_size, config.seed, state.epoch,
                                   start=state.micro_batch)
            for batch in stream:
                out.append(batch)
                state.micro_batch += 1
                if len(out) == n:
                    break
        return out

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns its metrics row."""
        config, state, objective = self.config, self.state, self.objective
        step_start = time.time()
        batches = self._next_micro_batches(config.gradient_accumulation_steps)
        normaliser = sum(objective.normaliser(b) for b in batches)
        step_loss = 0.0
        sums: dict[str, float] = {}
        for batch in batches:
            if objective.normaliser(batch) == 0:
                continue
            out = objective.loss(self.model, batch.to(self.device), config)
            (out.loss_sum / normaliser).backward()
            step_loss += out.loss_sum.item()
            for key, value in out.metrics.items():
                sums[key] = sums.get(key, 0.0) + value
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm)
                     if config.max_grad_norm else None)
        assert state.optimizer is not None, "train_step needs the optimizer set up by the trainer"
        state.optimizer.step()
        state.scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)

        state.step += 1
        step_tokens = sum(b.num_tokens for b in batches)
        state.seen_tokens += step_tokens
        elapsed = time.time() - self.loop_start
        state.last_loss = step_loss / max(normaliser, 1)
        row: dict[str, Any] = {
            "step": state.step, "loss": round(state.last_loss, 6), "lr": state.scheduler.get_last_lr()[0],
            "tokens": step_tokens, "trained_tokens": normaliser,
            "tokens_per_s": round(step_tokens / max(time.time() - step_start, 1e-9), 1),
            "avg_tokens_per_s": round(state.seen_tokens / max(elapsed, 1e-9), 1), "elapsed_s": round(elapsed, 2)}
        row.update({k: round(v / max(normaliser, 1), 6) for k, v in sums.items()})
        if grad_norm is not None:
            row["grad_norm"] = round(float(grad_norm), 4)
        return row

    def evaluate(self) -> dict[str, float]:
        """The objective's validation metrics; keeps the best checkpoint and counts evaluations without gain."""
        config, state, objective = self.config, self.state, self.objective
        results = objective.evaluate(self.model, self.val_batches, self.device, config)
        score = results[objective.eval_metric]
        if objective.improved(score, state.best_score):
            state.best_score, state.best_step, state.bad_evals = score, state.step, 0
            if config.keep_best:
                self.save_checkpoint("best", with_state=False)
        else:
            state.bad_evals += 1
        log.info("step %d: %s %.4f (best %.4f at step %s)", state.step, objective.eval_metric, score,
                 state.best_score, state.best_step)
        return {k: round(v, 6) for k, v in results.items()}

    def save_checkpoint(self, kind: str, with_state: bool = True) -> Path:
        """The trained weights and tokenizer (and, with ``with_state``, the :class:`TrainState`) as the
        current ``kind`` checkpoint."""
        def write(folder: Path) -> None:
            save_trained(self.model, folder, self.config)
            self.tokenizer.save_pretrained(folder)
            if with_state:
                self.state.save(folder)

        return self.checkpoints.save(kind, self.state.step, write)

    def fit(self) -> None:
        config, state = self.config, self.state
        bar = tqdm(total=self.steps, initial=state.step, desc="training", unit="step", disable=not config.progress,
                   dynamic_ncols=True)
        self.loop_start = time.time()
        while state.step < self.steps:
            row = self.train_step()
            if self.val_batches and (state.step % self.eval_every == 0 or state.step == self.steps):
                row.update(self.evaluate())
            if config.save_every and state.step % config.save_every == 0:
                self.save_checkpoint("last")
            if state.step % config.log_every == 0 or self.objective.eval_metric in row or state.step == self.steps:
                self.metrics.log(**row)
                state.metrics_rows += 1
            bar.set_postfix(loss=f"{state.last_loss:.4f}", tok_s=f"{row['avg_tokens_per_s']:.0f}",
                            **({"eval": f"{row[self.objective.eval_metric]:.4f}"}
                               if self.objective.eval_metric in row else {}))
            bar.update(1)
            if config.early_stopping_patience and state.bad_evals >= config.early_stopping_patience:
                log.info("early stopping at step %d: no eval improvement in %d evaluations", state.step,
                         state.bad_evals)
                break
        bar.close()
        self.metrics.close()

    # ----------------------------------------------------------------------------------- finish

    def finish(self) -> RunResult:
        """The best checkpoint (or the last weights) at the top of the run directory, the loss curve, run.json."""
        config, state = self.config, self.state
        best = self.checkpoints.current("best") if config.keep_best and state.best_step is not None else None
        if best is None:
            best = self.save_checkpoint("final", with_state=False)
        copy_files(best, self.run_dir, skip=(STATE_FILE,))
        plot_loss_curve(self.metrics.rows, self.run_dir / "loss_curve.png",
                        title=f"{config.method} on {Path(config.data.train).name}")
        wall = time.time() - self.started
        data = self.data
        best_score = None if state.best_step is None else state.best_score
        record = {
            "tuneforge_run": 1,
            "base_model": base_model_record(config.model, resolve_model(config.model)),
            "method": config.method,
            "task": config.task,
            "data": data_fingerprints([config.data.train, config.data.validation]),
            "examples": {"train": len(data.train), "validation": len(data.validation), "rejected": len(data.rejects),
                         "truncated": data.truncated, "formats": data.formats},
            "seed": config.seed,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "dtype_reason": self.dtype_reason,
            "steps": state.step,
            "trainable_params": self.trainable,
            "total_params": self.total,
            "final_train_loss": state.last_loss,
            "eval_metric": self.objective.eval_metric,
            "best_eval_loss": best_score,
            "best_step": state.best_step,
            "weights_from_step": state.best_step if (config.keep_best and state.best_step is not None) else state.step,
            "train_tokens_seen": state.seen_tokens,
            "wall_time_s": round(wall, 2),
            "versions": library_versions(),
        }
        (self.run_dir / "run.json").write_text(json.dumps(record, indent=2))
        return RunResult(self.run_dir, state.step, state.last_loss, best_score, state.best_step, self.trainable,
                         self.total, wall, self.metrics.rows)


def train(config: RunConfig) -> RunResult:
    """Train ``config.method`` on ``config.data`` with ``config.task``'s objective; write the run directory."""
    recipe = TrainingRecipe(config)
    recipe.setup()
    recipe.fit()
    return recipe.finish()
