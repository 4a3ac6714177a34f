"""Configuration of the bottleneck adapter, saved as ``adapter_config.json`` next to the weights."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

ADAPTER_TYPE = "tuneforge.bottleneck_adapter"
"""Value of the ``adapter_type`` field that identifies our method in ``adapter_config.json``.

peft's own files carry ``peft_type`` instead; a file with ``adapter_type`` and no ``peft_type`` is ours,
and ``peft.PeftModel.from_pretrained`` refuses it rather than loading it as something else.
"""

PLACEMENTS = ("attention", "mlp")
NONLINEARITIES = ("relu", "gelu", "silu", "tanh")
FORMAT_VERSION = 1


@dataclass
class BottleneckAdapterConfig:
    """Shape of the adapters and where they go.

    Args:
        bottleneck: inner size ``b`` of every adapter (``d -> b -> d``).
        nonlinearity: one of ``relu``, ``gelu``, ``silu``, ``tanh``.
        placement: sub-layers whose output is adapted, a subset of ``("attention", "mlp")``.
        dropout: dropout on the bottleneck activations (training only).
        scaling: ``s`` in ``y + s * up(act(down(y)))``.
        base_model_name_or_path: informational, recorded for whoever loads the adapter later.
    """

    bottleneck: int = 64
    nonlinearity: str = "gelu"
    placement: list[str] = field(default_factory=lambda: list(PLACEMENTS))
    dropout: float = 0.0
    scaling: float = 1.0
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        if self.bottleneck < 1:
            raise ValueError(f"adapter.bottleneck must be >= 1 (got {self.bottleneck})")
        if self.nonlinearity not in NONLINEARITIES:
            raise ValueError(f"adapter.nonlinearity must be one of {', '.join(NONLINEARITIES)} (got {self.nonlinearity!r})")
        bad = [p for p in self.placement if p not in PLACEMENTS]
        if bad or not self.placement:
            raise ValueError(f"adapter.placement must be a non-empty subset of {list(PLACEMENTS)} (got {self.placement})")

    def to_dict(self) -> dict:
        return {"adapter_type": ADAPTER_TYPE, "format_version": FORMAT_VERSION, **asdict(self)}

    def save(self, folder: str | Path) -> None:
        Path(folder, "adapter_config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "BottleneckAdapterConfig":
        path = Path(folder, "adapter_config.json")
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {folder} a saved bottleneck adapter?")
        data = json.loads(path.read_text())
        if data.get("adapter_type") != ADAPTER_TYPE:
            raise ValueError(f"{path} is not a tuneforge bottleneck adapter (adapter_type={data.get('adapter_type')!r}, "
                             f"peft_type={data.get('peft_type')!r}); load it with the method it was trained with")
        if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ValueError(f"{path} was written by a newer tuneforge (format {data['format_version']}); upgrade tuneforge")
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**fields)
