"""Helpers for the serving tests: adapters of every method saved from a tiny model, a server on loopback."""

from __future__ import annotations

import contextlib

import torch

from _method_helpers import HAS_BNB, perturbed, run_config
from tuneforge.methods import apply_method, save_trained
from tuneforge.models.loading import build_tiny_model

# (name, method, config sections): one adapter per serving path
SERVE_CASES = [
    ("lora", "lora", {"lora": {"r": 4, "dropout": 0.0}}),
    ("lora_qv", "lora", {"lora": {"r": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}),
    ("dora", "lora", {"lora": {"r": 4, "dropout": 0.0, "use_dora": True}}),
    ("rslora", "lora", {"lora": {"r": 4, "dropout": 0.0, "use_rslora": True}}),
    ("ia3", "ia3", {}),
    ("adapter", "adapter", {"adapter": {"bottleneck": 8}}),
    ("prefix", "prefix", {"prefix": {"num_virtual_tokens": 5}}),
    ("prompt", "prompt", {"prompt": {"num_virtual_tokens": 5}}),
] + ([("qlora", "qlora", {"lora": {"r": 4, "dropout": 0.0}})] if HAS_BNB else [])   # its LoRA, on a full base


def save_adapter(folder, method: str, sections: dict, seed: int, scale: float = 0.3) -> None:
    """Apply ``method`` to the tiny base (seed 0), move its weights off identity, save it to ``folder``."""
    model = apply_method(build_tiny_model(seed=0), run_config(method, sections))
    save_trained(perturbed(model, scale=scale, seed=seed), folder)


def tiny_base(dtype: torch.dtype = torch.float64):
    return build_tiny_model(seed=0).to(dtype).eval()


@contextlib.contextmanager
def slow_steps(server, seconds: float):
    """Make every forward of ``server``'s engine take at least ``seconds`` (so requests overlap in time)."""
    import time

    original = server.registry.set.forward

    def forward(*args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)

    server.registry.set.forward = forward
    try:
        yield
    finally:
        server.registry.set.forward = original


USER, ADMIN = "user-key", "admin-key"


def keyed_server(tiny_model_dir, tokenizer, root, adapters: list[str], **overrides):
    """A :class:`Server` over the tiny float64 base with the named adapter folders under ``root`` (also the adapter
    root), the user key :data:`USER` and the admin key :data:`ADMIN`."""
    from tuneforge.serving.server import ServeConfig, Server

    config = ServeConfig(base=str(tiny_model_dir), base_name="tiny", adapters={a: str(root / a) for a in adapters},
                         api_keys=[USER], admin_key=ADMIN, adapter_root=str(root), **overrides)
    return Server(config, model=tiny_base(), tokenizer=tokenizer)

