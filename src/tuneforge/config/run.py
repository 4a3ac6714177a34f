"""The run config: one YAML file, validated before any model loads.

Every key is checked at load time: a wrong type, an unknown key (the closest valid key is suggested),
a missing data file or an impossible combination fails with one line that says what to write instead.
``--set a.b=value`` overrides reach nested keys; values are parsed as YAML (``3`` is an int, ``true`` a bool).
Renamed keys still load for a release, with a warning (:mod:`tuneforge.deprecations`).
"""

from __future__ import annotations

import difflib
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from tuneforge import deprecations
from tuneforge.config.eval import EvalSettings
from tuneforge.config.pipeline import PipelineSettings
from tuneforge.data.settings import DataConfig
from tuneforge.errors import ConfigError
from tuneforge.models.registry import DEFAULT_MODEL
from tuneforge.schema import Settings

log = logging.getLogger(__name__)


class PreferenceConfig(Settings):
    """``preference:``: how ``task: preference`` trains on chosen/rejected pairs (see
    :mod:`tuneforge.training.preference_losses` for each loss's formula)."""
    loss: Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"] = Field(
        "sigmoid", description="sigmoid (DPO), ipo, hinge, robust (label smoothing); simpo and orpo need no reference")
    beta: float = Field(0.1, gt=0, description="DPO's beta (IPO's tau, SimPO's beta, ORPO's lambda)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="robust and simpo: assumed share of flipped labels")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: target reward margin gamma")
    sft_weight: float | None = Field(None, ge=0, description="weight of the chosen answer's mean token NLL added "
                                                            "to each pair's loss; default 1 for orpo, else 0")
    reference: Literal["precomputed", "on_the_fly"] = Field(
        "precomputed", description="reference log-probs: precomputed: once per pair, no grad, the first time the "
        "pair is used (a training step or the first evaluation), then cached on it (full fine-tuning: every pair "
        "before step 1); on_the_fly: a reference forward for every micro-batch")


class KTOConfig(Settings):
    """``kto:``: how ``task: kto`` trains on single completions labelled desirable or not (thumbs up / down; see
    :func:`tuneforge.training.preference_losses.kto_loss`). A section of its own rather than keys of
    ``preference:``: that section's losses and their knobs (label smoothing, SimPO's gamma, the SFT term) are pair
    losses that mean nothing without pairs, and KTO's weights mean nothing with them; each task's section lists
    only what applies to it. The defaults are TRL's ``KTOConfig``'s."""
    loss: Literal["kto", "apo_zero_unpaired"] = Field(
        "kto", description="kto (the KTO paper's loss, with the KL estimate from mismatched pairs of each micro-batch) "
        "or apo_zero_unpaired (APO-zero, no KL term)")
    beta: float = Field(0.1, gt=0, description="KTO's beta: how far the policy may move from the reference")
    desirable_weight: float = Field(1.0, gt=0, description="weight of a desirable example's loss; with unbalanced "
                                    "labels keep desirable_weight x desirable / (undesirable_weight x undesirable) "
                                    "between 1 and 4/3 (the paper's advice; the run logs the range)")
    undesirable_weight: float = Field(1.0, gt=0, description="weight of an undesirable example's loss")
    reference: Literal["precomputed", "on_the_fly"] = Field(
        "precomputed", description="reference log-probs of each example's own completion: as preference.reference "
        "(the mismatched pairs' reference log-probs, which change with every micro-batch, are computed in each step)")


class RewardConfig(Settings):
    """``reward:``: how ``task: reward`` trains a reward model (a scalar head on the model) on chosen/rejected pairs
    (see :mod:`tuneforge.training.reward_losses`); a pair's ``margin`` field, where the data has one, is subtracted
    from its reward difference."""
    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="adds this x (reward_chosen + reward_rejected)^2 to each pair's loss, keeping the "
        "rewards centred on 0 (TRL's center_rewards_coefficient; 0.01 is the usual value); unset: no such term")


class RewardSpec(Settings):
    """One reward function of ``grpo.rewards`` (see :mod:`tuneforge.training.grpo_rewards` for the built-ins and
    what each reads)."""
    name: str = Field(description="a built-in (exact_match, normalized_match, label_match, regex, json_valid, "
                      "json_schema, length_penalty, reward_model, judge, tool_call) or a Python function as "
                      "module:function (called as f(prompts, completions, **fields, **options), returning one float "
                      "or None per completion; its options.needs lists the record fields it reads, checked on every "
                      "record before training)")
    weight: float = Field(1.0, description="its weight in the summed reward")
    options: dict[str, Any] = Field(default_factory=dict, description="the function's settings (e.g. regex: "
                                    "{pattern: ...}; json_schema: {schema: ...}; reward_model: {run: DIR}; judge: "
                                    "{base_url: URL, model: NAME}; tool_call: {weights: {name: 0.3, ...}})")


