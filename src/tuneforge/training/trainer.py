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

import logging
import math
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import get_scheduler

from tuneforge.config import RunConfig, dump_config
from tuneforge.data.dataset import write_rejects
from tuneforge.data.loaders import data_sha256
from tuneforge.data.packing import PackedBatch, batches_per_epoch
from tuneforge.data.rendering import set_template_kwargs
from tuneforge.data.streaming import StreamingData
from tuneforge.data.templates import apply_template
from tuneforge.data.tool_formats import resolve as resolve_tool_format
from tuneforge.errors import ConfigError
from tuneforge.kernels.compensated_adamw import CompensatedAdamW
from tuneforge.kernels.optimizer import adamw
from tuneforge.kernels.select import apply_kernels, check_kernels
from tuneforge.methods import (
    apply_method,
    count_parameters,
    get_method,
    load_base_model,
    load_weights_into,
    method_disabled,
)
from tuneforge.models.dtype import pick_device
from tuneforge.models.loading import flush_denormals, load_tokenizer
from tuneforge.models.registry import resolve_model
from tuneforge.runs import (
    ExampleCounts,
    RunRecord,
    TemplateRecord,
    base_model_record,
    data_fingerprints,
    library_versions,
)
from tuneforge.runs.init_from import InitRun, resolve_init_from
from tuneforge.runs.layout import RunDir
from tuneforge.training.checkpoint import Candidate, CheckpointDir, copy_files
from tuneforge.training.distributed import setup_distributed
from tuneforge.training.metrics import MetricsLog, plot_loss_curve
from tuneforge.training.objectives import get_objective
from tuneforge.training.precision import Precision, PrecisionPlan, cast_trained, resolve_precision
from tuneforge.training.state import STATE_FILE, TrainState, fingerprint_differences, read_state
from tuneforge.training.trackers import Trackers

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


def total_steps(config: RunConfig, num_train: int, world: int = 1, repeats: int = 1) -> int:
    """:meth:`RunConfig.optimizer_steps` (``tuneforge estimate --time`` counts the same steps)."""
    return config.optimizer_steps(num_train, world, repeats)


class _GradientCheckpointing(Protocol):
    """transformers' switches, on its models and passed on to them by the wrappers (peft's, the bottleneck
    adapter's) that every method's ``apply`` returns."""

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None: ...

    def enable_input_require_grads(self) -> None: ...


def prepare_for_training(model: torch.nn.Module, config: RunConfig, reentrant: bool = False) -> None:
    """What :func:`train` does to a model after ``apply_method``: its attention (``config.attention``), the
    one-function RMSNorm (``config.fused_rms_norm``) or Liger's kernels (``config.kernels``), activation
    checkpointing, training mode. ``reentrant``: torch's reentrant checkpointing (DeepSpeed ZeRO-3, whose parameter
    gathering changes what the non-reentrant kind sees saved between forward and recomputation)."""
    apply_kernels(model, config)       # attention, RMSNorm/MLP/loss kernels for the model's device (kernels/select.py)
    if config.gradient_checkpointing:
        hf_model = cast(_GradientCheckpointing, model)
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if hasattr(model, "enable_input_require_grads"):
            hf_model.enable_input_require_grads()
    model.train()


def make_optimizer(config: RunConfig, params: list[torch.nn.Parameter], compensated: bool = False,
                   ) -> torch.optim.Optimizer:
    """The optimizer :func:`train` steps: the method's own (QLoRA's ``qlora.optimizer``), else AdamW (fused where
    torch can); ``compensated``: bf16 weights trained without an fp32 copy (``precision: bf16-true`` full
    fine-tuning), AdamW with Kahan-compensated updates."""
    method = get_method(config.method)
    if method.make_optimizer is not None:
        return method.make_optimizer(config, params)
    if compensated:
        return CompensatedAdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return adamw(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def precision_plan(config: RunConfig, device: torch.device, by_engine: bool = False) -> PrecisionPlan:
    """The run's :class:`PrecisionPlan` (``precision:``, ``dtype:``, the method), decided before any weights load.
    ``by_engine``: FSDP2 and DeepSpeed apply the accelerate config's ``mixed_precision`` themselves, so tuneforge's
    own stays fp32 (any other ``precision:`` refused)."""
    full = get_method(config.method).is_full_model
    if by_engine:
        if config.precision not in ("auto", "fp32"):
            raise ConfigError(f"precision: {config.precision} under this engine (FSDP2 / DeepSpeed): it applies mixed "
                              "precision itself: set mixed_precision in the accelerate config and precision: auto")
        plan = resolve_precision("fp32", config.dtype if config.dtype != "auto" else "fp32", device, full)
        return PrecisionPlan(**{**plan.__dict__, "reason": "the engine's own mixed precision (accelerate config)"})
    return resolve_precision(config.precision, config.dtype, device, full)


TRAINABLE_FILE = "trainable.safetensors"
# config keys that may differ when a run is resumed (they change how it reports, not what it computes, or where its
# files are: a run is known by its config and its data's content, so a moved run folder or data file resumes)
RESUMABLE_CHANGES = ("progress", "threads", "output_dir", "keep_checkpoints", "data.train", "data.validation",
                     "init_from")
MICRO_BATCHES_PER_STEP = "micro_batches_per_step"   # fingerprint key: gradient_accumulation_steps x processes


class ResumeError(ConfigError):
    """``--resume`` cannot continue this run; the message names what is missing or what changed."""


class TrainingFailed(RuntimeError):
    """Training cannot go on (the message says why and what to change); the checkpoints are left as they were."""


class NonFiniteLossError(TrainingFailed):
    """A step's loss or gradient norm was NaN or infinite (``on_nonfinite: stop``, or too many skipped)."""


class DivergenceError(TrainingFailed):
    """The loss stayed far above its first value (``on_divergence: stop``)."""


class CollapseError(DivergenceError):
    """Training collapsed: the loss sat at a uniform guess, or the gradients were exactly 0, for several steps."""


class RunRegressed(TrainingFailed):
    """The run ended worse than it started (final validation vs the model before training or the first
    validation); the run directory was written without the worse weights as its output."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM or SIGINT stopped training after a step; the last checkpoint holds it (``--resume`` continues)."""

    def __init__(self, step: int, checkpoint: Path, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name} after step {step}; saved {checkpoint}. "
                         "Continue with `tuneforge train CONFIG --resume`.")
        self.step, self.checkpoint, self.signum = step, checkpoint, signum


class CheckpointDamaged(Exception):
    """A checkpoint folder that does not read back whole (the message names the file and the error)."""


