"""The estimator's side of ``precision:``: which dtype each memory term is in, per mode, without torch.

Mirrors :func:`tuneforge.training.precision.resolve_precision` (``tests/test_estimate_precision.py`` checks that
the two agree for every mode, full fine-tuning or not):

========================  ==============  =============  ===========  =========================================
mode                      base weights    trained        computes in  optimizer (AdamW)
========================  ==============  =============  ===========  =========================================
``fp32``                  fp32            fp32           fp32         m, v fp32
``bf16-mixed``            bf16 (full:     fp32           bf16 under   m, v fp32 (full: the fp32 model is the
                          fp32 master)                   autocast     master copy, no separate one)
``bf16-true``             bf16            fp32 (full:    bf16         m, v fp32 (full: + a bf16 compensation
                                          bf16)                       buffer, Kahan-compensated AdamW)
``fp16-mixed``            fp16 (full:     fp32           fp16 under   m, v fp32
                          fp32 master)                   autocast
========================  ==============  =============  ===========  =========================================

Bytes per trained parameter (weights + gradients + optimizer): 16 in every mode but ``bf16-true`` full
fine-tuning's 14 (2 + 2 + 8 + 2); adapters train in fp32 (16 B) everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("fp32", "bf16-mixed", "bf16-true", "fp16-mixed")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_LOWERED = {"fp32": "fp32", "bf16-mixed": "bf16", "bf16-true": "bf16", "fp16-mixed": "fp16"}


@dataclass(frozen=True)
class PrecisionBytes:
    """What a mode stores and computes in, for a method that trains the base's own weights (``full``) or not.

    ``base``: the base weights' dtype as loaded; ``trained``: the trained parameters' (their gradients too);
    ``autocast``: the dtype autocast computes matrix products in (None: no autocast); ``compensated``: the
    Kahan-compensated AdamW (fp32 moments + a compensation buffer in the parameter's dtype)."""

    mode: str
    base: str
    trained: str
    autocast: str | None
    compensated: bool

    @property
    def base_bytes(self) -> int:
        return DTYPE_BYTES[self.base]

    @property
    def trained_bytes(self) -> int:
        return DTYPE_BYTES[self.trained]

    @property
    def autocast_bytes(self) -> int | None:
        return None if self.autocast is None else DTYPE_BYTES[self.autocast]


def precision_bytes(mode: str, full: bool) -> PrecisionBytes:
    """The dtypes of ``mode`` (one of :data:`MODES`) for a full fine-tune (``full``) or an adapter method."""
    if mode not in MODES:
        raise ValueError(f"precision {mode!r}: use one of {', '.join(MODES)}")
    lowered = _LOWERED[mode]
    mixed = mode.endswith("-mixed")
    base = "fp32" if full and mixed else lowered
    compensated = full and mode == "bf16-true"
    return PrecisionBytes(mode, base, "bf16" if compensated else "fp32", lowered if mixed else None, compensated)


def mode_for(dtype: str | None, precision: str | None, master_weights: bool = False,
             device: str = "cuda") -> str:
    """The mode an estimate is for: ``precision`` when set (``auto``: by ``dtype`` when set, as ``precision: auto``
    with ``dtype:`` set trains: fp32 -> fp32, bf16 -> bf16-true, fp16 -> fp16-mixed; else by device: bf16-mixed on
    a GPU, fp32 on a CPU). ``master_weights`` (deprecated) asks for the mixed mode of ``dtype``."""
    if precision not in (None, "auto"):
        if precision not in MODES:
            raise ValueError(f"precision {precision!r}: use one of auto, {', '.join(MODES)}")
        return precision
    if dtype is None:
        return "bf16-mixed" if device == "cuda" else "fp32"
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r}: use one of {', '.join(DTYPE_BYTES)}")
    if master_weights and dtype != "fp32":
        return f"{dtype}-mixed"
    return {"fp32": "fp32", "bf16": "bf16-true", "fp16": "fp16-mixed"}[dtype]