class GRPOConfig(Settings):
    """``grpo:``: how ``task: grpo`` trains with online RL on verifiable rewards (see
    :mod:`tuneforge.training.objectives.grpo` and :mod:`tuneforge.training.grpo_losses`). Defaults are TRL 1.16's
    ``GRPOConfig``'s where it has the key (but ``num_generations`` and ``max_completion_length``, smaller here)."""
    num_generations: int = Field(4, ge=2, description="G: completions sampled per prompt (a group); a micro-batch "
                                 "of batch_size prompts trains on batch_size x G completions")
    max_completion_length: int = Field(128, ge=1, description="new tokens sampled per completion at most")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (also divides the logits of the "
                               "trained log-probabilities, as TRL)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling")
    beta: float = Field(0.0, ge=0, description="weight of the KL term to the reference model (the method disabled, "
                        "or the init_from model); 0: no reference forward at all")
    epsilon: float = Field(0.2, gt=0, lt=1, description="clipping range below (and above, unless epsilon_high)")
    epsilon_high: float | None = Field(None, gt=0, description="clipping range above (DAPO: 0.28); unset: epsilon")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field(
        "dapo", description="how token losses are normalised: grpo (per completion, then over completions), bnpo "
        "(over a micro-batch's tokens), dr_grpo (by max_completion_length), dapo (over the step's tokens)")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="advantages divided by the group's reward std, the micro-batch's, or not (Dr. GRPO)")
    num_iterations: int = Field(1, ge=1, description="optimizer steps on each step's samples (PPO's mu); > 1 keeps "
                                "the sampling policy's log-probabilities for the ratio")
    dynamic_sampling: bool | None = Field(
        None, description="drop groups whose rewards are all equal (their advantages are 0) before the loss "
        "(DAPO's dynamic sampling; grpo.max_refill_rounds refills the micro-batch); unset: on for loss_type dapo, "
        "else off")
    max_refill_rounds: int = Field(
        3, ge=0, le=100, description="dynamic sampling: when the groups of equal rewards leave a micro-batch short of "
        "batch_size groups, sample up to this many more rounds of batch_size prompts (drawn by seed, epoch, "
        "micro-batch and round) and add their groups with reward variance until it is full (DAPO's refill; verl's "
        "max_num_gen_batches minus 1); 0: train on the groups left")
    share_prompt: bool = Field(True, description="train each prompt once, followed by its completions, each "
                               "attending to the prompt and itself (the same loss and gradients as a copy of the "
                               "prompt per completion, for far fewer tokens); models whose attention is not "
                               "tuneforge's packed attention, and prefix/prompt tuning, keep a copy per completion")
    merged_sampling: bool = Field(True, description="sample through merged copies of the LoRA weights (W + s B A: "
                                  "one matmul per linear instead of three), the trained weights put back untouched "
                                  "after; costs one copy of the adapted weights while sampling. Plain LoRA only "
                                  "(not DoRA, QLoRA, modules_to_save or new token rows)")
    rewards: list[RewardSpec] = Field(default_factory=list, description="the reward functions, summed with their "
                                      "weights; at least one")
    log_samples: int = Field(2, ge=0, description="completions (with their rewards) of each micro-batch's samples "
                             "written to samples.jsonl in the run directory")

    def drops_zero_variance(self) -> bool:
        return self.dynamic_sampling if self.dynamic_sampling is not None else self.loss_type == "dapo"


