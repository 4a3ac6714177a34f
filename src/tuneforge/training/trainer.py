"""The training recipe: one function you can read top to bottom.

``train(config)`` sets up the device and dtype, the tokenizer, the data, the model and its method, the
optimizer and schedule, then runs a plain loop: gradient accumulation over packed micro-batches, loss
normalised by the number of target tokens in the whole step, clipping, evaluation every ``eval_every``
steps with the best checkpoint kept, optional early stopping, atomic checkpoints. Everything it produces
goes into ``config.output_dir`` (see :class:`RunResult`).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from tuneforge.config import RunConfig, dump_config
from tuneforge.data.dataset import PreparedData, prepare_data, write_rejects
from tuneforge.data.packing import PackedBatch, micro_batches
from tuneforge.methods import apply_method, count_parameters, get_method, load_base_model, save_trained
from tuneforge.models.dtype import pick_device, pick_dtype
from tuneforge.models.loading import flush_denormals, load_tokenizer
from tuneforge.models.registry import resolve_model
from tuneforge.training.checkpoint import atomic_save_dir, copy_files
from tuneforge.training.loss import evaluate_loss, packed_loss_sum
from tuneforge.training.metrics import MetricsLog, plot_loss_curve
from tuneforge.training.optimizer import adamw
from tuneforge.training.packed_attention import NAME as PACKED_ATTENTION
from tuneforge.training.packed_attention import set_attention
from tuneforge.training.rms_norm import fuse_rms_norm
from tuneforge.training.run_record import base_model_record, data_fingerprints, library_versions

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


def _batch_stream(data: PreparedData, config: RunConfig):
    """Endless stream of packed micro-batches, reshuffled every epoch."""
    epoch = 0
    while True:
        yield from micro_batches(data.train, config.batch_size, config.seed, epoch)
        epoch += 1


def _save_model(model, tokenizer, config: RunConfig, target: Path) -> None:
    def write(tmp: Path) -> None:
        save_trained(model, tmp, config)
        tokenizer.save_pretrained(tmp)

    atomic_save_dir(target, write)


def prepare_for_training(model: torch.nn.Module, config: RunConfig) -> None:
    """What :func:`train` does to a model after ``apply_method``: its attention (``config.attention``), the
    one-function RMSNorm (``config.fused_rms_norm``), activation checkpointing, training mode."""
    set_attention(model, PACKED_ATTENTION if config.attention == "packed_sdpa" else config.attention)
    if config.fused_rms_norm:
        fuse_rms_norm(model)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.train()


def make_optimizer(config: RunConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer :func:`train` steps: the method's own (QLoRA's ``qlora.optimizer``), else AdamW (fused where
    torch can)."""
    method = get_method(config.method)
    if method.make_optimizer is not None:
        return method.make_optimizer(config, params)
    return adamw(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def train(config: RunConfig) -> RunResult:
    """Train ``config.method`` on ``config.data`` and write the run directory; return a summary."""
    started = time.time()
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(config))
    seed_everything(config.seed)
    _configure_cpu(config.threads)

    # --- device, dtype
    device = pick_device(config.device)
    dtype, why = pick_dtype(config.dtype, device)
    log.info("device %s, dtype %s (%s)", device, str(dtype).removeprefix("torch."), why)

    # --- tokenizer and data
    tokenizer = load_tokenizer(config.model)
    data = prepare_data(config.data, tokenizer, config.seed, config.task)
    if data.rejects:
        write_rejects(data.rejects, run_dir / "rejects.jsonl")
    val_batches = list(micro_batches(data.validation, config.batch_size, config.seed, 0, shuffle=False))
    log.info("data: %d train / %d validation examples (%s), %d train tokens, %d rejected",
             len(data.train), len(data.validation), ", ".join(f"{k}: {v}" for k, v in data.formats.items()),
             data.train_tokens, len(data.rejects))

    # --- model and method
    model = load_base_model(config, dtype=dtype, device=device)
    model = apply_method(model, config, tokenizer)
    prepare_for_training(model, config)
    trainable, total = count_parameters(model)
    log.info("trainable parameters: %s of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    # --- optimizer and schedule
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(config, params)
    steps = total_steps(config, len(data.train))
    warmup = config.warmup_steps if config.warmup_steps is not None else round(config.warmup_ratio * steps)
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    eval_every = config.eval_every or max(1, steps // 5)

    # --- the loop
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    stream = _batch_stream(data, config)
    best_loss, best_step, bad_evals, last_loss = math.inf, None, 0, None
    best_dir = run_dir / "checkpoints" / "best"
    seen_tokens = 0
    bar = tqdm(total=steps, desc="training", unit="step", disable=not config.progress, dynamic_ncols=True)
    loop_start = time.time()
    step = 0
    for step in range(1, steps + 1):
        step_start = time.time()
        batches: list[PackedBatch] = [next(stream) for _ in range(config.gradient_accumulation_steps)]
        num_targets = sum(b.num_loss_tokens for b in batches)
        step_loss = 0.0
        for batch in batches:
            if batch.num_loss_tokens == 0:
                continue
            loss_sum = packed_loss_sum(model, batch.to(device), config.method, config.chunked_loss)
            (loss_sum / num_targets).backward()
            step_loss += loss_sum.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm) if config.max_grad_norm else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        step_tokens = sum(b.num_tokens for b in batches)
        seen_tokens += step_tokens
        elapsed = time.time() - loop_start
        last_loss = step_loss / max(num_targets, 1)
        row = {"step": step, "loss": round(last_loss, 6), "lr": scheduler.get_last_lr()[0],
               "tokens": step_tokens, "trained_tokens": num_targets,
               "tokens_per_s": round(step_tokens / max(time.time() - step_start, 1e-9), 1),
               "avg_tokens_per_s": round(seen_tokens / max(elapsed, 1e-9), 1), "elapsed_s": round(elapsed, 2)}
        if grad_norm is not None:
            row["grad_norm"] = round(float(grad_norm), 4)

        if val_batches and (step % eval_every == 0 or step == steps):
            eval_loss = evaluate_loss(model, val_batches, device, config.method, config.chunked_loss)
            row["eval_loss"] = round(eval_loss, 6)
            if eval_loss < best_loss - 1e-6:
                best_loss, best_step, bad_evals = eval_loss, step, 0
                if config.keep_best:
                    _save_model(model, tokenizer, config, best_dir)
            else:
                bad_evals += 1
            log.info("step %d: eval loss %.4f (best %.4f at step %s)", step, eval_loss, best_loss, best_step)
        if config.save_every and step % config.save_every == 0:
            _save_model(model, tokenizer, config, run_dir / "checkpoints" / "last")
        if step % config.log_every == 0 or "eval_loss" in row or step == steps:
            metrics.log(**row)
        bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{row['avg_tokens_per_s']:.0f}",
                        **({"eval": f"{row['eval_loss']:.4f}"} if "eval_loss" in row else {}))
        bar.update(1)
        if config.early_stopping_patience and bad_evals >= config.early_stopping_patience:
            log.info("early stopping at step %d: no eval improvement in %d evaluations", step, bad_evals)
            break
    bar.close()
    metrics.close()

    # --- final artefacts: the best checkpoint (or the last weights) at the top of the run directory
    if config.keep_best and best_step is not None:
        copy_files(best_dir, run_dir)
    else:
        _save_model(model, tokenizer, config, run_dir / "checkpoints" / "final")
        copy_files(run_dir / "checkpoints" / "final", run_dir)
    plot_loss_curve(metrics.rows, run_dir / "loss_curve.png", title=f"{config.method} on {Path(config.data.train).name}")

    wall = time.time() - started
    record = {
        "tuneforge_run": 1,
        "base_model": base_model_record(config.model, resolve_model(config.model)),
        "method": config.method,
        "task": config.task,
        "data": data_fingerprints([config.data.train, config.data.validation]),
        "examples": {"train": len(data.train), "validation": len(data.validation), "rejected": len(data.rejects),
                     "truncated": data.truncated, "formats": data.formats},
        "seed": config.seed,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "dtype_reason": why,
        "steps": step,
        "trainable_params": trainable,
        "total_params": total,
        "final_train_loss": last_loss,
        "best_eval_loss": None if best_step is None else best_loss,
        "best_step": best_step,
        "weights_from_step": best_step if (config.keep_best and best_step is not None) else step,
        "train_tokens_seen": seen_tokens,
        "wall_time_s": round(wall, 2),
        "versions": library_versions(),
    }
    (run_dir / "run.json").write_text(json.dumps(record, indent=2))
    return RunResult(run_dir, step, last_loss, record["best_eval_loss"], best_step, trainable, total, wall, metrics.rows)
