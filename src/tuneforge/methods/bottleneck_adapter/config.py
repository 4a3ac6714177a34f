"""Settings of the bottleneck adapter: the run config's ``adapter:`` section, saved as ``adapter_config.json``.

One class for both: what the run config validates is what the adapter folder records (plus the
``adapter_type`` marker, a format version and the base model's name, written by :meth:`save`).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field, field_validator

from tuneforge.schema import Settings

ADAPTER_TYPE = "tuneforge.bottleneck_adapter"
"""Value of the ``adapter_type`` field that identifies our method in ``adapter_config.json``.

peft's own files carry ``peft_type`` instead; a file with ``adapter_type`` and no ``peft_type`` is ours,
and ``peft.PeftModel.from_pretrained`` refuses it rather than loading it as something else.
"""

PLACEMENTS = ("attention", "mlp")
NONLINEARITIES = ("relu", "gelu", "silu", "tanh")
FORMAT_VERSION = 1


class BottleneckAdapterConfig(Settings):
    """Shape of the adapters and where they go (Houlsby/Pfeiffer style: ``y + s * up(act(down(y)))``).

    Args:
        bottleneck: inner size ``b`` of every adapter (``d -> b -> d``).
        nonlinearity: one of ``relu``, ``gelu``, ``silu``, ``tanh``.
        placement: sub-layers whose output is adapted, a subset of ``("attention", "mlp")``.
        dropout: dropout on the bottleneck activations (training only).
        scaling: ``s`` in ``y + s * up(act(down(y)))``.
    """

    bottleneck: int = Field(64, ge=1)
    nonlinearity: str = "gelu"
    placement: list[str] = list(PLACEMENTS)
    dropout: float = Field(0.0, ge=0, lt=1)
    scaling: float = 1.0

    @field_validator("nonlinearity")
    @classmethod
    def _known_nonlinearity(cls, v: str) -> str:
        if v not in NONLINEARITIES:
            raise ValueError(f"adapter.nonlinearity must be one of {', '.join(NONLINEARITIES)} (got {v!r})")
        return v

    @field_validator("placement")
    @classmethod
    def _known_placement(cls, v: list[str]) -> list[str]:
        if not v or any(p not in PLACEMENTS for p in v):
            raise ValueError(f"adapter.placement must be a non-empty subset of {list(PLACEMENTS)} (got {v})")
        return v

    def to_dict(self, base_model_name_or_path: str | None = None) -> dict:
        return {"adapter_type": ADAPTER_TYPE, "format_version": FORMAT_VERSION, **self.model_dump(),
                "base_model_name_or_path": base_model_name_or_path}

    def save(self, folder: str | Path, base_model_name_or_path: str | None = None) -> None:
        text = json.dumps(self.to_dict(base_model_name_or_path), indent=2) + "\n"
        Path(folder, "adapter_config.json").write_text(text)

    @classmethod
    def load(cls, folder: str | Path) -> "BottleneckAdapterConfig":
        path = Path(folder, "adapter_config.json")
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {folder} a saved bottleneck adapter?")
        data = json.loads(path.read_text())
        if data.get("adapter_type") != ADAPTER_TYPE:
            raise ValueError(f"{path} is not a tuneforge bottleneck adapter "
                             f"(adapter_type={data.get('adapter_type')!r}, peft_type={data.get('peft_type')!r}); "
                             "load it with the method it was trained with")
        if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ValueError(f"{path} was written by a newer tuneforge (format {data['format_version']}); "
                             "upgrade tuneforge")
        return cls(**{k: v for k, v in data.items() if k in cls.model_fields})