class DistillConfig(Settings):
    """``distill:``: how ``task: distill`` trains a student on a teacher's token distributions (logit distillation,
    GKD's generalised JSD; see :mod:`tuneforge.training.objectives.distill` and
    :mod:`tuneforge.training.distill_losses`). Each trained (answer) token's loss is
    ``(1 - alpha) x divergence(teacher, student) + alpha x cross-entropy(answer token)``. ``beta``'s default is
    TRL's ``GKDConfig``'s; ``temperature``'s is 1 (TRL's 0.9), leaving the teacher's distribution as it is."""
    teacher: str | None = Field(
        None, description="the teacher: a model folder, a built-in model name, or a tuneforge run directory (full or "
        "adapter: loaded as training loads it), frozen and in eval mode; its tokenizer must be the student's")
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "jsd", description="forward_kl: KL(teacher || student) (GKD's beta 0: the student covers the teacher's "
        "mass); reverse_kl: KL(student || teacher) (beta 1: mode seeking); jsd: GKD's generalised Jensen-Shannon "
        "divergence with beta")
    beta: float = Field(0.5, gt=0, lt=1, description="jsd: GKD's interpolation beta, the mixture "
                        "beta x teacher + (1 - beta) x student (0 and 1 are forward_kl and reverse_kl)")
    temperature: float = Field(1.0, gt=0, description="both models' logits are divided by this before the "
                               "softmax (as TRL's GKD; the loss is not rescaled by temperature^2)")
    alpha: float = Field(0.0, ge=0, le=1, description="weight of the answer token's cross-entropy (SFT's loss) "
                         "mixed in: (1 - alpha) x divergence + alpha x cross-entropy")
    cache_top_k: int | None = Field(
        None, ge=1, description="unset: the teacher runs on every micro-batch (full vocabulary). k: the teacher's "
        "top-k log-probs and their token ids at every trained token are computed once before step 1 and kept in "
        "the token cache (keyed by the teacher's weights and the data), so a second run never runs the teacher; "
        "the divergence is then over those k tokens, both distributions renormalised on them (exact at k = the "
        "vocabulary)")


