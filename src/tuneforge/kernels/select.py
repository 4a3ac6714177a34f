"""Which kernels a run uses, chosen at run time from the config, the device and what is installed.

- Packed attention (``attention: packed_sdpa``, the default): on CUDA one varlen kernel over the packed row,
  flash-attention 2's when ``flash_attn`` imports, else torch's own (``varlen_attn``, torch 2.10 and later)
  (:mod:`tuneforge.kernels.flash_varlen`); else causal SDPA per example (:mod:`tuneforge.kernels.packed_attention`;
  on CUDA without cuDNN's backend). On an H200, 1B shape, 80 examples a step, torch's varlen attention trained
  38.3k tokens/s against 21.6k for SDPA per example (``benchmarks/results/gpu_profile_2026-12-04.txt``).
  ``attention: flash_varlen`` requires CUDA and one of the two varlen kernels.
- ``kernels: auto`` (default): Liger-Kernel's RMSNorm, SwiGLU/GeGLU MLP and fused linear cross-entropy on CUDA
  when ``liger_kernel`` imports (:mod:`tuneforge.kernels.liger`), else tuneforge's own (the fused RMSNorm of
  :mod:`tuneforge.kernels.rms_norm`, the chunked loss of :mod:`tuneforge.kernels.chunked_loss`): on a CPU nothing
  changes. ``kernels: liger`` requires liger-kernel and CUDA; ``kernels: tuneforge`` never uses Liger.

:func:`check_kernels` refuses what cannot run (before any weights load); :func:`apply_kernels` applies the choice to
a model and logs one line for the attention and one for the kernels, saying which and why. Neither library is
imported at import time.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import TYPE_CHECKING, Any

import torch

from tuneforge.errors import ConfigError
from tuneforge.kernels import flash_varlen
from tuneforge.kernels.chunked_loss import output_head
from tuneforge.kernels.packed_attention import NAME as PACKED_SDPA
from tuneforge.kernels.packed_attention import set_attention
from tuneforge.kernels.rms_norm import fuse_rms_norm

if TYPE_CHECKING:
    from tuneforge.config import RunConfig

log = logging.getLogger(__name__)

FLASH_INSTALL = "pip install 'tuneforge[flash]' on a machine with CUDA and a CUDA build toolchain"
LIGER_INSTALL = "pip install 'tuneforge[gpu]'"


def _import(name: str) -> tuple[Any, str]:
    """``(module, "")`` when ``name`` imports, else ``(None, why not)``."""
    if importlib.util.find_spec(name) is None:
        return None, "not installed"
    try:
        return importlib.import_module(name), ""
    except Exception as e:         # a build for another CUDA/torch shows up here, not at find_spec
        return None, f"failed to import ({type(e).__name__}: {e})"


def flash_attn_status() -> tuple[Any, str]:
    """``(flash_attn module, "")`` when its varlen kernel can be called, else ``(None, why not)``."""
    module, why = _import("flash_attn")
    if module is not None and not hasattr(module, "flash_attn_varlen_func"):
        return None, f"{getattr(module, '__version__', '?')} has no flash_attn_varlen_func"
    return module, why


def varlen_status() -> tuple[str | None, str]:
    """``(what runs attention: flash_varlen, "")``: flash-attn's varlen kernel (its version), else torch's own varlen
    attention (torch >= 2.10); ``(None, why not)`` when neither is there."""
    module, why = flash_attn_status()
    if module is not None:
        return f"flash-attn {_version(module, 'flash-attn')} varlen", ""
    if flash_varlen.torch_varlen_available():
        return f"torch {torch.__version__}'s varlen attention (flash-attn {why})", ""
    return None, f"flash-attn {why}, and torch {torch.__version__} has no varlen attention (2.10 and later have it)"


def liger_status() -> tuple[Any, str]:
    """``(liger_kernel module, "")`` when it imports, else ``(None, why not)``."""
    return _import("liger_kernel")


def _version(module: Any, distribution: str) -> str:
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version(distribution)
        except Exception:
            version = "?"
    return str(version)


def check_kernels(config: RunConfig, device: torch.device | str) -> None:
    """Refuse (:class:`ConfigError`, one line naming the key) what ``attention``/``kernels`` ask for and this
    machine cannot run: called before any weights load."""
    device = torch.device(device)
    # (key, value that needs CUDA and a library, the library's status, its name, how to install it, what else to use)
    needs = (("attention", "flash_varlen", varlen_status, "flash-attn or torch's varlen attention", FLASH_INSTALL,
              "attention: packed_sdpa", " (the same packed attention, SDPA per example)"),
             ("kernels", "liger", liger_status, "liger-kernel", LIGER_INSTALL, "kernels: auto or tuneforge", ""))
    for key, value, status, library, install, instead, why_instead in needs:
        if getattr(config, key) != value:
            continue
        if device.type != "cuda":
            raise ConfigError(f"{key}: {value} runs on CUDA only (this run is on {device.type}); use "
                              f"{instead}{why_instead}")
        module, why = status()
        if module is None:
            raise ConfigError(f"{key}: {value} needs {library}, which is {why}; {install}, or use {instead}")


def choose_attention(attention: str, device: torch.device | str) -> tuple[str, str]:
    """``(transformers attention implementation, log line)`` for the ``attention`` key on ``device``."""
    device = torch.device(device)
    if attention not in ("packed_sdpa", "flash_varlen"):
        return attention, f"attention: transformers' {attention}"
    if device.type != "cuda":
        why = f"flash-attn runs on CUDA only, this run is on {device.type}"
    else:
        module, why = flash_attn_status()
        if module is not None:
            return flash_varlen.NAME, (f"packed attention: flash-attn {_version(module, 'flash-attn')} varlen on "
                                       f"{device}")
        why = f"flash-attn {why}"
    backend, missing = varlen_status() if device.type == "cuda" else (None, why)
    if backend is not None:     # torch's own varlen attention: 1.8x SDPA per example on an H200 (see the docstring)
        return flash_varlen.NAME, f"packed attention: {backend} on {device}"
    if attention == "flash_varlen":     # check_kernels refuses this before the weights load
        raise ConfigError(f"attention: flash_varlen: {missing}; use attention: packed_sdpa")
    return PACKED_SDPA, f"packed attention: SDPA per example ({why})"


def choose_kernels(kernels: str, device: torch.device | str) -> tuple[str, str]:
    """``("liger" | "tuneforge", log line)`` for the ``kernels`` key on ``device``."""
    device = torch.device(device)
    if kernels == "tuneforge":
        return "tuneforge", "kernels: tuneforge's fused RMSNorm and chunked loss (kernels: tuneforge)"
    if device.type != "cuda":
        why = f"Liger runs on CUDA only, this run is on {device.type}"
    else:
        module, why = liger_status()
        if module is not None:
            return "liger", (f"kernels: Liger {_version(module, 'liger-kernel')} on {device} (RMSNorm, SwiGLU/GeGLU "
                             "MLP, fused linear cross-entropy)")
        why = f"liger-kernel {why}"
    if kernels == "liger":                 # check_kernels refuses this before the weights load
        raise ConfigError(f"kernels: liger: {why}; use kernels: auto or tuneforge")
    return "tuneforge", f"kernels: tuneforge's fused RMSNorm and chunked loss ({why})"


def model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def apply_kernels(model: torch.nn.Module, config: RunConfig, device: torch.device | str | None = None) -> str:
    """Set ``model``'s attention and norm/MLP/loss kernels as :func:`choose_attention` / :func:`choose_kernels`
    decide for ``device`` (default: where its parameters are); log the two choices; return the kernels chosen."""
    device = torch.device(device) if device is not None else model_device(model)
    implementation, attention_line = choose_attention(config.attention, device)
    set_attention(model, implementation)
    kernels, kernels_line = choose_kernels(config.kernels, device)
    if kernels == "liger":
        from tuneforge.kernels import liger

        norms = liger.patch_rms_norms(model) if config.fused_rms_norm else 0
        mlps = liger.patch_mlps(model)
        head = output_head(model) if config.chunked_loss != "off" else None
        if head is not None:
            liger.mark_fused_loss(getattr(*head))
        kernels_line += (f": {norms} RMSNorms, {mlps} MLPs, LM-head loss "
                         f"{'fused' if head is not None else 'not fused (chunked_loss: off or no plain head)'}")
    elif config.fused_rms_norm:
        fuse_rms_norm(model)
    log.info("%s", attention_line)
    log.info("%s", kernels_line)
    log_bitsandbytes_backend(model)
    return kernels


def log_bitsandbytes_backend(model: torch.nn.Module) -> str | None:
    """One log line naming where bitsandbytes' quantized layers compute (QLoRA); returns it (None: no such layer)."""
    quantized = next((m for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")
                      and type(m).__module__.startswith("bitsandbytes")), None)
    if quantized is None:
        return None
    import bitsandbytes as bnb

    weight = quantized.weight
    kind = "4-bit" if type(quantized).__name__ == "Linear4bit" else "8-bit"
    if weight.device.type == "cuda":
        native = getattr(getattr(bnb, "cextension", None), "lib", None)
        # the class attribute: the library object answers any other name with a function that raises
        built = "CUDA build" if getattr(type(native), "compiled_with_cuda", False) is True else \
            "no CUDA library loaded"
        line = f"bitsandbytes {bnb.__version__}: {kind} layers on cuda (its CUDA kernels; {built})"
    else:
        line = f"bitsandbytes {bnb.__version__}: {kind} layers on {weight.device.type} (its CPU backend)"
    log.info("%s", line)
    return line
