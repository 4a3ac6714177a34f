"""Helpers shared by the method tests: configs, analytic parameter counts, a packed row."""

from __future__ import annotations

import importlib.util

import torch

from tuneforge.config import RunConfig

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None

# (case id, method, config sections)
CASES = [
    ("full", "full", {}),
    ("full_frozen", "full", {"full": {"freeze_embeddings": True, "freeze_layers": [0]}}),
    ("lora", "lora", {"lora": {"r": 4, "dropout": 0.0}}),
    ("lora_qv", "lora", {"lora": {"r": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}),
    ("dora", "lora", {"lora": {"r": 4, "dropout": 0.0, "use_dora": True}}),
    ("rslora", "lora", {"lora": {"r": 4, "dropout": 0.0, "use_rslora": True}}),
    ("qlora", "qlora", {"lora": {"r": 4, "dropout": 0.0}}),
    ("qlora8", "qlora", {"lora": {"r": 4, "dropout": 0.0}, "qlora": {"bits": 8}}),
    ("adapter", "adapter", {"adapter": {"bottleneck": 8}}),
    ("adapter_attn", "adapter", {"adapter": {"bottleneck": 8, "placement": ["attention"], "nonlinearity": "relu"}}),
    ("prefix", "prefix", {"prefix": {"num_virtual_tokens": 5}}),
    ("prefix_reparam", "prefix",
     {"prefix": {"num_virtual_tokens": 5, "reparameterize": True, "encoder_hidden_size": 32}}),
    ("prompt", "prompt", {"prompt": {"num_virtual_tokens": 5}}),
    ("prompt_text", "prompt", {"prompt": {"num_virtual_tokens": 5, "init_text": "Answer politely:"}}),
    ("ia3", "ia3", {}),
]
CASE_IDS = [c[0] for c in CASES]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def run_config(method: str, sections: dict) -> RunConfig:
    return RunConfig.model_validate({"data": {"train": "unused.jsonl"}, "method": method, **sections})


def linear_shapes(mc) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each decoder linear, from the model config."""
    h, kv = mc.hidden_size, mc.num_key_value_heads * mc.head_dim
    q = mc.num_attention_heads * mc.head_dim
    i = mc.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def expected_trainable(config: RunConfig, model) -> int:
    """Analytic trainable-parameter count of ``config.method`` on ``model`` (from its config numbers)."""
    mc = model.config
    L, h = mc.num_hidden_layers, mc.hidden_size
    kv_dim = mc.num_key_value_heads * mc.head_dim
    shapes = linear_shapes(mc)
    m = config.method
    if m == "full":
        total = sum(p.numel() for p in model.parameters())  # tied lm_head counted once by parameters()
        if config.full.freeze_embeddings:
            total -= mc.vocab_size * h
        total -= len(config.full.freeze_layers) * sum(p.numel() for p in model.model.layers[0].parameters())
        return total
    if m in ("lora", "qlora"):
        c = config.lora
        targets = LINEARS if c.target_modules == "all-linear" else c.target_modules
        per_layer = sum(c.r * (shapes[t][0] + shapes[t][1]) + (shapes[t][1] if c.use_dora else 0) for t in targets)
        return L * per_layer
    if m == "ia3":
        return L * (shapes["k_proj"][1] + shapes["v_proj"][1] + shapes["down_proj"][0])
    if m == "adapter":
        b = config.adapter.bottleneck
        return L * len(config.adapter.placement) * (2 * h * b + b + h)
    if m == "prefix":
        c = config.prefix
        P = c.num_virtual_tokens
        if not c.reparameterize:
            return L * 2 * P * kv_dim
        e = c.encoder_hidden_size
        # embedding (P, kv_dim) -> Linear(kv_dim, e) -> tanh -> Linear(e, L*2*kv_dim)
        return P * kv_dim + (kv_dim * e + e) + (e * L * 2 * kv_dim + L * 2 * kv_dim)
    if m == "prompt":
        return config.prompt.num_virtual_tokens * h
    raise AssertionError(m)


def packed_row(lengths=(5, 3, 6), vocab: int = 49152, seed: int = 0):
    """A packed row ``input_ids [1, T]``, ``position_ids [1, T]`` and next-token targets ``[T]``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return ids, pos, lengths


# one small config per method, for the tests that run every method through the same check
METHOD_SECTIONS = {
    "lora": {"lora": {"r": 4, "dropout": 0.0}},
    "qlora": {"lora": {"r": 4, "dropout": 0.0}},
    "adapter": {"adapter": {"bottleneck": 8}},
    "prefix": {"prefix": {"num_virtual_tokens": 4}},
    "prompt": {"prompt": {"num_virtual_tokens": 4}},
    "ia3": {},
    "full": {},
}


def perturbed(model, scale: float = 0.05, seed: int = 3, max_numel: int | None = 100_000):
    """Move the trainable parameters off their identity init (all adapters; for full tuning, with the default
    ``max_numel``, all but the embeddings), so that a method that is silently dropped shows; eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and (max_numel is None or p.numel() < max_numel):
                p.add_(scale * torch.randn_like(p))
    return model.eval()

