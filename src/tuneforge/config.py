"""The run config: one YAML file, validated before any model loads.

Every key is checked at load time: a wrong type, an unknown key (the closest valid key is suggested),
a missing data file or an impossible combination fails with one line that says what to write instead.
``--set a.b=value`` overrides reach nested keys; values are parsed as YAML (``3`` is an int, ``true`` a bool).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

METHODS = ("full", "lora", "qlora", "adapter", "prefix", "prompt", "ia3")


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the key and what to do."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(_Strict):
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False
    fused_forward: bool = True      # tuneforge's LoRA training forward (methods/lora_fused.py); false: peft's own
    shared_dropout_mask: bool = True  # q/k/v (gate/up) share one dropout mask and one A matmul, as fused-qkv models do


class QuantConfig(_Strict):
    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    optimizer: Literal["adamw", "paged_adamw_8bit", "adamw_8bit"] = "adamw"


class AdapterConfig(_Strict):
    """Bottleneck adapters (Houlsby/Pfeiffer style): x + up(act(down(x))) after attention and/or MLP."""
    bottleneck: int = Field(64, ge=1)
    nonlinearity: Literal["relu", "gelu", "silu", "tanh"] = "gelu"
    placement: list[Literal["attention", "mlp"]] = ["attention", "mlp"]
    dropout: float = Field(0.0, ge=0, lt=1)
    scaling: float = 1.0


class PrefixConfig(_Strict):
    num_virtual_tokens: int = Field(20, ge=1)
    reparameterize: bool = False
    encoder_hidden_size: int = Field(512, ge=1)


class PromptConfig(_Strict):
    num_virtual_tokens: int = Field(20, ge=1)
    init_text: str | None = None


class IA3Config(_Strict):
    target_modules: list[str] | None = None       # default: k_proj, v_proj, down_proj
    feedforward_modules: list[str] | None = None  # default: down_proj


class FullConfig(_Strict):
    freeze_embeddings: bool = False
    freeze_layers: list[int] = []


class DataConfig(_Strict):
    train: str
    validation: str | None = None
    val_fraction: float = Field(0.1, ge=0, lt=1)
    format: Literal["auto", "messages", "alpaca", "prompt_completion", "text"] = "auto"
    columns: dict[str, str] = {}
    system_prompt: str | None = None
    train_on: Literal["assistant", "all"] = "assistant"
    max_length: int = Field(1024, ge=8)
    too_long: Literal["drop", "truncate", "error"] = "drop"

    @field_validator("columns")
    @classmethod
    def _known_fields(cls, v: dict[str, str]) -> dict[str, str]:
        from tuneforge.data.formats import check_columns

        return check_columns(v, "data.columns")


class EvalTask(_Strict):
    """Held-out generation check: exact match of the generated answer against the reference."""
    file: str | None = None
    max_examples: int = Field(200, ge=1)
    max_new_tokens: int = Field(16, ge=1)
    labels: list[str] | None = None  # when set, an answer outside these counts as invalid format


class RunConfig(_Strict):
    model: str = "smollm2-135m-instruct"
    method: Literal["full", "lora", "qlora", "adapter", "prefix", "prompt", "ia3"] = "lora"
    task: Literal["sft", "pretrain"] = "sft"
    output_dir: str = "runs/run"
    seed: int = 42

    data: DataConfig
    lora: LoraConfig = LoraConfig()
    qlora: QuantConfig = QuantConfig()
    adapter: AdapterConfig = AdapterConfig()
    prefix: PrefixConfig = PrefixConfig()
    prompt: PromptConfig = PromptConfig()
    ia3: IA3Config = IA3Config()
    full: FullConfig = FullConfig()

    # optimisation
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    warmup_steps: int | None = Field(None, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    batch_size: int = Field(8, ge=1, description="examples per micro-batch, packed into one padding-free row")
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    epochs: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = False

    # evaluation and checkpoints
    eval_every: int | None = Field(None, ge=1, description="steps between validation passes; default: 5 a run")
    save_every: int | None = Field(None, ge=1)
    keep_best: bool = True
    early_stopping_patience: int | None = Field(None, ge=1)
    eval_task: EvalTask | None = None

    # hardware
    device: str = "auto"
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    attention: Literal["packed_sdpa", "sdpa", "eager"] = Field(
        "packed_sdpa", description="packed_sdpa: causal SDPA per example of a packed row (no T x T mask)")
    fused_rms_norm: bool = Field(
        True, description="RMSNorm forward and backward as one autograd function "
                          "(same values, fewer passes, less saved)")
    chunked_loss: Literal["auto", "on", "off"] = Field(
        "auto", description="cross-entropy in chunks of positions, never holding the (K, V) logits; "
                            "auto: when they would exceed 256 MiB")
    threads: int | None = Field(None, ge=1)
    log_every: int = Field(1, ge=1)
    progress: bool = True

    @model_validator(mode="after")
    def _combinations(self) -> "RunConfig":
        if self.task == "pretrain" and self.data.train_on == "assistant" and self.data.format not in ("auto", "text"):
            raise ValueError("task 'pretrain' trains on raw text: set data.format to 'text' (or leave it 'auto')")
        if self.method == "qlora" and self.dtype == "fp32" and self.qlora.compute_dtype not in ("auto", "fp32"):
            raise ValueError("qlora.compute_dtype must match dtype fp32 (or be 'auto')")
        if self.early_stopping_patience and not (self.data.validation or self.data.val_fraction > 0):
            raise ValueError("early_stopping_patience needs validation data: set data.validation or data.val_fraction")
        return self


# ---------------------------------------------------------------------------------------------- loading


def _did_you_mean(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _model_for_path(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the key at ``loc`` (for unknown-key suggestions)."""
    model: type[BaseModel] | None = RunConfig
    for part in loc[:-1]:
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
            hint = _did_you_mean(str(loc[-1]), owner.model_fields) if owner else ""
            lines.append(f"{source}: unknown key '{key}'{hint}")
        elif e["type"] == "missing":
            lines.append(f"{source}: missing required key '{key}'")
        else:
            got = e.get("input")
            shown = repr(got) if not isinstance(got, dict) else "a mapping"
            msg = e["msg"].removeprefix("Value error, ")
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
    if data:
        tree.update(data)
    for key, value in parse_overrides(overrides):
        _set_dotted(tree, key, value)
    try:
        config = RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None
    if check_files:
        base = Path(path).parent if path else Path(".")
        for key in ("train", "validation"):
            value = getattr(config.data, key)
            if value is None:
                continue
            resolved = _resolve_file(value, base)
            if resolved is None:
                raise ConfigError(f"{source}: 'data.{key}': file {value!r} not found (relative paths are tried from "
                                  f"the current folder and from {base}/)")
            setattr(config.data, key, str(resolved))
        if config.eval_task and config.eval_task.file:
            resolved = _resolve_file(config.eval_task.file, base)
            if resolved is None:
                raise ConfigError(f"{source}: 'eval_task.file': file {config.eval_task.file!r} not found")
            config.eval_task.file = str(resolved)
    return config


def _resolve_file(value: str, base: Path) -> Path | None:
    for candidate in (Path(value).expanduser(), base / value):
        if candidate.is_file():
            return candidate
    return None


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
