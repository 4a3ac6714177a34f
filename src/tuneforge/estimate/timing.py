"""How long a run takes and what it costs, before it runs: ``tuneforge estimate --time`` and a line of
``tuneforge plan``.

``hours = tokens x FLOPs per token / (FLOP/s)``, with

* **tokens**: what the run config trains, counted from its data tokenized exactly as training does (the same
  token cache entry): ``steps x examples per step x mean tokens per example``, with ``steps`` as the trainer
  counts them (:meth:`~tuneforge.config.RunConfig.optimizer_steps`: ``max_steps``, else ``epochs`` passes).
  Rows are packed without padding, so every counted token is a real one; an example longer than
  ``data.max_length`` is counted as the data step leaves it: dropped (``too_long: drop``, the default) or cut to
  ``max_length`` (``truncate``). Validation adds its forward passes (a forward-only token costs a third of a trained
  one): ``n_evals x`` the tokens of the examples each evaluation runs (``eval_share`` as the trainer sizes it; the
  evaluation before training when ``eval_base``).
* **FLOPs per token**: :mod:`tuneforge.estimate.flops` for the method, the model's shape and the data's attention
  span.
* **FLOP/s**, one of two sources:

  - *measured* (the default): a few real steps of the config on this machine (``tuneforge train`` with
    ``max_steps`` = ``steps`` in a temporary folder, in a child process), the first step (warm-up: allocator,
    kernels, caches) left out: ``tokens/s = tokens of steps 2.. / their seconds``. The child's set-up (loading
    the model, the first step's excess, saving) is added once as ``overhead``.
  - *a GPU from the table* (``--gpu``): its dense bf16 peak x an MFU. :data:`DEFAULT_MFU` (0.20) is what
    tuneforge's LoRA step reached on an H200 on a 1B shape (20.3% in the ``4 N_mm`` convention these FLOPs
    use; ``benchmarks/results/gpu_profile_2026-12-04.txt``); it is not measured for full fine-tuning, nor on
    other GPUs or shapes (smaller models reach less of the peak): give ``--mfu`` when you know better.

``cost = hours x price per hour`` (of the whole machine the run uses).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.config import RunConfig
from tuneforge.estimate.flops import FlopsPerToken, attention_span, gpu_peak, method_flops
from tuneforge.estimate.shapes import resolve_shape

DEFAULT_MFU = 0.20
MFU_SOURCE = ("tuneforge's LoRA step on an H200, 1B shape: 20.3% (benchmarks/results/gpu_profile_2026-12-04.txt); "
              "not measured for full fine-tuning or other GPUs")
MEASURE_STEPS = 6
MIN_EVAL_EXAMPLES = 32     # as the trainer's: eval_share never shrinks validation below this many examples


@dataclass(frozen=True)
class TrainingTokens:
    """What a run config trains, in tokens (see the module docstring).

    Attributes:
        steps: optimizer steps; ``per_step``: examples a step (batch x accumulation).
        examples, example_tokens: training examples after the data step and their tokens (one pass).
        tokens: tokens the run trains: ``steps x per_step x example_tokens / examples``.
        span: ``S``, the token-weighted mean example length (attention).
        eval_tokens: tokens validation runs forward over the whole run.
        dropped, truncated: examples ``data.max_length`` dropped (rejected as too long) or cut.
    """

    steps: int
    per_step: int
    examples: int
    example_tokens: int
    tokens: float
    span: float
    eval_tokens: float = 0.0
    dropped: int = 0
    truncated: int = 0

    @property
    def epochs(self) -> float:
        return self.steps * self.per_step / max(1, self.examples)


def count_tokens(config: RunConfig) -> TrainingTokens:
    """Tokenize ``config.data`` as training does (its token cache entry) and count what the run trains."""
    from tuneforge.data.dataset import prepare_data
    from tuneforge.data.rendering import set_template_kwargs
    from tuneforge.data.streaming import StreamingData
    from tuneforge.data.templates.resolve import apply_template
    from tuneforge.models.loading import load_tokenizer

    if config.task not in ("sft", "pretrain"):
        raise ValueError(f"task {config.task}: --time counts the tokens of sft and pretrain runs only (pairs and "
                         "reference passes are not modelled yet)")
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    apply_template(tokenizer, config.template, config.model,
                   needs_chat=config.task != "pretrain" and config.data.format != "text")
    set_template_kwargs(tokenizer, config.template_kwargs)
    data = prepare_data(config.data, tokenizer, config.seed, config.task)
    if isinstance(data, StreamingData):      # data.streaming: the whole file, from the store (tokenized to the end)
        data.train.wait_for(1 << 62, data.writing)
        lengths = [data.train.length(i) for i in range(len(data.train))]
        data.close()
    else:
        lengths = [len(e) for e in data.train]
    if not lengths:
        raise ValueError(f"data.train {config.data.train}: no training example left after the data step")
    steps = config.optimizer_steps(len(lengths))
    per_step = config.batch_size * config.gradient_accumulation_steps
    mean = sum(lengths) / len(lengths)
    tokens = steps * per_step * mean
    dropped = sum(1 for r in data.rejects if any(reason[0] == "too_long" for reason in r.reasons))
    return TrainingTokens(steps, per_step, len(lengths), sum(lengths), tokens, attention_span(lengths),
                          _eval_tokens(config, steps, tokens, [len(e) for e in data.validation]), dropped,
                          data.truncated)


def _eval_tokens(config: RunConfig, steps: int, train_tokens: float, val_lengths: list[int]) -> float:
    """Tokens validation runs forward over the run, as the trainer plans it (``_validation_plan``): every
    ``eval_every`` steps (default 5 evaluations), each over all examples or, with ``eval_share``, over a subset
    whose forwards cost that share of training (at least :data:`MIN_EVAL_EXAMPLES` examples); plus one before
    training with ``eval_base``."""
    if not val_lengths:
        return 0.0
    every = config.eval_every or max(1, steps // 5)
    n_evals = math.ceil(steps / every)
    total, mean = sum(val_lengths), sum(val_lengths) / len(val_lengths)
    per_eval = float(total)
    if config.eval_share is not None:
        floor = min(MIN_EVAL_EXAMPLES, len(val_lengths))
        budget = config.eval_share * 3 * train_tokens / mean        # examples over the run
        if config.eval_every is None and budget < floor * n_evals:
            n_evals = max(1, int(budget // floor))
        per_eval = min(total, max(floor, int(budget / n_evals)) * mean)
    return per_eval * (n_evals + (1 if config.eval_base else 0))


@dataclass(frozen=True)
class Throughput:
    """Trained tokens a second and where the figure comes from.

    Attributes:
        tokens_per_s: trained tokens a second of the run's steps.
        source: in words (``measured: 3 steps on this machine (cpu), the first left out`` or ``H100 ...``).
        peak_tflops, mfu: the table mode's peak (dense bf16 TFLOP/s) and MFU; None when measured.
        overhead_s: seconds the run spends once, outside its steps (measured: set-up, the first step's excess).
        step_seconds, step_tokens: measured: each step's seconds and tokens, the warm-up step first.
    """

    tokens_per_s: float
    source: str
    peak_tflops: float | None = None
    mfu: float | None = None
    overhead_s: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    step_tokens: list[int] = field(default_factory=list)


def gpu_throughput(gpu: str, flops: FlopsPerToken, mfu: float = DEFAULT_MFU,
                   peak_tflops: float | None = None) -> Throughput:
    """Tokens/s on ``gpu`` (a row of :data:`~tuneforge.estimate.flops.GPU_PEAK_BF16_DENSE_TFLOPS`, or any name with
    ``peak_tflops``): ``peak x mfu / FLOPs per token``."""
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu {mfu:g}: give the share of the peak a run reaches, above 0 and at most 1 (e.g. 0.2)")
    if peak_tflops is not None:
        if peak_tflops <= 0:
            raise ValueError(f"--peak-tflops {peak_tflops:g}: give a positive TFLOP/s")
        name, peak, where = gpu, peak_tflops, "--peak-tflops"
    else:
        name, peak, where = gpu_peak(gpu)
    mfu_where = "the default, measured for LoRA on an H200" if mfu == DEFAULT_MFU else "--mfu"
    return Throughput(peak * 1e12 * mfu / flops.total,
                      f"{name}: {peak:g} TFLOP/s dense bf16 ({where.split(':')[0]}) x MFU {mfu:.0%} ({mfu_where})",
                      peak_tflops=peak, mfu=mfu)


def measure_throughput(config: RunConfig, steps: int = MEASURE_STEPS, workdir: str | Path | None = None,
                       timeout_s: float = 1800) -> Throughput:
    """Train ``steps`` real steps of ``config`` in a child ``tuneforge train`` (in ``workdir``, default a temporary
    folder) and time them: tokens/s over steps 2..``steps`` (the first is warm-up), the rest of the child's run
    time (load, warm-up excess, final save; its validation left out) as ``overhead_s``."""
    from tuneforge.config import dump_config
    from tuneforge.runs.layout import RunDir
    from tuneforge.runs.records import RunRecord

    if steps < 2:
        raise ValueError(f"--measure-steps {steps}: at least 2 (the first step is warm-up and left out)")
    with tempfile.TemporaryDirectory(prefix="tuneforge-time-", dir=workdir) as tmp:
        run_dir = Path(tmp) / "run"
        config_file = Path(tmp) / "config.yaml"
        config_file.write_text(dump_config(config))
        overrides = [f"output_dir={run_dir}", f"max_steps={steps}", "log_every=1", "eval_base=false",
                     "eval_every=1000000", "save_every=null", "progress=false", "report_to=[]", "on_divergence=warn",
                     "auto_fit=false"]
        command = [sys.executable, "-m", "tuneforge.cli", "train", str(config_file)]
        for item in overrides:
            command += ["--set", item]
        started = time.time()
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"measuring {steps} steps failed (tuneforge train exited {done.returncode}): {tail}")
        layout = RunDir(run_dir)
        rows = [json.loads(line) for line in layout.metrics.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "tokens_per_s" in r and r.get("tokens")]
        record = RunRecord.load(run_dir)
        wall = float(record.wall_time_s) if record and record.wall_time_s else time.time() - started
        eval_s = float(record.eval_time_s or 0) if record else 0.0
    seconds = [r["tokens"] / r["tokens_per_s"] for r in rows]
    timed = seconds[1:]
    tok_s = sum(r["tokens"] for r in rows[1:]) / sum(timed)
    overhead = max(0.0, wall - eval_s - sum(timed) - sum(r["tokens"] for r in rows[:1]) / tok_s)
    return Throughput(tok_s, f"measured: {len(timed)} steps of this config on this machine (device: "
                             f"{config.device}), the first step left out", overhead_s=overhead, step_seconds=seconds,
                      step_tokens=[r["tokens"] for r in rows])


@dataclass(frozen=True)
class TimeEstimate:
    """Hours and cost of a run (see the module docstring); ``cost`` None without a price."""

    tokens: TrainingTokens
    flops: FlopsPerToken
    throughput: Throughput
    price_per_hour: float | None = None
    model: str = ""
    method: str = ""

    @property
    def total_flops(self) -> float:
        return self.tokens.tokens * self.flops.total

    @property
    def train_seconds(self) -> float:
        return self.tokens.tokens / self.throughput.tokens_per_s

    @property
    def eval_seconds(self) -> float:
        """Validation: its forward tokens at a third of a trained token's time."""
        return self.tokens.eval_tokens / 3 / self.throughput.tokens_per_s

    @property
    def seconds(self) -> float:
        return self.train_seconds + self.eval_seconds + self.throughput.overhead_s

    @property
    def hours(self) -> float:
        return self.seconds / 3600

    @property
    def cost(self) -> float | None:
        return None if self.price_per_hour is None else self.hours * self.price_per_hour

    def line(self) -> str:
        """One line for ``tuneforge plan``."""
        cost = f", {_money(self.cost)} at {self.price_per_hour:g}/hour" if self.cost is not None else ""
        return (f"time: {self.tokens.tokens:,.0f} tokens x {self.flops.total / 1e9:.2f} GFLOPs/token = "
                f"{self.total_flops / 1e12:,.1f} TFLOPs; {_duration(self.seconds)} ({self.hours:.2f} h){cost} "
                f"[{self.throughput.source}]")

    def table(self) -> str:
        t = self.tokens
        rows = [("model / method", f"{self.model} / {self.method}"),
                ("steps x examples", f"{t.steps} x {t.per_step} = {t.epochs:.2f} epochs of {t.examples} examples"),
                ("tokens trained", f"{t.tokens:,.0f} (mean {t.example_tokens / t.examples:.1f} a example, packed "
                                   f"without padding; {t.dropped} dropped / {t.truncated} truncated at max_length)"),
                ("attention span S", f"{t.span:.1f} tokens"),
                ("FLOPs per token", f"{self.flops.total / 1e9:.3f} G ({self.flops.formula()})"),
                ("training FLOPs", f"{self.total_flops:.3e}"),
                ("throughput", f"{self.throughput.tokens_per_s:,.1f} tokens/s ({self.throughput.source})"),
                ("training", _duration(self.train_seconds)),
                ("validation", f"{_duration(self.eval_seconds)} ({t.eval_tokens:,.0f} forward tokens)"),
                *([("set-up (measured once)", _duration(self.throughput.overhead_s))]
                  if self.throughput.overhead_s else []),
                ("total", f"{_duration(self.seconds)} = {self.hours:.3f} hours")]
        if self.cost is not None:
            rows.append(("cost", f"{_money(self.cost)} at {self.price_per_hour:g} an hour"))
        return "\n".join(["| quantity | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "method": self.method, "tokens": asdict(self.tokens),
                "flops_per_token": {**asdict(self.flops), "total": self.flops.total, "formula": self.flops.formula()},
                "total_flops": self.total_flops, "throughput": asdict(self.throughput),
                "train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds, "seconds": self.seconds,
                "hours": self.hours, "price_per_hour": self.price_per_hour, "cost": self.cost}


def _money(amount: float) -> str:
    return f"{amount:.2f}" if amount >= 1 else f"{amount:.4f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def estimate_time(config: RunConfig, gpu: str | None = None, mfu: float = DEFAULT_MFU,
                  peak_tflops: float | None = None, price_per_hour: float | None = None,
                  measure_steps: int = MEASURE_STEPS, tokens: TrainingTokens | None = None,
                  gradient_checkpointing: bool | None = None, method: str | None = None) -> TimeEstimate:
    """Hours and cost of training ``config``: on ``gpu`` (table mode) or measured on this machine (``gpu`` None).
    ``tokens``: counted already (default :func:`count_tokens`); ``method`` / ``gradient_checkpointing``: what the
    run will use when a plan changes them (default the config's)."""
    if price_per_hour is not None and price_per_hour < 0:
        raise ValueError(f"--price-per-hour {price_per_hour:g}: give a price of 0 or more (per hour of the machine)")
    from tuneforge.methods.registry import settings_sections

    tokens = tokens or count_tokens(config)
    method = method or config.method
    shape = resolve_shape(config.model, trust_remote_code=config.trust_remote_code)
    checkpointing = config.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    sections = {key: config.section(key) for key in settings_sections()}
    flops = method_flops(shape, method, tokens.span, sections, checkpointing)
    throughput = (gpu_throughput(gpu, flops, mfu, peak_tflops) if gpu or peak_tflops
                  else measure_throughput(config, measure_steps))
    return TimeEstimate(tokens, flops, throughput, price_per_hour, model=config.model, method=method)


def plan_line(config: RunConfig, method: str, gradient_checkpointing: bool, gpu: str | None = None,
              mfu: float = DEFAULT_MFU, price_per_hour: float | None = None, device: str = "cpu") -> str:
    """``tuneforge plan``'s time line for the chosen candidate: on ``gpu`` (default: the CUDA device's row of the
    table, when it has one); on a CPU (or a GPU not in the table) the tokens and FLOPs, and how to measure."""
    if gpu is None and device == "cuda":
        import torch

        from tuneforge.estimate.flops import GPU_PEAK_BF16_DENSE_TFLOPS, gpu_key

        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
        gpu = next((gpu_key(k) for k, _, _ in GPU_PEAK_BF16_DENSE_TFLOPS if k.lower() in name.lower()), None)
    try:
        tokens = count_tokens(config)
    except (ValueError, OSError) as e:
        return f"time: not estimated ({str(e).splitlines()[0]})"
    if gpu is None:
        from tuneforge.methods.registry import settings_sections

        shape = resolve_shape(config.model, trust_remote_code=config.trust_remote_code)
        sections = {key: config.section(key) for key in settings_sections()}
        flops = method_flops(shape, method, tokens.span, sections, gradient_checkpointing)
        return (f"time: {tokens.tokens:,.0f} tokens x {flops.total / 1e9:.2f} GFLOPs/token = "
                f"{tokens.tokens * flops.total / 1e12:,.1f} TFLOPs; hours: `tuneforge estimate --time --config "
                f"CONFIG` measures this machine, or give --gpu")
    return estimate_time(config, gpu=gpu, mfu=mfu, price_per_hour=price_per_hour, tokens=tokens,
                         gradient_checkpointing=gradient_checkpointing, method=method).line()
