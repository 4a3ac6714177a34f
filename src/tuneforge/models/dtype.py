"""Choose the compute dtype for the device we actually have.

CPUs without native bf16 (no AVX512-BF16 / AMX) emulate bf16 matrix multiplies, about 150x slower than
fp32 here (measured 1 vs 160 GFLOP/s on 2 AVX2 cores), so a config asking for bf16 trains in fp32 on such
CPUs. The choice and its reason are logged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def pick_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(requested: str, device: torch.device) -> tuple[torch.dtype, str]:
    """Return ``(dtype, reason)`` for ``requested`` in {auto, fp32, bf16, fp16} on ``device``."""
    if device.type == "cuda":
        if requested == "auto":
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16, "auto: GPU supports bf16"
            return torch.float16, "auto: GPU lacks bf16, using fp16"
        return DTYPES[requested], f"{requested} as configured"
    # CPU
    if requested in ("auto", "bf16", "bfloat16", "fp16", "float16"):
        if requested in ("bf16", "bfloat16") and cpu_has_native_bf16():
            return torch.bfloat16, "bf16 as configured (CPU has native bf16)"
        if requested == "auto" and cpu_has_native_bf16():
            return torch.float32, "auto: fp32 on CPU (bf16 would lose precision for little speed-up)"
        return torch.float32, (
            f"{requested} requested but this CPU has no native bf16/fp16 matmul (emulated ~150x slower): "
            "training in fp32"
        )
    return DTYPES[requested], f"{requested} as configured"