class RunConfig(Settings):
    """The run config. Besides the keys below, each registered method owns a section of its settings
    (``lora:``, ``qlora:``, ``adapter:``, ``prefix:``, ``prompt:``, ``ia3:``, ``full:``; see
    :mod:`tuneforge.methods.registry`): every section is validated by its method's model and present with
    its defaults when not written (``config.lora.r``)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    model: str = Field(DEFAULT_MODEL, description="a built-in name, a local Hugging Face folder, a .gguf file, or "
                                                  "a hub id (where a network exists)")
    template: str = Field(
        "auto", description="the chat template the run trains with (saved with the run, used by generate, eval, "
        "package, export and serve): auto (the tokenizer's own), chatml, llama3, gemma, mistral, phi3, alpaca, base "
        "(alpaca and base are plain text and fit any tokenizer), or a path to a .jinja file")
    template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="arguments passed to the chat template wherever it renders (training, "
        "validation, generate, eval, serve; recorded in run.json), e.g. {enable_thinking: false} for Qwen3; a "
        "name the template does not use is ignored")
    trust_remote_code: bool = Field(
        False, description="let a model whose config.json names its own Python code (auto_map) run it on load; "
                           "off: such a model is refused in one line. Logged, and recorded in run.json")
    method: str = Field("lora", description="full, lora, qlora, adapter, prefix, prompt or ia3; its settings are "
                                            "under the key of that name")
    init_from: str | None = Field(
        None, description="a run directory or package (tuneforge package) of an adapter method whose trained adapter "
        "this run loads and keeps training: the same method, with the run's method settings (a value set here that "
        "differs is refused) and on the run's base model (model:); with task: preference or kto the reference is "
        "that run's model (base + its adapter, frozen), not the bare base. A full fine-tune run is given as model: "
        "instead")
    task: Literal["sft", "pretrain", "preference", "kto", "reward", "grpo", "distill"] = Field(
        "sft", description="sft (chat/instruction records), pretrain (raw text), preference (chosen/rejected pairs), "
        "kto (prompt/completion records labelled desirable or not), reward (a reward model: a scalar head trained "
        "on chosen/rejected pairs), grpo (online RL: prompts, completions sampled and scored by grpo.rewards) or "
        "distill (chat/instruction records; the loss on a teacher model's token distributions: distill:)")
    output_dir: str = Field("runs/run", description="the run directory (created; --resume continues the run in it)")
    seed: int = Field(42, description="seeds data order, splits, initialisation and dropout")

    data: DataConfig = Field(description="the training data and how it is read")
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    kto: KTOConfig = Field(default_factory=KTOConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)

    # optimisation
    # None until validated: unset (or null), it becomes the method's default (Method.learning_rate)
    learning_rate: float = Field(
        None, gt=0, description="peak learning rate (AdamW); unset: the method's default, full 1e-4 (measured: "
        "benchmarks/results/full_ft_lr_sweep_cpu_2026-12-03.txt), every other method 2e-4. run.json records the "
        "value and whether it was the default")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after the warmup")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="share of the steps spent warming up linearly")
    warmup_steps: int | None = Field(None, ge=0, description="warmup steps; overrides warmup_ratio when set")
    max_grad_norm: float = Field(1.0, ge=0, description="clip the gradient's norm to this (0: measure, never clip)")
    batch_size: int = Field(8, ge=1, description="examples per micro-batch, packed into one padding-free row")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps to train; overrides epochs when set")
    epochs: float = Field(1.0, gt=0, description="passes over the training data (fractions allowed)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward: less memory, "
                                                            "more time (1.4x per step in the training bench)")
    auto_fit: bool = Field(False, description="fit micro-batch, accumulation, checkpointing (and qlora over lora) "
                                              "to memory_budget before training: see `tuneforge plan`")
    memory_budget: str | None = Field(None, description="e.g. 8GB; default with auto_fit: the GPU's memory, "
                                                        "or half the RAM on CPU")

    # evaluation and checkpoints
    eval_every: int | None = Field(None, ge=1, description="steps between validation passes; default: 5 a run")
    eval_share: float | None = Field(
        0.1, gt=0, le=1, description="validation passes cost at most about this share of the training compute: a "
        "larger validation set is evaluated on a fixed seeded subset that fits (at least 32 examples); None: all")
    eval_batch_size: int | None = Field(None, ge=1, description="examples per forward-only validation micro-batch; "
                                                                "default 4 x batch_size")
    save_every: int | None = Field(None, ge=1, description="steps between checkpoints that --resume continues "
                                                           "from (SIGTERM / Ctrl-C also write one)")
    keep_checkpoints: int = Field(2, ge=1, description="complete `last` checkpoints kept (save_every, SIGTERM): "
                                                       "--resume falls back to an older one when the newest is damaged")
    keep_best: bool = Field(True, description="the checkpoint with the best validation becomes the run's output")
    eval_base: bool = Field(True, description="validate the model before the first step (its method disabled: the "
                                              "base model; with init_from: the init run's model), the yardstick of the "
                                              "end-of-run check (on_divergence)")
    early_stopping_patience: int | None = Field(None, ge=1, description="stop after this many validations "
                                                                        "without improvement")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a NaN/inf loss or gradient: stop (keeping the last checkpoint) or skip the step")
    max_skipped_steps: int = Field(3, ge=0, description="with on_nonfinite: skip, stop after this many skipped steps")
    on_divergence: Literal["stop", "warn", "off"] = Field(
        "stop", description="a ruined run: the loss stays above divergence_factor x its first value, or training "
        "collapses (the loss at ln(vocabulary) after starting below it, or a gradient norm of exactly 0), for "
        "divergence_steps steps; or the final validation is worse than the run's first evaluation (the model before "
        "training; without eval_base, the first validation). stop: end the run with exit status 1, never writing "
        "worse weights as its output (the best checkpoint kept); warn: log it and go on")
    divergence_factor: float = Field(1.5, gt=1, description="diverging: the loss above this x its first value")
    divergence_steps: int = Field(3, ge=1, description="steps in a row a divergence or collapse must last")
    regression_tolerance: float = Field(
        0.01, ge=0, description="the end-of-run check's slack: the final validation may be this much (relative) "
                                "worse than its yardsticks")
    eval: EvalSettings | None = None    # tuneforge eval's settings (config/eval.py)
    pipeline: PipelineSettings | None = None    # tuneforge pipeline's stages and gates (config/pipeline.py)

    # hardware
    device: str = Field("auto", description="auto (CUDA when there is one, else CPU), cpu, cuda or cuda:N")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="the base model's weights as stored; auto: what precision computes in (fp32 master "
        "weights for full fine-tuning in a mixed mode)")
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16-true", "fp16-mixed"] = Field(
        "auto", description="fp32; bf16-mixed (autocast to bf16, fp32 trained weights and optimizer states); "
        "bf16-true (bf16 weights; full fine-tuning with Kahan-compensated updates); fp16-mixed (autocast and "
        "dynamic loss scaling; GPUs only). Adapters stay fp32. auto: bf16-mixed on GPUs with bf16, fp16-mixed on "
        "those without, fp32 on CPUs")
    attention: Literal["packed_sdpa", "flash_varlen", "sdpa", "eager"] = Field(
        "packed_sdpa", description="packed_sdpa: causal attention per example of a packed row (no T x T mask): "
                                   "on CUDA one varlen kernel per layer (flash-attn's, else torch >= 2.10's "
                                   "own), else SDPA per example; "
                                   "flash_varlen: one varlen kernel call per layer on CUDA (flash-attn's, else "
                                   "torch >= 2.10's own)")
    fused_rms_norm: bool = Field(
        True, description="RMSNorm forward and backward as one autograd function "
                          "(same values, fewer passes, less saved)")
    chunked_loss: Literal["auto", "on", "off"] = Field(
        "auto", description="cross-entropy in chunks of positions, never holding the (K, V) logits; "
                            "auto: when they would exceed 256 MiB")
    kernels: Literal["auto", "tuneforge", "liger"] = Field(
        "auto", description="auto: Liger-Kernel's RMSNorm, SwiGLU/GeGLU and fused linear cross-entropy on CUDA when "
                            "liger-kernel is installed, else tuneforge's fused RMSNorm and chunked loss; liger: "
                            "require them (CUDA); tuneforge: never Liger")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: torch's)")
    log_every: int = Field(1, ge=1, description="steps between rows of metrics.jsonl (validation rows always)")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        [], description="experiment trackers beside metrics.jsonl (accelerate's): tensorboard, wandb, mlflow")
    progress: bool = Field(True, description="progress bars (tokens/s, loss, ETA)")

    _learning_rate_default: bool = PrivateAttr(False)

    if TYPE_CHECKING:  # method sections (config.lora, config.qlora, ...) come from the registry
        def __getattr__(self, name: str) -> Any: ...

    @model_validator(mode="before")
    @classmethod
    def _method_sections(cls, data: Any) -> Any:
        """Validate each method's section with its registered model; fill the missing ones with defaults."""
        if not isinstance(data, dict):
            return data
        from tuneforge.methods.registry import settings_sections

        data = dict(data)
        if "learning_rate" in data and data["learning_rate"] is None:
            del data["learning_rate"]                   # null: the method's default, as when unset
        errors: list[InitErrorDetails] = []
        for key, model in settings_sections().items():
            raw = data.get(key)
            if isinstance(raw, model):
                continue
            try:
                data[key] = model.model_validate(raw if raw is not None else {})
            except ValidationError as e:
                errors += [InitErrorDetails(
                    type=PydanticCustomError(err["type"], err["msg"].removeprefix("Value error, ")),
                    loc=(key, *err["loc"]), input=err.get("input")) for err in e.errors()]
        unknown = [k for k in data if k not in cls.model_fields and k not in settings_sections()]
        errors += [InitErrorDetails(type="extra_forbidden", loc=(k,), input=data[k]) for k in unknown]
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return data

    @field_validator("template")
    @classmethod
    def _known_template(cls, v: str) -> str:
        from tuneforge.data.templates import check_template_value

        return check_template_value(v)   # "unknown template 'chatm' (did you mean 'chatml'?); write auto, ..."

    @field_validator("template_kwargs", mode="before")
    @classmethod
    def _template_kwargs(cls, v: Any) -> dict[str, Any]:
        from tuneforge.data.templates import check_template_kwargs

        return check_template_kwargs(v)

    @field_validator("method")
    @classmethod
    def _registered_method(cls, v: str) -> str:
        from tuneforge.methods.registry import get_method

        get_method(v)   # raises "unknown method 'lorra' (did you mean 'lora'?); methods: ..."
        return v

    @model_validator(mode="after")
    def _method_learning_rate(self) -> "RunConfig":
        """An unset ``learning_rate`` is the method's default (:attr:`Method.learning_rate`), again after the
        method changes (``auto_fit``); a value the config sets (or one assigned later) always wins."""
        from tuneforge.methods.registry import get_method

        if "learning_rate" in self.model_fields_set and self.learning_rate is not None:
            self._learning_rate_default = False
        else:       # assigned straight into __dict__: validate_assignment would validate again, in a loop
            self.__dict__["learning_rate"] = get_method(self.method).learning_rate
            self._learning_rate_default = True
        return self

    @property
    def learning_rate_is_default(self) -> bool:
        """``learning_rate`` is the method's default: the config did not set it."""
        return self._learning_rate_default

    def learning_rate_origin(self) -> str:
        """Where ``learning_rate`` comes from, for the log: the run config, or the method's default and its source."""
        if not self._learning_rate_default:
            return "set in the run config"
        from tuneforge.methods.registry import get_method

        source = get_method(self.method).learning_rate_source
        return (f"method {self.method}'s default, measured: {source}" if source else
                "the general default; not measured for this method")

    @model_validator(mode="after")
    def _combinations(self) -> "RunConfig":
        if self.task == "pretrain" and self.data.train_on == "assistant" and self.data.format not in ("auto", "text"):
            raise ValueError("task 'pretrain' trains on raw text: set data.format to 'text' (or leave it 'auto')")
        if self.data.streaming:
            if self.task not in ("sft", "pretrain"):
                raise ValueError(f"data.streaming trains task sft or pretrain (got task {self.task!r}): set "
                                 "data.streaming: false")
            if self.max_steps is None:
                raise ValueError("data.streaming needs max_steps: the number of examples is known only once the "
                                 "whole file is tokenized, so epochs cannot set the run's length and learning-rate "
                                 "schedule (set max_steps: N)")
        from tuneforge.methods.registry import get_method

        check = get_method(self.method).check_config      # the method's own combinations (qlora: compute_dtype)
        if check is not None:
            check(self)
        if self.task in ("preference", "kto", "reward"):
            self._check_preference()
        if self.task == "grpo":
            self._check_grpo()
        if self.task == "distill" and not self.distill.teacher:
            raise ValueError("task 'distill' needs a teacher: set distill.teacher to a model folder, a built-in "
                             "model name or a tuneforge run directory")
        if self.report_to:
            from tuneforge.config.trackers import check_trackers

            check_trackers(self.report_to)
        if self.data.sources is not None and self.task not in ("sft", "pretrain", "distill"):
            raise ValueError(f"data.train: a list of sources (a mixture) trains task sft or pretrain; task "
                             f"{self.task!r} reads one file")
        if self.early_stopping_patience and not (self.data.validation or self.data.val_fraction > 0):
            raise ValueError("early_stopping_patience needs validation data: set data.validation or data.val_fraction")
        return self

    def _check_preference(self) -> None:
        """``task: preference``, ``kto`` and ``reward``: the data format, and what the reference model needs."""
        task = self.task
        if self.data.format != "auto":
            what = "prompt/completion/label records" if task == "kto" else "chosen/rejected pairs"
            raise ValueError(f"task {task!r} reads {what}: leave data.format 'auto'")
        folder = Path(self.model).expanduser()
        if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
            raise ValueError(f"model {self.model!r} is an adapter (an SFT run?), not a model: set init_from: "
                             f"{self.model} to continue its adapter (the reference is then that SFT model) and model: "
                             "to its base model")
        if task == "reward":        # no reference model
            return
        from tuneforge.methods.registry import get_method

        method = get_method(self.method)
        why = (f"{method.name} fine-tuning keeps no copy of the base" if method.is_full_model
               else f"method {method.name} cannot be")
        if task == "kto":
            kto = self.kto
            fixed = method.disable is None and not self.init_from       # no reference model beside the policy
            if fixed and kto.loss == "kto":
                raise ValueError(f"kto.loss 'kto' estimates its KL term with the reference model in every step (the "
                                 f"mismatched pairs change with each micro-batch), which needs a method that can be "
                                 f"disabled; {why}: use an adapter method (lora, ...) or kto.loss: apo_zero_unpaired")
            if kto.loss == "kto" and self.batch_size < 2:
                raise ValueError("kto.loss 'kto' estimates its KL term from the other examples of a micro-batch: set "
                                 "batch_size to 2 or more")
            if fixed and kto.reference == "on_the_fly":
                raise ValueError(f"kto.reference 'on_the_fly' needs a method that can be disabled; {why}: use "
                                 "kto.reference: precomputed")
            return
        pref = self.preference
        if method.disable is None and pref.reference == "on_the_fly" and pref.loss not in ("simpo", "orpo"):
            raise ValueError(f"preference.reference 'on_the_fly' needs a method that can be disabled; {why}: use "
                             "preference.reference: precomputed")

    def _check_grpo(self) -> None:
        """``task: grpo``: reward functions given, the data format, and a reference model where ``beta`` needs one."""
        grpo = self.grpo
        if not grpo.rewards:
            raise ValueError("task 'grpo' needs reward functions: add grpo.rewards, e.g. [{name: exact_match}] (a "
                             "built-in) or [{name: mymodule:score}] (a Python function)")
        if self.data.format != "auto":
            raise ValueError("task 'grpo' reads prompt records (prompt or messages, plus the fields rewards read): "
                             "leave data.format 'auto'")
        if "max_refill_rounds" in grpo.model_fields_set and grpo.max_refill_rounds and \
                not grpo.drops_zero_variance():
            raise ValueError(f"grpo.max_refill_rounds {grpo.max_refill_rounds} refills the groups dynamic sampling "
                             f"drops, which is off here (loss_type {grpo.loss_type}, dynamic_sampling "
                             f"{grpo.dynamic_sampling}): set grpo.dynamic_sampling: true or leave "
                             "max_refill_rounds out")
        from tuneforge.methods.registry import get_method

        method = get_method(self.method)
        if grpo.beta > 0 and method.disable is None and not self.init_from:
            raise ValueError(f"grpo.beta {grpo.beta:g} needs a reference model beside the policy in every step, and "
                             f"method {method.name} cannot be disabled: use an adapter method (lora, ...) or "
                             "grpo.beta: 0")

    def section(self, key: str) -> BaseModel:
        """The method settings section ``key`` (``config.section("lora")`` is ``config.lora``)."""
        value = (self.model_extra or {}).get(key)
        if not isinstance(value, BaseModel):
            raise KeyError(f"no method settings section {key!r}")
        return value

    def optimizer_steps(self, num_train: int, world: int = 1, repeats: int = 1) -> int:
        """Optimizer steps the run takes over ``num_train`` training units: ``max_steps``, else ``epochs`` passes of
        ``batch_size x gradient_accumulation_steps x world`` units a step (the last step of an epoch may be short),
        each micro-batch trained ``repeats`` times in a row (GRPO's ``num_iterations``:
        :meth:`~tuneforge.training.objectives.base.Objective.repeats`)."""
        per_step = self.batch_size * self.gradient_accumulation_steps * world
        steps_per_epoch = max(1, math.ceil(num_train / per_step)) * repeats
        return self.max_steps or max(1, math.ceil(self.epochs * steps_per_epoch))


