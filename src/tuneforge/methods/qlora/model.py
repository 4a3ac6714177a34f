"""QLoRA: LoRA adapters over a frozen base whose linear layers are stored in 4 (or 8) bits.

Each frozen linear ``W0`` of the decoder is replaced by a bitsandbytes layer that stores it quantized
(``bits: 4``: NF4 or FP4 in blocks of 64 with one absmax per block; ``double_quant`` also quantizes those
absmax constants to 8 bits; ``bits: 8``: LLM.int8 row-wise int8) and de-quantizes it to
``compute_dtype`` on the fly. LoRA then trains ``x -> dequant(W0) x + (alpha / r) B A x`` exactly as in
:mod:`tuneforge.methods.lora`; only ``A`` and ``B`` (kept in fp32) receive gradients. Embeddings,
norms and ``lm_head`` (tied to the embeddings in SmolLM2) stay unquantized.

Memory of the frozen base, SmolLM2-135M, measured on CPU with :func:`base_memory_bytes` (weights +
quantization statistics): fp32 513.1 MiB, bf16 256.6 MiB, NF4 + double quant 160.6 MiB (NF4 without
double quant 165.1, FP4 + double quant 160.6, int8 209.4). Of the 4-bit total, 108.0 MiB is the
unquantized fp32 embedding matrix (49152 x 576, tied to ``lm_head``); the 30 decoder layers shrink
from 405.1 MiB (fp32) to 52.6 MiB.

Merging (``tuneforge.export.merge``) folds the adapter into the *unquantized* base loaded in the
requested dtype, never into the 4-bit weights.

bitsandbytes >= 0.48 runs 4-bit, 8-bit and 8-bit optimizers on CPU (paged optimizers fall back to
non-paged there); it is optional: only ``method: qlora`` and the 8-bit optimizers need it.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from tuneforge.methods.lora.config import LoraConfig
from tuneforge.methods.qlora.config import QuantConfig

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

    from tuneforge.config import RunConfig

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SKIP_MODULES = ("lm_head",)


class QuantizationUnavailableError(RuntimeError):
    """bitsandbytes is missing or cannot run on this machine."""


def require_bitsandbytes():
    """Import bitsandbytes or raise an error that says how to get it."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationUnavailableError(
            "method 'qlora' needs bitsandbytes: run `pip install 'bitsandbytes>=0.48,<1'` "
            "(it has a CPU path since 0.48), or use `method: lora` to train without quantization"
        )
    try:
        import bitsandbytes as bnb
    except Exception as e:  # a broken native library shows up here, not at find_spec
        raise QuantizationUnavailableError(f"method 'qlora': bitsandbytes failed to import ({e}); "
                                           "reinstall it or use `method: lora`") from e
    return bnb


def resolve_compute_dtype(cfg: QuantConfig, model_dtype: torch.dtype) -> torch.dtype:
    """``qlora.compute_dtype``, where ``auto`` means the dtype the rest of the model runs in."""
    return model_dtype if cfg.compute_dtype == "auto" else DTYPES[cfg.compute_dtype]


def bnb_quantization_config(cfg: QuantConfig, compute_dtype: torch.dtype):
    """The transformers ``BitsAndBytesConfig`` for loading a base model quantized from disk."""
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if cfg.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(SKIP_MODULES))
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                              bnb_4bit_use_double_quant=cfg.double_quant, bnb_4bit_compute_dtype=compute_dtype,
                              llm_int8_skip_modules=list(SKIP_MODULES))


