"""Dispatch from ``method:`` to the module that implements it, plus save/load of what was trained.

| method  | module                         | trains                                   | merge into base |
|---------|--------------------------------|------------------------------------------|-----------------|
| full    | ``methods/full.py``            | all weights (minus frozen ones)          | n/a (is a model)|
| lora    | ``methods/lora.py``            | ``B A`` per target linear (+DoRA norm)   | yes             |
| qlora   | ``methods/qlora.py``           | LoRA over a 4/8-bit frozen base          | yes, into the unquantized base |
| adapter | ``methods/bottleneck_adapter/``| bottleneck MLPs after attention/MLP      | no (nonlinear)  |
| prefix  | ``methods/prefix_tuning.py``   | per-layer key/value prefixes             | no              |
| prompt  | ``methods/prompt_tuning.py``   | a soft prompt of input embeddings        | no              |
| ia3     | ``methods/ia3.py``             | rescaling vectors on k, v, down_proj     | yes             |

The training loop never branches on the method: it calls :func:`apply_method` once, then
:func:`method_forward` for every packed row, then :func:`save_trained`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tuneforge.config import RunConfig

MERGEABLE = ("lora", "qlora", "ia3")
NOT_MERGEABLE = ("adapter", "prefix", "prompt")


class NotMergeableError(ValueError):
    """The method cannot be folded into the base weights; serve the base model plus the adapter instead."""


def apply_method(model: torch.nn.Module, config: RunConfig, tokenizer=None) -> torch.nn.Module:
    """Return the trainable model for ``config.method`` (base weights frozen unless ``full``).

    ``tokenizer`` is needed only by ``prompt`` with ``prompt.init_text``. For ``qlora`` the model may
    come from :func:`load_base_model` (already quantized) or be a full-precision model (quantized here).
    """
    method = config.method
    if method == "full":
        from tuneforge.methods.full import apply_full

        return apply_full(model, config.full)
    if method == "lora":
        from tuneforge.methods.lora import apply_lora

        return apply_lora(model, config.lora)
    if method == "qlora":
        from tuneforge.methods.qlora import apply_qlora

        return apply_qlora(model, config.lora, config.qlora, gradient_checkpointing=config.gradient_checkpointing)
    if method == "adapter":
        from tuneforge.methods.bottleneck_adapter.config import BottleneckAdapterConfig
        from tuneforge.methods.bottleneck_adapter.model import BottleneckAdapterModel

        cfg = config.adapter
        return BottleneckAdapterModel(model, BottleneckAdapterConfig(
            bottleneck=cfg.bottleneck, nonlinearity=cfg.nonlinearity, placement=list(cfg.placement),
            dropout=cfg.dropout, scaling=cfg.scaling, base_model_name_or_path=config.model))
    if method == "prefix":
        from tuneforge.methods.prefix_tuning import apply_prefix

        return apply_prefix(model, config.prefix)
    if method == "prompt":
        from tuneforge.methods.prompt_tuning import apply_prompt

        return apply_prompt(model, config.prompt, tokenizer)
    if method == "ia3":
        from tuneforge.methods.ia3 import apply_ia3

        return apply_ia3(model, config.ia3)
    raise ValueError(f"method: unknown method {method!r}")


def load_base_model(config: RunConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    ) -> torch.nn.Module:
    """The base model as ``config.method`` wants it: quantized while loading for ``qlora``, else plain."""
    if config.method == "qlora":
        from tuneforge.methods.qlora import load_quantized_model, resolve_compute_dtype

        return load_quantized_model(config.model, config.qlora, resolve_compute_dtype(config.qlora, dtype), device)
    from tuneforge.models.loading import load_model

    return load_model(config.model, dtype=dtype, device=device)


def method_forward(model: torch.nn.Module, config: RunConfig | str, input_ids: torch.Tensor,
                   position_ids: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """Logits ``[K, V]`` at row positions ``keep_idx [K]`` of one packed row ``input_ids [1, T]``.

    ``position_ids [1, T]`` restart at 0 for each example; no attention mask is passed, so transformers
    builds the block-causal mask from them. Prefix and prompt tuning need their own forward for that
    (see their modules); every other method uses the plain call.
    """
    method = config if isinstance(config, str) else config.method
    if method == "prefix":
        from tuneforge.methods.prefix_tuning import forward_for_loss

        return forward_for_loss(model, input_ids, position_ids, keep_idx)
    if method == "prompt":
        from tuneforge.methods.prompt_tuning import forward_for_loss

        return forward_for_loss(model, input_ids, position_ids, keep_idx)
    out = model(input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=keep_idx)
    return out.logits.squeeze(0)   # a view: indexing [0] would zero-fill a (1, K, V) gradient in backward


def method_generate(model: torch.nn.Module, config: RunConfig | str | None, **kwargs):
    """``model.generate(**kwargs)`` as ``config.method`` needs it (``None``: a plain model).

    Prefix and prompt tuning generate through their own path (see :func:`tuneforge.methods.prefix_tuning.generate`);
    every other method (and the base model) through transformers' / peft's ``generate``.
    """
    method = config if isinstance(config, str) or config is None else config.method
    if method == "prefix":
        from tuneforge.methods.prefix_tuning import generate

        return generate(model, **kwargs)
    if method == "prompt":
        from tuneforge.methods.prompt_tuning import generate

        return generate(model, **kwargs)
    return model.generate(**kwargs)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once.

    Quantized 4-bit weights are counted by their number of elements as stored (two values per byte), so
    ``total`` under ``qlora`` undercounts the base; ``trainable`` is exact.
    """
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def save_trained(model: torch.nn.Module, out_dir: str | Path, config: RunConfig) -> None:
    """Save what the method trained into ``out_dir``.

    ``full``: a complete transformers model folder (``config.json`` + ``model.safetensors``). Every other
    method: ``adapter_config.json`` + ``adapter_model.safetensors`` (peft's format; the bottleneck adapter
    writes the same two files with ``"adapter_type": "tuneforge.bottleneck_adapter"``).
    """
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)


def saved_method(adapter_dir: str | Path) -> str:
    """Best guess of the method that saved ``adapter_dir``, from its files (``full``, ``adapter`` or peft type)."""
    folder = Path(adapter_dir)
    cfg_file = folder / "adapter_config.json"
    if cfg_file.is_file():
        data = json.loads(cfg_file.read_text())
        if "adapter_type" in data:
            return "adapter"
        return {"LORA": "lora", "IA3": "ia3", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt"}.get(
            data.get("peft_type"), str(data.get("peft_type")))
    if (folder / "config.json").is_file():
        return "full"
    raise FileNotFoundError(f"{folder} holds neither adapter_config.json nor config.json: not a saved run")


def load_trained(base: torch.nn.Module, adapter_dir: str | Path, config: RunConfig | None = None,
                 is_trainable: bool = False) -> torch.nn.Module:
    """Load what :func:`save_trained` wrote onto a freshly loaded ``base`` (for inference by default).

    ``full`` returns the saved model itself, in ``base``'s dtype (``base`` only supplies the dtype).
    ``qlora`` adapters load onto whatever ``base`` is given: a quantized one (as trained) or a
    full-precision one (as merged).
    """
    method = config.method if config is not None else saved_method(adapter_dir)
    if method == "full":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(adapter_dir), dtype=next(base.parameters()).dtype)
    if method == "adapter":
        from tuneforge.methods.bottleneck_adapter.model import BottleneckAdapterModel

        return BottleneckAdapterModel.from_pretrained(base, adapter_dir, is_trainable=is_trainable)
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=is_trainable)
