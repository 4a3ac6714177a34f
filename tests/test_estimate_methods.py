"""The memory estimate of the methods beyond full/LoRA/QLoRA (bottleneck adapter, IA3, prefix and prompt tuning),
each from its record's ``memory`` hook: exact against the tensors autograd saves and the tensors a step leaves,
and within 15% of the peak a real training step measures."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_estimate import _nbytes, _one_step, _saved_bytes_of_layer, _tiny
from tuneforge.config import RunConfig
from tuneforge.estimate import estimate_memory
from tuneforge.estimate.memory import memory_inputs, method_settings, method_terms
from tuneforge.estimate.shapes import shape_from_config

NEW_METHODS = ("adapter", "ia3", "prefix", "prompt")
VIRTUAL = {"prefix": {"num_virtual_tokens": 4}, "prompt": {"num_virtual_tokens": 4}}


def _config(method: str, settings: dict) -> RunConfig:
    return RunConfig.model_validate({"method": method, "data": {"train": "x"}, **VIRTUAL, **settings})


@pytest.mark.parametrize("attention", ["packed_sdpa", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method, batch, settings", [
    ("adapter", 1, {}), ("adapter", 3, {}), ("adapter", 3, {"adapter": {"nonlinearity": "relu", "bottleneck": 24}}),
    ("adapter", 3, {"adapter": {"dropout": 0.1, "placement": ["mlp"]}}),
    ("adapter", 3, {"adapter": {"nonlinearity": "tanh", "dropout": 0.1}}),
    ("ia3", 1, {}), ("ia3", 3, {}),
    ("ia3", 3, {"ia3": {"target_modules": ["q_proj", "o_proj", "up_proj"], "feedforward_modules": ["up_proj"]}}),
    ("prefix", 1, {}), ("prefix", 3, {}), ("prefix", 3, {"prefix": {"num_virtual_tokens": 7}}),
    ("prompt", 1, {}), ("prompt", 3, {}), ("prompt", 3, {"prompt": {"num_virtual_tokens": 7}}),
])
def test_each_methods_activation_terms_match_the_tensors_autograd_saves(method, batch, settings, dtype, attention):
    from tuneforge.kernels.packed_attention import NAME, set_attention
    from tuneforge.kernels.rms_norm import fuse_rms_norm
    from tuneforge.methods import apply_method

    seq = 16
    model = _tiny(dtype)
    shape = shape_from_config(model.config, "tiny")
    config = _config(method, settings)
    model = apply_method(model, config)
    set_attention(model, NAME if attention == "packed_sdpa" else "sdpa")
    fuse_rms_norm(model)
    model.train()
    measured = _saved_bytes_of_layer(model, method, layer=1, batch=batch, seq=seq)

    sections = method_settings({key: config.section(key) for key in ("adapter", "ia3", "prefix", "prompt")})
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    terms = method_terms(method, memory_inputs(shape, sections, name, seq, batch, attention, "cpu"))
    tokens = seq * batch + terms.extra_tokens
    dense = batch > 1 and attention == "sdpa" and not terms.explicit_mask
    predicted = tokens * terms.per_token_layer + terms.per_layer + (terms.act_bytes * tokens ** 2 if dense else 0)
    assert measured == predicted


@pytest.mark.parametrize("method, settings", [
    ("adapter", {}), ("adapter", {"adapter": {"bottleneck": 8, "placement": ["attention"]}}), ("ia3", {}),
    ("prefix", {}), ("prefix", {"prefix": {"reparameterize": True, "encoder_hidden_size": 32}}), ("prompt", {}),
])
def test_weights_gradients_and_optimizer_states_match_tensor_bytes_after_a_step(method, settings):
    from tuneforge.methods import apply_method

    model = _tiny()
    shape = shape_from_config(model.config, "tiny")
    config = _config(method, settings)
    model = apply_method(model, config)
    params, optimizer = _one_step(model, method)
    est = estimate_memory(shape, method, seq=12, dtype="fp32", device="cpu",
                          settings={key: config.section(key) for key in ("adapter", "prefix", "prompt")})
    states = [s for state in optimizer.state.values() for s in state.values() if s.dim() > 0]
    assert est.trainable_params == sum(p.numel() for p in params)
    assert est.gradients == _nbytes(p.grad for p in params)
    assert est.optimizer_states == _nbytes(states)
    assert est.weights == _nbytes(model.parameters())


# --- the peak of real training steps, measured in a fresh process

SHAPE = dict(vocab_size=1024, hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)
SEQ, BATCH = 256, 4
PEAK_METHODS = ("full", "lora") + NEW_METHODS


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+)", text, re.M).group(1))


def measure_peaks(methods: list[str]) -> dict[str, float]:
    """In a fresh process (``MALLOC_MMAP_THRESHOLD_`` set, so that RSS follows live tensors, as
    ``benchmarks/memory_validation.py``): for each method, what the trainer does for two steps on one packed row
    (model, method, attention, fused norms, fused AdamW), its peak resident memory above the memory before the
    model was built, in bytes (the high-water mark reset between methods)."""
    import gc

    from transformers import AutoModelForCausalLM, LlamaConfig

    from tuneforge.data.packing import pack
    from tuneforge.data.rendering import TokenizedExample
    from tuneforge.methods import apply_method
    from tuneforge.methods.loss import packed_loss_sum
    from tuneforge.training.trainer import make_optimizer, prepare_for_training

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    row = pack([TokenizedExample(torch.randint(0, SHAPE["vocab_size"], (SEQ,), generator=g).tolist(), [True] * SEQ)
                for _ in range(BATCH)])
    peaks = {}
    for method in methods:
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")          # VmHWM := VmRSS
        baseline = _status_kib("VmRSS")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE), dtype=torch.float32,
                                                 attn_implementation="sdpa")
        config = RunConfig.model_validate({"method": method, "task": "pretrain", "dtype": "fp32",
                                           "learning_rate": 1e-5, "data": {"train": "unused.jsonl"}})
        model = apply_method(model, config)
        prepare_for_training(model, config)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(config, params)
        for _ in range(2):      # AdamW allocates its states in the first step: the second holds everything
            loss = packed_loss_sum(model, row, method)
            (loss / row.num_loss_tokens).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        peaks[method] = (_status_kib("VmHWM") - baseline) * 1024
        del model, optimizer, params, loss
    return peaks


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")
def test_each_methods_estimate_is_within_15_percent_of_a_measured_peak():
    from transformers import LlamaConfig

    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            "from test_estimate_methods import measure_peaks; "
            f"print(json.dumps(measure_peaks({list(PEAK_METHODS)!r})))")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    shape = shape_from_config(LlamaConfig(**SHAPE), "test-llama")
    errors = {}
    for method in PEAK_METHODS:
        est = estimate_memory(shape, method, SEQ, BATCH, dtype="fp32", device="cpu", trained_fraction=(SEQ - 1) / SEQ)
        errors[method] = round((est.peak - measured[method]) / measured[method], 3)
        # the method's own terms carry the estimate: without its activations it would be far off
        assert est.activations > 0.4 * measured[method], (method, est.activations, measured[method])
    assert all(abs(e) <= 0.15 for e in errors.values()), (errors, measured)