def load_quantized_model(model: str, cfg: QuantConfig, compute_dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu", trust_remote_code: bool = False) -> PreTrainedModel:
    """Load ``model`` (a spec of :func:`tuneforge.models.registry.resolve_model`) with quantized linears.

    transformers quantizes layer by layer while loading, so the full-precision model never sits in
    memory at once.
    """
    from tuneforge.models.loading import flush_denormals, from_pretrained_attention
    from tuneforge.models.registry import resolve_model

    flush_denormals()
    device = torch.device(device)
    loaded = from_pretrained_attention(      # SDPA, or eager for a class without it (Gemma 2)
        resolve_model(str(model)), quantization_config=bnb_quantization_config(cfg, compute_dtype),
        dtype=compute_dtype, device_map={"": str(device)}, trust_remote_code=trust_remote_code,
    )
    if device.type == "cpu":
        release_checkpoint_mapping_(loaded)
    one_cpu_kernel_(loaded)
    return loaded


def one_cpu_kernel_(model: nn.Module) -> None:
    """Keep bitsandbytes' 4-bit layers on one CPU code path, in place.

    On CPUs with AVX512-BF16/AMX, bitsandbytes 0.50 repacks a ``Linear4bit``'s weight into another layout at
    its first eval-mode no-grad forward and computes every later forward (training ones too) with another
    kernel: the base model's logits then change by ~1e-3 between an evaluation and the next step, the adapter
    disabled no longer equals the base, and the fused LoRA training forward fails on the repacked weight.
    Turning the repacking off keeps the dequantize-then-matmul path everywhere (as on AVX2 CPUs).
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010 (a plain attribute, not a Tensor)


def load_base(config: RunConfig, dtype: torch.dtype, device: str | torch.device) -> PreTrainedModel:
    """The registry's ``load_base``: ``config.model`` quantized while loading, computing in ``qlora.compute_dtype``."""
    return load_quantized_model(config.model, config.qlora, resolve_compute_dtype(config.qlora, dtype), device,
                                trust_remote_code=config.trust_remote_code)


def release_checkpoint_mapping_(model: nn.Module) -> None:
    """Copy the unquantized tensors that still view the memory-mapped checkpoint, so the mapping is closed.

    On CPU transformers loads ``model.safetensors`` memory-mapped: the embeddings and norms stay views of
    the file, which keeps it mapped, and with it every page of the full-precision linears read while
    quantizing (416 MiB of fp32 pages resident for SmolLM2-135M, 2.6x its quantized size). Copying the
    few unquantized tensors (113 MiB here) lets the mapping and those pages go.
    """
    import gc

    bnb = require_bitsandbytes()
    quantized = (bnb.nn.Params4bit, bnb.nn.Int8Params)
    done: set[int] = set()
    for module in model.modules():
        for _name, param in module.named_parameters(recurse=False):
            if id(param) in done or isinstance(param, quantized):
                continue
            done.add(id(param))
            param.data = param.data.clone()
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and id(buffer) not in done:
                done.add(id(buffer))
                module._buffers[name] = buffer.clone()
    gc.collect()


def is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def quantize_model_(model: PreTrainedModel, cfg: QuantConfig, compute_dtype: torch.dtype | None = None,
                    ) -> PreTrainedModel:
    """Replace, in place, every ``nn.Linear`` of ``model`` except ``lm_head`` by its bitsandbytes version.

    For a model already loaded in full precision (the weights are quantized from memory; the
    full-precision copies are released as each layer is replaced). Sets ``model.is_loaded_in_4bit``
    (or ``_8bit``) as transformers does, which peft reads to pick its quantized LoRA layers.
    """
    bnb = require_bitsandbytes()
    if is_quantized(model):
        return model
    first = next(model.parameters())
    compute_dtype = compute_dtype or first.dtype
    device = first.device
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.split(".")[-1] not in SKIP_MODULES]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        weight = linear.weight.data
        has_bias = linear.bias is not None
        if cfg.bits == 4:
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
                                  compress_statistics=cfg.double_quant, quant_type=cfg.quant_type, device="meta")
            q.weight = bnb.nn.Params4bit(weight.to(compute_dtype), requires_grad=False, quant_type=cfg.quant_type,
                                         compress_statistics=cfg.double_quant)
        else:
            q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=6.0, device="meta")
            q.weight = bnb.nn.Int8Params(weight.to(compute_dtype), requires_grad=False, has_fp16_weights=False)
        if has_bias:
            q.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
        setattr(parent, child, q.to(device))  # .to(device) performs the quantization
    # the flags transformers sets when it quantizes while loading (peft's kbit preparation reads them)
    setattr(model, "is_loaded_in_4bit" if cfg.bits == 4 else "is_loaded_in_8bit", True)
    one_cpu_kernel_(model)
    return model


def apply_qlora(model: PreTrainedModel, lora_cfg: LoraConfig, quant_cfg: QuantConfig,
                gradient_checkpointing: bool = False) -> PeftModel:
    """Quantize ``model`` (unless it was loaded quantized), prepare it for k-bit training, add LoRA.

    peft's ``prepare_model_for_kbit_training`` freezes the base, upcasts fp16/bf16 norms and
    embeddings to fp32 for stable training and, with gradient checkpointing, makes the input embeddings
    require grad so checkpointed segments have a graph to backpropagate through.
    """
    from peft import prepare_model_for_kbit_training

    from tuneforge.methods.lora.model import apply_lora

    if not is_quantized(model):
        compute_dtype = resolve_compute_dtype(quant_cfg, next(model.parameters()).dtype)
        quantize_model_(model, quant_cfg, compute_dtype)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return apply_lora(model, lora_cfg)         # peft's LoRA + tuneforge's fused forward, as for plain LoRA


def make_optimizer(params: Iterable[nn.Parameter], name: str, lr: float, weight_decay: float = 0.0,
                   ) -> torch.optim.Optimizer:
    """``qlora.optimizer``: ``adamw`` (torch), ``adamw_8bit`` or ``paged_adamw_8bit`` (bitsandbytes).

    8-bit optimizers keep Adam's two moments in blockwise-quantized 8 bits (tensors under 4096 elements
    stay 32-bit); paged ones move state to CPU under GPU memory pressure and behave as non-paged on CPU.
    """
    params = [p for p in params if p.requires_grad]
    if name == "adamw":
        from tuneforge.kernels.optimizer import adamw

        return adamw(params, lr=lr, weight_decay=weight_decay)
    bnb = require_bitsandbytes()
    if name == "adamw_8bit":
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if name == "paged_adamw_8bit":
        return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"qlora.optimizer: unknown optimizer {name!r}; use adamw, adamw_8bit or paged_adamw_8bit")


def base_memory_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (quantized weights at their storage size,
    including the quantization statistics held in each weight's ``quant_state``)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        if state is not None:
            total += _quant_state_bytes(state)
        scb = getattr(t, "SCB", None)
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
    return total


def _quant_state_bytes(state) -> int:
    total = 0
    for name in ("absmax", "code"):
        t = getattr(state, name, None)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    nested = getattr(state, "state2", None)
    if nested is not None:
        total += _quant_state_bytes(nested)
    return total