def _read_checkpoint(folder: Path) -> dict[str, Any]:
    """The saved :class:`TrainState` of ``folder``, after checking that its trainer state and every safetensors
    file in it read back whole (a truncated file raises :class:`CheckpointDamaged`)."""
    path = folder / STATE_FILE
    try:
        saved = read_state(folder)
        if not isinstance(saved, dict) or "counters" not in saved:
            raise ValueError("not a trainer state")
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    f.get_tensor(name)
    except Exception as e:        # torch.load, safetensors and the file system each raise their own kinds
        raise CheckpointDamaged(f"{path.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                                ) from None
    return saved


def _without_resumable_changes(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a dumped run config) less the :data:`RESUMABLE_CHANGES` keys (dotted: nested)."""
    config = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
    for key in RESUMABLE_CHANGES:
        *parents, last = key.split(".")
        section: dict[str, Any] = config
        for parent in parents:
            inner = section.get(parent)
            section = inner if isinstance(inner, dict) else {}
        section.pop(last, None)
    return config


def _added_since(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config with the keys added to the run config since it was saved (``precision``, say) filled in
    from ``now`` where ``now`` has their defaults: the checkpoint trained with what those defaults do."""
    fields = RunConfig.model_fields
    added = {k: v for k, v in now.items() if k not in saved and k in fields and v == fields[k].get_default()}
    return {**saved, **added}


MIN_FREE_BYTES = 256 * 2**20
MIN_EVAL_EXAMPLES = 32     # eval_share never shrinks validation below this many examples


def check_output_dir(run_dir: Path, min_free: int = MIN_FREE_BYTES) -> None:
    """Fail before any model loads when ``run_dir`` cannot be created or written, or its disk is nearly full."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".tuneforge-write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output_dir {run_dir}: cannot write there ({e.strerror or e}); choose a writable "
                          "folder with --set output_dir=...") from None
    free = shutil.disk_usage(run_dir).free
    if free < min_free:
        raise ConfigError(f"output_dir {run_dir}: only {free / 2**20:.0f} MiB free on its disk; checkpoints need "
                          f"at least {min_free / 2**20:.0f} MiB: free space or choose another output_dir")


class TrainingRecipe:
    """One training run: ``setup()``, ``fit()``, ``finish()`` (or :func:`train` for all three).

    ``resume``: continue from the run directory's last checkpoint (``save_every``, or the one written on
    SIGTERM/SIGINT): trained weights, :class:`TrainState` (optimizer, scheduler, RNG, data cursor, scores)
    and ``metrics.jsonl`` up to that step; refused when the config or the data differ from the saved run's.
    """

    def __init__(self, config: RunConfig, resume: bool = False) -> None:
        self.config = config
        self.resume = resume
        self._signal: int | None = None
        self._stream: Iterator[PackedBatch] | None = None
        self._stream_at: tuple[int, int] = (-1, -1)
        self._epoch_view: tuple[int, list[int]] = (-1, [])     # (epoch, index into data.train of each example)
        self.objective = get_objective(config.task)
        self.init: InitRun | None = None       # init_from's run, once setup() has read it
        self.run_dir = Path(config.output_dir)
        self.layout = RunDir(self.run_dir)
        self.checkpoints = CheckpointDir(self.layout.checkpoints)

    # ------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        config = self.config
        self.started = time.time()
        # the engine of this launch (one process, DDP, FSDP2, DeepSpeed): training/strategies/
        self.dist = dist = setup_distributed(cpu=config.device == "cpu")
        self.objective.processes = dist
        if dist.is_main:
            check_output_dir(self.run_dir)
        if config.auto_fit:
            self._fit_to_memory()
        dist.check(config)                          # what the engine does not train yet: one line
        # init_from: the run whose adapter this one continues, checked (and its method settings taken) before any
        # model loads (runs/init_from.py)
        self.init = resolve_init_from(config)
        if dist.is_main:
            self.layout.config.write_text(dump_config(config))
            for stale in self.checkpoints.clean_stale():
                log.info("removed %s, left by an interrupted save", stale)
        dist.barrier()
        seed_everything(config.seed)
        _configure_cpu(config.threads)

        self.device = dist.device() or pick_device(config.device)
        self.plan = plan = precision_plan(config, self.device, by_engine=dist.precision_by_engine)
        self.dtype, self.dtype_reason = plan.base_dtype, plan.reason
        dist.precision = self.precision = Precision(plan, self.device)
        log.info("device %s, precision %s", self.device, plan.describe())
        check_kernels(config, self.device)           # attention: flash_varlen / kernels: liger this machine lacks

        self.tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
        # the chat template of the run (template:): rendering, the token cache and every saved tokenizer use it
        self.template = apply_template(self.tokenizer, config.template, config.model,
                                       needs_chat=config.task != "pretrain" and config.data.format != "text")
        set_template_kwargs(self.tokenizer, config.template_kwargs)     # saved with the tokenizer, like the template
        try:        # the format the run's tool calls are written in: one the template (or the built-in) renders
            resolve_tool_format(config.data.tool_call_format, self.tokenizer.chat_template)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        log.info("chat template: %s (%s)%s%s", config.template, self.template.source,
                 f" with {config.template_kwargs}" if config.template_kwargs else "",
                 "; trust_remote_code: true" if config.trust_remote_code else "")
        with dist.main_process_first():            # the main process fills the tokenized-data cache
            self.data = data = self.objective.prepare_data(config, self.tokenizer)
        if data.rejects and dist.is_main:
            write_rejects(data.rejects, self.layout.rejects)
        log.info("data: %d train / %d validation examples (%s), %d train tokens, %d rejected",
                 len(data.train), len(data.validation), ", ".join(f"{k}: {v}" for k, v in data.formats.items()),
                 data.train_tokens, len(data.rejects))
        if data.mixture is not None:
            log.info("mixture: %d examples an epoch: %s", data.epoch_length, "; ".join(
                f"{s.name} {s.per_epoch} of {s.size} ({s.per_epoch / max(1, data.epoch_length):.1%})"
                for s in data.mixture.sources))

        base = load_base_model(config, dtype=self.dtype, device=self.device)
        # the collapse check's mark: the loss of a uniform guess over the vocabulary (SFT, pretraining)
        self.uniform_loss = self.objective.uniform_loss(getattr(base.config, "vocab_size", None))
        self.model = model = apply_method(base, config, self.tokenizer)
        cast_trained(model, plan)                 # adapters fp32 on a bf16 / fp16 / 4-bit base
        if self.init is not None:                 # the init run's adapter, exactly, in the adapter apply made
            try:
                load_weights_into(model, self.init.path, config)
            except ValueError as e:
                raise ConfigError(f"init_from: {e}") from None
            log.info("init_from: continuing the %s adapter of %s (adapter sha256 %s)", self.init.method,
                     self.init.path, (self.init.adapter_sha256 or "unknown")[:12])
        prepare_for_training(model, config, reentrant=dist.reentrant_checkpointing)
        with self.precision.autocast():           # e.g. the frozen init adapter, full fine-tuning's reference
            self.objective.before_training(model, data, config, self.device)
        self.trainable, self.total = count_parameters(model)      # before ZeRO-3 partitions the parameters
        log.info("trainable parameters: %s of %s (%.4f%%)", f"{self.trainable:,}", f"{self.total:,}",
                 100 * self.trainable / self.total)
        log.info("learning rate %g (%s)", config.learning_rate, config.learning_rate_origin())
        # the engine wraps the model (several processes: forward, LM head and loss inside its wrapper) and builds
        # the optimizer in the order it needs (FSDP2 over the shards; DeepSpeed takes it along)
        optimizer = dist.prepare(model, self.objective, config,
                                 lambda c, params: make_optimizer(c, params, compensated=plan.compensated))
        self.steps = total_steps(config, data.epoch_length, dist.world, self.objective.repeats(config))
        per_step = config.batch_size * config.gradient_accumulation_steps * dist.world
        log.info("training %d steps x %d examples = %.2f epochs of %d examples%s", self.steps, per_step,
                 self.steps * per_step / max(1, data.epoch_length), data.epoch_length,
                 " (max_steps; set epochs or a larger max_steps to see more of the data)"
                 if config.max_steps and self.steps * per_step < data.epoch_length else
                 " (data.streaming: the examples tokenized so far)" if isinstance(data, StreamingData) else "")
        warmup = config.warmup_steps if config.warmup_steps is not None else round(config.warmup_ratio * self.steps)
        scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=warmup,
                                  num_training_steps=self.steps)
        self.eval_every, self.val_examples = self._validation_plan(data)
        self.val_batches = list(self.objective.micro_batches(
            self.val_examples, config.eval_batch_size or 4 * config.batch_size, config.seed, 0, shuffle=False))
        self.val_sources = self._validation_by_source(data)
        self.eval_seconds = self.base_eval_seconds = 0.0
        self.state = TrainState(optimizer=optimizer, scheduler=scheduler, fingerprint=self._fingerprint(),
                                precision=self.precision)
        if self.resume:
            self._resume()             # last: it restores the RNG streams that set-up has drawn from
        self.metrics = MetricsLog(self.layout.metrics if dist.is_main else None,
                                  keep_rows=self.state.metrics_rows if self.resume else None)
        self.trackers = Trackers(config.report_to, self.run_dir.name, self.run_dir, config.model_dump(mode="json"),
                                 enabled=dist.is_main)

    def _validation_plan(self, data: Any) -> tuple[int, list]:
        """How often to validate, and on which examples: all of them every ``eval_every`` steps (default: 5
        evaluations a run), or, with ``eval_share``, a fixed seeded subset whose forward passes over the run
        cost about that share of training's (a forward-only token costs about a third of a trained one:
        forward + backward). The subset never goes below :data:`MIN_EVAL_EXAMPLES`; when even that many at
        every default evaluation would cost more, the evaluations are spaced further apart (at least one, at
        the end). An ``eval_every`` you set is kept."""
        config, examples = self.config, data.validation
        every = config.eval_every or max(1, self.steps // 5)
        if not examples or config.eval_share is None:
            return every, examples
        train_tokens = self.steps * config.batch_size * config.gradient_accumulation_steps * (
            data.train_tokens / max(1, len(data.train)))
        val_tokens = sum(len(e.input_ids) for e in examples) / len(examples)
        budget = config.eval_share * 3 * train_tokens / val_tokens          # validation examples over the run
        floor = min(MIN_EVAL_EXAMPLES, len(examples))
        if config.eval_every is None and budget < floor * math.ceil(self.steps / every):
            evals = max(1, int(budget // floor))
            every = math.ceil(self.steps / evals)
        n_evals = math.ceil(self.steps / every)
        keep = max(floor, int(budget / n_evals))
        if keep >= len(examples):
            return every, examples
        order = list(range(len(examples)))
        random.Random(config.seed).shuffle(order)
        log.info("validation: %d of %d examples at each of %d evaluations, every %d steps (eval_share %.2f of "
                 "training compute; set eval_share: null to use all)", keep, len(examples), n_evals, every,
                 config.eval_share)
        return every, [examples[i] for i in sorted(order[:keep])]

    def _validation_by_source(self, data: Any) -> list[tuple[str, list]]:
        """A mixture's validation micro-batches of each source, as ``(name, batches)`` (the examples
        :meth:`_validation_plan` kept); empty without a mixture."""
        if data.mixture is None:
            return []
        kept = {id(e) for e in self.val_examples}
        size = self.config.eval_batch_size or 4 * self.config.batch_size
        out = []
        for name, examples in data.mixture.validation_of(data.validation):
            mine = [e for e in examples if id(e) in kept]
            if mine:
                out.append((name, list(self.objective.micro_batches(mine, size, self.config.seed, 0, shuffle=False))))
        return out

    def _fit_to_memory(self) -> None:
        """``auto_fit``: apply :func:`tuneforge.estimate.plan.plan_for_config`'s choice to the config."""
        from tuneforge.estimate.plan import plan_for_config

        resolved = precision_plan(self.config, pick_device(self.config.device))
        plan = plan_for_config(self.config, precision=(resolved.mode, resolved.reason))
        log.info("auto_fit:\n%s", plan.table())
        if plan.chosen is None:
            raise ConfigError(f"auto_fit: nothing fits in {plan.budget / 2**30:.2f} GiB (smallest predicted peak "
                              f"{min(c.peak for c in plan.tried) / 2**30:.2f} GiB); shorten data.max_length, lower "
                              "lora.r, or raise memory_budget")
        chosen = plan.chosen
        self.config.method = chosen.method
        self.config.batch_size = chosen.batch_size
        self.config.gradient_accumulation_steps = chosen.gradient_accumulation_steps
        self.config.gradient_checkpointing = chosen.gradient_checkpointing

    def _fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues: the config (but for
        :data:`RESUMABLE_CHANGES`, and the accumulation, compared as accumulation x processes) and the content of
        the data files (and of the ``init_from`` run's adapter)."""
        config = _without_resumable_changes(self.config.model_dump(mode="json"))
        # every process draws a step's accumulation x processes micro-batches from one seeded stream: the data order
        # depends on the product only, so a run may resume on other processes with the accumulation to match
        config.pop("gradient_accumulation_steps")
        sources = self.config.data.sources
        data: dict[str, Any] = {
            "train": data_sha256(self.config.data.train_file()) if sources is None else
            # a mixture: each source's content and what it gives an epoch (its path may change, as a file's may)
            [{**s.model_dump(mode="json", exclude={"path", "validation", "name"}), "sha256": data_sha256(s.spec),
              "validation": data_sha256(s.validation) if s.validation else None} for s in sources],
            "validation": data_sha256(self.config.data.validation) if self.config.data.validation else None}
        if self.init is not None:       # the run continued: by its adapter's content, wherever it is now
            data["init_from"] = self.init.adapter_sha256 or str(self.init.path)
        return {"config": config, "data": data,
                MICRO_BATCHES_PER_STEP: self.config.gradient_accumulation_steps * self.dist.world}

    def _resumable_checkpoint(self) -> tuple[Path, dict[str, Any]]:
        """The newest ``last`` checkpoint that reads back whole, and its saved state. A damaged one (a truncated
        or unreadable file, a damaged pointer) is reported in one line, set aside and the one before it used."""
        candidates, pointer_problem = self.checkpoints.candidates("last")
        if pointer_problem:
            log.warning("--resume: %s; looking at the checkpoint folders themselves", pointer_problem)
        if not candidates:
            raise ResumeError(f"--resume: {self.checkpoints.root} holds no checkpoint to resume from (train with "
                              "save_every, or stop a run with SIGTERM/Ctrl-C to have one written)")
        problems = []
        for i, candidate in enumerate(candidates):
            try:
                saved = _read_checkpoint(candidate.folder)
            except CheckpointDamaged as e:
                problems.append(f"{candidate.folder.name}: {e}")
                rest = candidates[i + 1:]
                if self.dist.is_main:
                    aside = self.checkpoints.set_aside("last", candidate.folder, rest)
                    log.warning("--resume: checkpoint %s (step %d) is damaged (%s); moved to %s. %s", candidate.folder,
                                candidate.step, e, aside.name,
                                f"Falling back to {rest[0].folder.name} (step {rest[0].step})" if rest else
                                "No older checkpoint is kept")
                continue
            if i > 0 or pointer_problem:
                self._repoint(candidates[i:])
            return candidate.folder, saved
        raise ResumeError(f"--resume: every checkpoint in {self.checkpoints.root} is damaged "
                          f"({'; '.join(problems)}); train into a new output_dir")

    def _repoint(self, keep: list[Candidate]) -> None:
        """Point ``last`` at ``keep`` (after a damaged pointer or checkpoint), so that later saves rotate from it."""
        if self.dist.is_main:
            self.checkpoints.point("last", keep)
        self.dist.barrier()

    def _resume(self) -> None:
        folder, saved = self._resumable_checkpoint()
        self._check_engine(folder, saved.get("optimizer") or {})      # first: an engine changes config defaults too
        then = dict(saved["counters"]["fingerprint"])
        then["config"] = _added_since(_without_resumable_changes(dict(then.get("config", {}))),
                                      self.state.fingerprint["config"])    # checkpoints from before
        changed = fingerprint_differences(then, self.state.fingerprint)
        if MICRO_BATCHES_PER_STEP in changed:
            was = saved["counters"]["fingerprint"].get(MICRO_BATCHES_PER_STEP)
            now = self.state.fingerprint[MICRO_BATCHES_PER_STEP]
            changed[changed.index(MICRO_BATCHES_PER_STEP)] = (
                f"gradient_accumulation_steps x processes ({was} then, {now} now)")
        if changed:
            raise ResumeError(f"--resume: the run in {self.run_dir} was trained with different "
                              f"{', '.join(changed)}; resume with the same config and data, or train into a new "
                              "output_dir")
        with safe_open(str(folder / TRAINABLE_FILE), framework="pt") as f:
            names = set(f.keys())
            expected = {n for n, p in self.model.named_parameters() if p.requires_grad}
            if names != expected:
                raise ResumeError(f"--resume: {folder / TRAINABLE_FILE} holds other trained parameters than this "
                                  f"model ({len(names ^ expected)} differ); was the method changed?")
            # into the parameters, or their shards (FSDP2), or the engine's own checkpoint (DeepSpeed: weights and
            # each process's optimizer partition), on every process
            self.dist.load_trained(folder, f.get_tensor, names)
        fingerprint = self.state.fingerprint          # today's (the paths where the run and its data are now)
        self.state.load_state_dict(saved, load_optimizer=self.dist.load_optimizer)
        self.state.fingerprint = fingerprint
        self.objective.load_state(folder, self.device)
        log.info("resumed from %s: step %d, epoch %d, micro-batch %d", folder, self.state.step, self.state.epoch,
                 self.state.micro_batch)

    def _check_engine(self, folder: Path, optimizer: dict[str, Any]) -> None:
        """Refuse a resume whose optimizer state another engine wrote (see :meth:`Strategy.launch_of`)."""
        was, now = self.dist.launch_of(optimizer), self.dist.launch_of()
        if was != now:
            raise ResumeError(f"--resume: {folder} was saved with {was}; this run has {now}: resume it with the same "
                              "launch as the run it continues")

    # -------------------------------------------------------------------------------------- fit

    def _next_micro_batches(self, n: int) -> list[PackedBatch]:
        """The next ``n`` micro-batches at the state's data cursor (epochs reshuffled), advancing the cursor.

        Each batch's ``example_ids`` are indices into ``data.train`` (a mixture's epoch draws from its sources:
        :meth:`PreparedData.epoch_examples`); a mixture's examples and tokens of each source are counted."""
        state, config = self.state, self.config
        if isinstance(self.data, StreamingData):
            return self._next_streamed(n)
        per_epoch = batches_per_epoch(self.data.epoch_length, config.batch_size) * self.objective.repeats(config)
        out: list[PackedBatch] = []
        while len(out) < n:
            if state.micro_batch >= per_epoch:
                state.epoch, state.micro_batch = state.epoch + 1, 0
            # one shuffled stream per epoch, opened at the cursor (on resume: mid-epoch), kept across steps
            if self._stream is None or self._stream_at != (state.epoch, state.micro_batch):
                examples, indices = self.data.epoch_examples(config.seed, state.epoch)
                self._epoch_view = (state.epoch, indices)
                self._stream = self.objective.micro_batches(examples, config.batch_size, config.seed,
                                                            state.epoch, start=state.micro_batch)
            batch = next(self._stream)
            batch.example_ids = [self._epoch_view[1][i] for i in batch.example_ids]
            self._count_sources(batch)
            out.append(batch)
            state.micro_batch += 1
            self._stream_at = (state.epoch, state.micro_batch)
        return out

    def _next_streamed(self, n: int) -> list[PackedBatch]:
        """:meth:`_next_micro_batches` of ``data.streaming``: an epoch ends where its stream does (the number of
        examples is not known before the file is read); ``example_ids`` index the token store."""
        state, config, data = self.state, self.config, self.data
        assert isinstance(data, StreamingData)
        out: list[PackedBatch] = []
        while len(out) < n:
            if self._stream is None or self._stream_at != (state.epoch, state.micro_batch):
                self._stream = data.micro_batches(config.batch_size, config.seed, state.epoch, start=state.micro_batch)
            batch = next(self._stream, None)
            if batch is None:                       # the epoch's last micro-batch was drawn
                state.epoch, state.micro_batch = state.epoch + 1, 0
                self._stream = None
                continue
            out.append(batch)
            state.micro_batch += 1
            self._stream_at = (state.epoch, state.micro_batch)
        return out

    def _count_sources(self, batch: PackedBatch) -> None:
        """A mixture: add ``batch``'s examples and tokens to their sources' counts in the state."""
        mixture, state = self.data.mixture, self.state
        if mixture is None:
            return
        for i in batch.example_ids:
            name = mixture.sources[mixture.source_of(i)].name
            state.source_examples[name] = state.source_examples.get(name, 0) + 1
            state.source_tokens[name] = state.source_tokens.get(name, 0) + len(self.data.train[i])

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns its metrics row."""
        config, state, objective = self.config, self.state, self.objective
        step_start = time.time()
        dist = self.dist
        # every process draws the step's micro-batches of all processes and trains on its share (distributed.py)
        batches = self._next_micro_batches(config.gradient_accumulation_steps * dist.world)
        mine = batches[dist.rank::dist.world]
        if objective.local_normaliser:
            # the normaliser's work (GRPO: the rollout) on this process's share only, summed over the processes
            normaliser = dist.sum(sum(objective.normaliser(b) for b in mine))
        else:
            normaliser = sum(objective.normaliser(b) for b in batches)
        step_loss = 0.0
        sums: dict[str, float] = {}
        for i, batch in enumerate(mine):
            # the gradient of loss_sum / normaliser (the engine's backward; DeepSpeed's steps at the last)
            out = dist.forward_backward(batch.to(self.device), normaliser, last=i == len(mine) - 1)
            if out is None:            # one process: a micro-batch without a trained token
                continue
            step_loss += out.loss_sum.item()
            for key, value in out.metrics.items():
                sums[key] = sums.get(key, 0.0) + value
        step_loss, sums = dist.sum(step_loss), dist.sum_each(sums)       # over the processes
        objective.end_step()
        if objective.local_normaliser and not normaliser:
            dist.zero_grad()      # nothing trained anywhere: no gradient, as one process (which runs no micro-batch)
        # the whole gradient's norm, clipped (max_norm inf: measured for the finiteness check, nothing scaled);
        # DeepSpeed's engine has clipped and stepped already (or skipped a non-finite step)
        grad_norm = dist.clip_grad_norm(config.max_grad_norm or math.inf)
        scaled = self.precision.scaler is not None
        finite = math.isfinite(step_loss) and bool(torch.isfinite(grad_norm))
        scaler_skipped = False
        if scaled and math.isfinite(step_loss) and not finite:
            # fp16-mixed: gradients that overflowed at this loss scale are the scaler's to handle (it skips the step
            # and halves the scale), not the NaN guard's, until the scale itself has collapsed
            dist.optimizer_step()
            scaler_skipped = True
            state.scaler_skipped_steps += 1
            self._check_scale(batches, step_loss)
        elif finite:
            dist.optimizer_step()
            scaler_skipped = self.precision.last_skipped
            state.scaler_skipped_steps += scaler_skipped
        else:
            self.precision.skip()
            self._non_finite(batches, step_loss, float(grad_norm))
        state.scheduler.step()
        dist.zero_grad()

        state.step += 1
        # a local normaliser: only this process's micro-batches know their tokens (GRPO: their rollouts')
        step_tokens = (int(dist.sum(sum(b.num_tokens for b in mine))) if objective.local_normaliser else
                       sum(b.num_tokens for b in batches))
        state.seen_tokens += step_tokens
        elapsed = time.time() - self.loop_start
        loss = step_loss / max(normaliser, 1)
        if finite:
            state.last_loss = loss
        row: dict[str, Any] = {
            "step": state.step, "loss": round(loss, 6) if finite or scaler_skipped else None,
            "lr": state.scheduler.get_last_lr()[0],
            "tokens": step_tokens, "trained_tokens": normaliser,
            "tokens_per_s": round(step_tokens / max(time.time() - step_start, 1e-9), 1),
            "avg_tokens_per_s": round(state.seen_tokens / max(elapsed, 1e-9), 1), "elapsed_s": round(elapsed, 2)}
        row.update({k: round(v, 6) for k, v in objective.mean_metrics(sums, normaliser).items()})
        if self.data.mixture is not None:          # running totals of each source, as run.json records them
            row.update({f"examples_seen/{k}": v for k, v in state.source_examples.items()})
            row.update({f"tokens_seen/{k}": v for k, v in state.source_tokens.items()})
        if scaled:
            row["loss_scale"] = self.precision.loss_scale
            if scaler_skipped:
                row["scaler_skipped"] = True
        if finite and not scaler_skipped:
            row["grad_norm"] = round(float(grad_norm), 4)
            if objective.watches_divergence:
                if normaliser > 0:
                    self._check_collapse(row, float(grad_norm))
                self._check_divergence(row)
        elif not finite and not scaler_skipped:
            row["skipped"] = True
        return row

    MIN_LOSS_SCALE = 1.0

    def _check_scale(self, batches: list[PackedBatch], loss: float) -> None:
        """fp16-mixed: stop when the scaler has backed off below :data:`MIN_LOSS_SCALE`: the gradients overflow
        fp16 even unscaled, and no number of skipped steps will fix that."""
        scale = self.precision.loss_scale
        if scale is None or scale >= self.MIN_LOSS_SCALE:
            log.info("step %d: gradients overflowed fp16; the scaler skipped the step (loss scale now %g)",
                     self.state.step + 1, scale)
            return
        last = self.checkpoints.current("last")
        kept = f"the last checkpoint is kept: {last}" if last else "no checkpoint was saved yet (set save_every)"
        raise NonFiniteLossError(
            f"step {self.state.step + 1}: the gradients overflow fp16 at every loss scale (scale {scale:g} after "
            f"{self.state.scaler_skipped_steps} skipped steps; loss {loss:.4g}) on train examples "
            f"{self._examples_of(batches)}. Use precision: bf16-mixed (GPUs with bf16) or fp32, or lower "
            f"learning_rate (now {self.config.learning_rate:g}). Training stopped; {kept}.")

    def _examples_of(self, batches: list[PackedBatch]) -> str:
        ids = [i for b in batches for i in b.example_ids]
        shown = []
        for i in ids[:4]:
            example = self.data.train[i]
            # the end of the prompt and the start of the answer: what tells one record from another
            first = next((j for j, t in enumerate(example.trained) if t), 0)
            window = example.input_ids[max(0, first - 24):first + 16]
            text = str(self.tokenizer.decode(window, skip_special_tokens=True))
            shown.append(f"#{i} {' '.join(text.split())[:60]!r}")
        more = f" and {len(ids) - 4} more" if len(ids) > 4 else ""
        return ", ".join(shown) + more

    def _non_finite(self, batches: list[PackedBatch], loss: float, grad_norm: float) -> None:
        """Stop (or count a skipped step) after a NaN/inf loss or gradient, naming the step's examples."""
        config, state = self.config, self.state
        state.skipped_steps += 1
        last = self.checkpoints.current("last")
        fp16 = ("fp16 overflow (precision fp16-mixed: use bf16-mixed or fp32), " if self.plan.mode == "fp16-mixed"
                else "")
        what = (f"step {state.step + 1}: loss {loss:.4g}, gradient norm {grad_norm:.4g} (not finite) on train "
                f"examples {self._examples_of(batches)}. Likely causes: a learning rate too high "
                f"(learning_rate={config.learning_rate:g}), {fp16}or a bad record among these examples")
        if config.on_nonfinite == "skip" and state.skipped_steps <= config.max_skipped_steps:
            log.warning("%s; skipped (%d of at most %d)", what, state.skipped_steps, config.max_skipped_steps)
            return
        limit = (f"; {state.skipped_steps} steps skipped, more than max_skipped_steps={config.max_skipped_steps}"
                 if config.on_nonfinite == "skip" else "; set on_nonfinite: skip to skip such steps")
        kept = f"the last checkpoint is kept: {last}" if last else "no checkpoint was saved yet (set save_every)"
        raise NonFiniteLossError(f"{what}{limit}. Training stopped; {kept}.")

    def _check_divergence(self, row: dict[str, Any]) -> None:
        """Warn about (or stop) a loss that stays above ``divergence_factor`` x its first value."""
        config, state = self.config, self.state
        loss = row["loss"]
        if state.first_loss is None:
            state.first_loss = loss
            return
        if config.on_divergence == "off":
            return
        state.diverging_steps = state.diverging_steps + 1 if loss > config.divergence_factor * state.first_loss else 0
        if state.diverging_steps != config.divergence_steps:
            return
        message = (f"step {state.step}: the loss ({loss:.4g}) has stayed above {config.divergence_factor:g} x its "
                   f"first value ({state.first_loss:.4g}) for {config.divergence_steps} steps: training is diverging. "
                   f"Lower learning_rate (now {config.learning_rate:g}) or raise warmup")
        self._stop_or_warn(DivergenceError, message, row, "diverging")

    def _check_collapse(self, row: dict[str, Any], grad_norm: float) -> None:
        """Stop (or warn about) a run that has collapsed for ``divergence_steps`` steps in a row: its loss sits at
        a uniform guess over the vocabulary (ln V) although it started clearly below it, or its gradient norm is
        exactly 0 (nothing can train any more). Neither is a NaN, so the NaN check never sees them."""
        config, state = self.config, self.state
        if config.on_divergence == "off":
            return
        loss, uniform = row["loss"], self.uniform_loss
        first = state.first_loss if state.first_loss is not None else loss
        at_uniform = (uniform is not None and first < 0.9 * uniform and abs(loss - uniform) < 0.02 * uniform)
        signs = [f"the loss ({loss:.4g}) is a uniform guess over the vocabulary (ln V = {uniform:.4g}; it started at "
                 f"{first:.4g})"] if at_uniform else []
        if grad_norm == 0.0:
            signs.append("the gradient norm is exactly 0")
        state.collapsed_steps = state.collapsed_steps + 1 if signs else 0
        if state.collapsed_steps != config.divergence_steps:
            return
        overflow = ", fp16 overflow (use precision bf16-mixed or fp32)" if self.plan.mode == "fp16-mixed" else ""
        message = (f"step {state.step}: training has collapsed: {' and '.join(signs)}, for {config.divergence_steps} "
                   f"steps in a row. Likely causes: a learning rate far too high (learning_rate="
                   f"{config.learning_rate:g}){overflow}, or no trainable parameter reaching the loss")
        self._stop_or_warn(CollapseError, message, row, "collapsed")

    def _stop_or_warn(self, error: type[DivergenceError], message: str, row: dict[str, Any], warning: str) -> None:
        """``on_divergence: stop`` raises ``error`` naming what the run leaves; ``warn`` logs and marks the row (the
        first warning of a step stays)."""
        if self.config.on_divergence == "stop":
            raise error(f"{message}. Training stopped; {self._kept_checkpoints()} (on_divergence: warn goes on)")
        log.warning("%s (on_divergence: stop ends such runs)", message)
        row.setdefault("warning", warning)

    def _kept_checkpoints(self) -> str:
        """What a stopped run leaves to use: its best and last checkpoints."""
        best, last = self.checkpoints.current("best"), self.checkpoints.current("last")
        kept = ([f"the best checkpoint (step {self.state.best_step}, {self.objective.eval_metric} "
                 f"{self.state.best_score:.4g}) is {best}"] if best is not None and self.state.best_step else [])
        kept += [f"the last is {last}"] if last is not None else []
        return "; ".join(kept) if kept else "no checkpoint was saved yet (set save_every)"

    def evaluate(self) -> dict[str, float]:
        """The objective's validation metrics; keeps the best checkpoint and counts evaluations without gain."""
        config, state, objective = self.config, self.state, self.objective
        started = time.perf_counter()
        # on every process (FSDP2: inside the sharded model's forward)
        results = self.dist.run(lambda model: self._autocast(objective.evaluate, model))
        seconds = time.perf_counter() - started
        self.eval_seconds += seconds
        score = results[objective.eval_metric]
        state.first_eval = state.first_eval or (state.step, score)
        state.last_eval = (state.step, score)
        if objective.improved(score, state.best_score):
            state.best_score, state.best_step, state.bad_evals = score, state.step, 0
            if config.keep_best:
                self.save_checkpoint("best", with_state=False)
        else:
            state.bad_evals += 1
        log.info("step %d: %s %.4f (best %.4f at step %s)", state.step, objective.eval_metric, score,
                 state.best_score, state.best_step)
        return {**{k: round(v, 6) for k, v in results.items()}, "eval_seconds": round(seconds, 3)}

    def _autocast(self, evaluate: Any, model: torch.nn.Module) -> dict[str, float]:
        """``evaluate(model, ...)`` on the validation batches, in the run's precision (as training computes).

        A mixture: on each source's batches (``eval_loss/<source>``), the whole's metrics the normaliser-weighted
        mean of the sources' (the token-weighted loss over them all, as one pass over every batch gives)."""
        with self.precision.autocast():
            if not self.val_sources:
                return evaluate(model, self.val_batches, self.device, self.config)
            out: dict[str, float] = {}
            total: dict[str, float] = {}
            weight = 0.0
            for name, batches in self.val_sources:
                results = evaluate(model, batches, self.device, self.config)
                w = sum(self.objective.normaliser(b) for b in batches)
                weight += w
                for key, value in results.items():
                    total[key] = total.get(key, 0.0) + value * w
                    out[f"{key}/{name}"] = value
            return {**{k: v / max(weight, 1e-12) for k, v in total.items()}, **out}

    def evaluate_base(self) -> None:
        """``eval_base``: the objective's validation metric of the model before the first step, with its method
        disabled where the method can be (so: the base model; full fine-tuning has not changed it yet); with
        ``init_from``, the model as it is (the init run's model, where this run starts). The end-of-run check
        compares the final validation with it; it is not a candidate for the best checkpoint."""
        config, objective = self.config, self.objective
        started = time.perf_counter()
        can_disable = get_method(config.method).disable is not None and self.init is None

        def run(model: torch.nn.Module) -> dict[str, float]:
            if not can_disable:
                return self._autocast(objective.evaluate, model)
            with method_disabled(model, config):
                return self._autocast(objective.evaluate, model)

        results = self.dist.run(run)
        seconds = time.perf_counter() - started
        self.eval_seconds += seconds
        self.base_eval_seconds = seconds
        self.state.base_score = results[objective.eval_metric]
        log.info("before training: %s %.4f (the model before the first step; %.1fs)", objective.eval_metric,
                 self.state.base_score, seconds)

    def save_checkpoint(self, kind: str, with_state: bool = True) -> Path:
        """The trained weights and tokenizer (and, with ``with_state``, the :class:`TrainState`) as the
        current ``kind`` checkpoint."""
        # the weights (and optimizer state) as the main process writes them: gathered first, by every process,
        # where the engine splits them (FSDP2, DeepSpeed)
        gathered = self.dist.gather(with_optimizer=with_state)

        def write(folder: Path) -> None:
            gathered.save_model(folder)
            self.objective.save(gathered.model, folder)       # e.g. a reward model's head
            self.tokenizer.save_pretrained(folder)
            if with_state:
                self.state.save(folder, optimizer_state=gathered.optimizer)
                self.objective.save_state(folder)         # e.g. the size of GRPO's samples.jsonl
                save_file(gathered.trained(), str(folder / TRAINABLE_FILE))

        dist, step = self.dist, self.state.step
        # a fresh folder from the main process; DeepSpeed's processes each write their part into it first
        folder = dist.broadcast(self.checkpoints.begin(kind, step) if dist.is_main else None)
        if with_state:
            dist.save_engine_state(folder)
            self.objective.save_process_state(folder)     # e.g. GRPO's rollouts of this process's micro-batches
            dist.barrier()                                # in the folder before the main process commits it
        keep = self.config.keep_checkpoints if kind == "last" else 1
        path = self.checkpoints.commit(kind, step, folder, write, keep=keep) if dist.is_main else \
            self.checkpoints.root / f"{kind}-{step:06d}"
        dist.barrier()
        return path

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signal is not None:          # a second Ctrl-C: stop now, the last checkpoint stays as it is
            raise KeyboardInterrupt
        self._signal = signum
        log.warning("%s: finishing step %d, then saving a checkpoint", signal.Signals(signum).name,
                    self.state.step + 1)

    def fit(self) -> None:
        """The loop. SIGTERM/SIGINT end it after the current step with a ``last`` checkpoint
        (:class:`TrainingInterrupted`)."""
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._loop()
            self.objective.after_training()
        finally:
            if isinstance(self.data, StreamingData):
                self.data.close()           # what it tokenized stays in the store; the next run continues it
            for s, h in handlers.items():
                signal.signal(s, h)
            self.metrics.close()
            self.trackers.finish()

    def _loop(self) -> None:
        config, state = self.config, self.state
        bar = tqdm(total=self.steps, initial=state.step, desc="training", unit="step",
                   disable=not (config.progress and self.dist.is_main),
                   dynamic_ncols=True)
        self.loop_start = time.time()
        if self.val_batches and config.eval_base and state.step == 0 and state.base_score is None:
            self.evaluate_base()
        while state.step < self.steps:
            row = self.train_step()
            if self.val_batches and (state.step % self.eval_every == 0 or state.step == self.steps):
                row.update(self.evaluate())
            if state.step % config.log_every == 0 or self.objective.eval_metric in row or state.step == self.steps:
                self.metrics.log(**row)
                self.trackers.log(row)
                state.metrics_rows += 1
            if (config.save_every and state.step % config.save_every == 0) or self._signal is not None:
                checkpoint = self.save_checkpoint("last")    # after the row: a resumed run logs from the next step
                if self._signal is not None:
                    bar.close()
                    raise TrainingInterrupted(state.step, checkpoint, self._signal)
            shown_loss = state.last_loss if state.last_loss is not None else math.nan
            bar.set_postfix(loss=f"{shown_loss:.4f}", tok_s=f"{row['avg_tokens_per_s']:.0f}",
                            **({"eval": f"{row[self.objective.eval_metric]:.4f}"}
                               if self.objective.eval_metric in row else {}),
                            **({"eval_time": f"{self.eval_seconds:.0f}s"} if self.eval_seconds else {}))
            bar.update(1)
            if config.early_stopping_patience and state.bad_evals >= config.early_stopping_patience:
                log.info("early stopping at step %d: no eval improvement in %d evaluations", state.step,
                         state.bad_evals)
                break
        bar.close()

    # ----------------------------------------------------------------------------------- finish

    def verdict(self) -> list[str]:
        """The end-of-run check (``on_divergence``): why this run ended worse than it started, if it did. The
        final validation must not be worse (beyond ``regression_tolerance``) than the run's first evaluation: the
        model before training (``eval_base``), or without it the first validation during training. A final
        validation worse than a later, better one (overfitting at the end) is not a failure: ``keep_best`` makes that
        better checkpoint the output."""
        config, state, objective = self.config, self.state, self.objective
        if config.on_divergence == "off" or state.last_eval is None:
            return []
        metric, tolerance = objective.eval_metric, config.regression_tolerance
        (last_step, last), problems = state.last_eval, []
        if state.base_score is not None:
            if objective.worse(last, state.base_score, tolerance):
                problems.append(f"the final {metric} ({last:.4g}, step {last_step}) is worse than the model's before "
                                f"training ({state.base_score:.4g})")
        elif state.first_eval is not None and state.first_eval[0] != last_step and objective.worse(
                last, state.first_eval[1], tolerance):
            problems.append(f"the final {metric} ({last:.4g}, step {last_step}) is worse than the first validation's "
                            f"({state.first_eval[1]:.4g}, step {state.first_eval[0]})")
        return problems

    def _output(self, problems: list[str]) -> Path | None:
        """The checkpoint whose weights become the run's output: the best one (``keep_best``), else the final weights;
        None when the run regressed and no checkpoint better than the model before training exists (a ruined run
        writes no weights at the top of its directory)."""
        config, state, objective = self.config, self.state, self.objective
        best = self.checkpoints.current("best") if config.keep_best and state.best_step is not None else None
        if best is not None and not (state.base_score is not None and state.best_score is not None and
                                     objective.worse(state.best_score, state.base_score, config.regression_tolerance)):
            return best
        final = self.save_checkpoint("final", with_state=False)
        return None if problems and config.on_divergence == "stop" else final

    def finish(self) -> RunResult:
        """The best checkpoint (or the last weights) at the top of the run directory, the loss curve, run.json.
        A run that ended worse than it started (:meth:`verdict`) raises :class:`RunRegressed` after writing them,
        without the worse weights (``on_divergence: stop``)."""
        config, state = self.config, self.state
        problems = self.verdict()
        output = self._output(problems)
        wall = time.time() - self.started
        if not self.dist.is_main:      # the main process writes the run directory
            self.dist.barrier()
            if problems and config.on_divergence == "stop":
                raise RunRegressed("; ".join(problems))
            return RunResult(self.run_dir, state.step, state.last_loss, None if state.best_step is None else
                             state.best_score, state.best_step, self.trainable, self.total, wall, self.metrics.rows)
        if output is not None:
            copy_files(output, self.run_dir, skip=(STATE_FILE, TRAINABLE_FILE))
        plot_loss_curve(self.metrics.rows, self.layout.loss_curve,
                        title=f"{config.method} on {', '.join(Path(p).name for p in config.data.train_paths())}")
        data = self.data
        if isinstance(data, StreamingData) and data.rejects:     # the records rejected while training ran
            write_rejects(data.rejects, self.layout.rejects)
        best_score = None if state.best_step is None else state.best_score
        record = RunRecord(
            tuneforge_run=1,
            base_model=base_model_record(config.model, resolve_model(config.model)),
            template=TemplateRecord(**self.template.record(), kwargs=config.template_kwargs or None),
            trust_remote_code=config.trust_remote_code,
            method=config.method,
            task=config.task,
            learning_rate=config.learning_rate,
            learning_rate_default=config.learning_rate_is_default,
            data=data_fingerprints([*config.data.train_paths(), config.data.validation]),
            examples=ExampleCounts(train=len(data.train), validation=len(data.validation), rejected=len(data.rejects),
                                   truncated=data.truncated, formats=data.formats),
            seed=config.seed,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            dtype_reason=self.dtype_reason,
            precision=self.plan.record(),
            scaler_skipped_steps=self.state.scaler_skipped_steps if self.precision.scaler is not None else None,
            steps=state.step,
            trainable_params=self.trainable,
            total_params=self.total,
            final_train_loss=state.last_loss,
            eval_metric=self.objective.eval_metric,
            best_eval_loss=best_score,
            best_step=state.best_step,
            base_eval_loss=state.base_score,
            weights_from_step=(None if output is None else state.best_step if output.name.startswith("best")
                               else state.step),
            status="regressed" if problems else "ok",
            problems=problems,
            train_tokens_seen=state.seen_tokens,
            wall_time_s=round(wall, 2),
            processes=self.dist.world,
            eval_time_s=round(self.eval_seconds, 2),        # the evaluation before training included
            base_eval_seconds=round(self.base_eval_seconds, 3),
            eval_examples=len(self.val_examples),
            versions=library_versions(),
        )
        if data.mixture is not None:         # a mixture: each source, what it gave an epoch and what the run saw
            record.sources = [{**s.record(), "examples_seen": state.source_examples.get(s.name, 0),
                               "tokens_seen": state.source_tokens.get(s.name, 0)} for s in data.mixture.sources]
        if self.init is not None:            # only in a run that continued another: written after task
            record.init_from = self.init.record()
        record.save(self.run_dir)
        self.dist.barrier()
        if problems:
            if config.on_divergence == "stop":
                where = (f"the run's output is the best checkpoint (step {state.best_step})" if output is not None else
                         f"no weights were written to {self.run_dir} (the final ones are in {self.checkpoints.root})")
                raise RunRegressed(f"the run ended worse than it started: {'; '.join(problems)}. {where}; run.json "
                                   "says status: regressed. Lower learning_rate, check the training data against the "
                                   "validation data, or set on_divergence: warn to accept the run")
            log.warning("the run ended worse than it started: %s (on_divergence: stop fails such runs)",
                        "; ".join(problems))
        return RunResult(self.run_dir, state.step, state.last_loss, best_score, state.best_step, self.trainable,
                         self.total, wall, self.metrics.rows)


def train(config: RunConfig, resume: bool = False) -> RunResult:
    """Train ``config.method`` on ``config.data`` with ``config.task``'s objective; write the run directory.

    ``resume``: continue the run in ``config.output_dir`` from its last checkpoint (see :class:`TrainingRecipe`).
    Training only: ``eval.after_training`` is run by :func:`tuneforge.pipeline.train_and_evaluate` (what
    ``tuneforge train`` and ``tuneforge.train`` call).
    """
    recipe = TrainingRecipe(config, resume=resume)
    recipe.setup()
    recipe.fit()
    return recipe.finish()