# ---------------------------------------------------------------------------------------------- loading


def _did_you_mean(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _model_for_path(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the key at ``loc`` (for unknown-key suggestions)."""
    from tuneforge.methods.registry import settings_sections

    model: type[BaseModel] | None = RunConfig
    for i, part in enumerate(loc[:-1]):
        if i == 0 and isinstance(part, str) and part in settings_sections():
            model = settings_sections()[part]
            continue
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return model


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            owner = _model_for_path(loc)
            options = list(owner.model_fields) if owner else []
            if owner is RunConfig:
                from tuneforge.methods.registry import settings_sections

                options += list(settings_sections())
            hint = _did_you_mean(str(loc[-1]), options) if owner else ""
            lines.append(f"{source}: unknown key '{key}'{hint}")
        elif e["type"] == "missing":
            lines.append(f"{source}: missing required key '{key}'")
        else:
            got = e.get("input")
            shown = repr(got) if not isinstance(got, dict) else "a mapping"
            msg = e["msg"].removeprefix("Value error, ")
            if "(got " in msg:
                lines.append(f"{source}: '{key}': {msg}" if loc else f"{source}: {msg}")
            else:
                lines.append(f"{source}: '{key}': {msg} (got {shown})" if loc else f"{source}: {msg}")
    return "\n".join(lines)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: write key=value, e.g. --set max_steps=3")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict | None = None, check_files: bool = True) -> RunConfig:
    """Read, override and validate a run config; raise :class:`ConfigError` with one line per problem.

    Relative data paths are resolved against the current directory first, then the config file's folder.
    """
    source = str(path) if path else "config"
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: the config must be a mapping of keys to values")
    file_validation = (tree.get("data") or {}).get("validation") if isinstance(tree.get("data"), dict) else None
    if data:
        tree.update(data)
    # renamed keys (eval_task.file -> eval.data, ...) move to their new names, in the file and in --set alike
    pairs = deprecations.upgrade(tree, parse_overrides(overrides), source)
    changed = [key for key, _ in pairs]
    for key, value in pairs:
        _set_dotted(tree, key, value)
    if path is not None and file_validation and "data.train" in changed and "data.validation" not in changed:
        log.warning("%s: data.train is now %s but data.validation is still %s from the config file: validation "
                    "loss (and keep_best) will measure that file. Add --set data.validation=YOUR_FILE, or "
                    "--set data.validation=null to split validation off your training data", source,
                    (tree.get("data") or {}).get("train"), file_validation)
    try:
        config = RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None
    if check_files:
        base = Path(path).parent if path else Path(".")
        if config.data.sources is not None:        # a mixture: each source's path (a file or folder) and validation
            from tuneforge.data.mixture import resolve_sources

            resolve_sources(config.data, base, source)
        for key in ("train", "validation", "tools"):
            value = getattr(config.data, key)
            if value is None or isinstance(value, list):
                continue
            resolved = _resolve_file(value, base) if key == "tools" else _resolve_data(value, base)
            if resolved is None:
                raise ConfigError(f"{source}: 'data.{key}': file {value!r} not found (relative paths are tried from "
                                  f"the current folder and from {base}/)")
            setattr(config.data, key, str(resolved))
        if config.eval and config.eval.data:
            resolved = _resolve_data(config.eval.data, base)
            if resolved is None:
                raise ConfigError(f"{source}: 'eval.data': file {config.eval.data!r} not found (relative paths are "
                                  f"tried from the current folder and from {base}/)")
            config.eval.data = str(resolved)
        _check_template_file(config, base, source)
        if config.init_from:        # a folder: from the current folder, then the config's (what it holds: training)
            folder = next((c for c in (Path(config.init_from).expanduser(), base / config.init_from) if c.is_dir()),
                          None)
            if folder is None:
                raise ConfigError(f"{source}: 'init_from': folder {config.init_from!r} not found (relative paths are "
                                  f"tried from the current folder and from {base}/)")
            config.init_from = str(folder.resolve())
        if config.task == "distill" and config.distill.teacher:
            config.distill.teacher = _resolve_teacher(config.distill.teacher, base, source)
    return config


def _resolve_teacher(teacher: str, base: Path, source: str) -> str:
    """``distill.teacher``: a built-in name or hub id as written; a folder (from the current folder, then the
    config's) as an absolute path; anything else is one line naming the key."""
    from tuneforge.models.registry import BUILTIN_MODELS

    if teacher in BUILTIN_MODELS:
        return teacher
    folder = next((c for c in (Path(teacher).expanduser(), base / teacher) if c.is_dir()), None)
    if folder is not None:
        if not ((folder / "config.yaml").is_file() or (folder / "config.json").is_file()):
            raise ConfigError(f"{source}: 'distill.teacher': {teacher!r} is neither a tuneforge run (config.yaml) nor "
                              "a Hugging Face model folder (config.json)")
        return str(folder.resolve())
    if teacher.count("/") == 1 and not teacher.startswith((".", "/", "~")) and not Path(teacher).suffix:
        return teacher          # a hub id: loaded where a network exists (offline: one line when it loads)
    raise ConfigError(f"{source}: 'distill.teacher': {teacher!r} not found: give a model folder, a built-in model "
                      f"({', '.join(BUILTIN_MODELS)}) or a tuneforge run directory (relative paths are tried from the "
                      f"current folder and from {base}/)")


def _check_template_file(config: RunConfig, base: Path, source: str) -> None:
    """A ``template:`` file: found (from the current folder, then the config's) and parsed, before any model loads."""
    from tuneforge.data.templates import is_template_file, read_template_file

    if config.template == "auto" or not is_template_file(config.template):
        return
    resolved = _resolve_file(config.template, base)
    if resolved is None:
        raise ConfigError(f"{source}: 'template': file {config.template!r} not found (relative paths are tried from "
                          f"the current folder and from {base}/)")
    read_template_file(resolved)        # "FILE:LINE: the template does not parse: ..."
    config.template = str(resolved)


def _resolve_data(value: str, base: Path) -> str | None:
    """A data path (a file, a folder, a Hub id; :mod:`tuneforge.data.sources`) resolved as :func:`_resolve_file`."""
    from tuneforge.data.sources import resolve_source

    return resolve_source(value, base)


def _resolve_file(value: str, base: Path) -> Path | None:
    for candidate in (Path(value).expanduser(), base / value):
        if candidate.is_file():
            return candidate
    return None


def dump_config(config: RunConfig) -> str:
    """The config as YAML, every key resolved; a default learning rate says so in a comment on its line."""
    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    if not config.learning_rate_is_default:
        return text
    lines = text.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith("learning_rate:"))
    lines[at] = f"{lines[at].rstrip()}  # {config.learning_rate_origin()}\n"
    return "".join(lines)
