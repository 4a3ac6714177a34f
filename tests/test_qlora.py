"""QLoRA's quantized base: bitsandbytes layers on CPU, what stays unquantized, memory, optimizers, errors."""

from __future__ import annotations

import pytest
import torch

from _method_helpers import HAS_BNB, run_config
from tuneforge.methods.qlora.config import QuantConfig

pytestmark = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")


@pytest.mark.parametrize("quant", [{"bits": 4, "quant_type": "nf4"},
                                   {"bits": 4, "quant_type": "fp4", "double_quant": False},
                                   {"bits": 8}])
def test_quantize_in_place_replaces_decoder_linears_only(quant, tiny_model):
    import bitsandbytes as bnb

    from tuneforge.methods.qlora.model import base_memory_bytes, quantize_model_

    ids = torch.randint(0, 49152, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_model(input_ids=ids).logits
    before = base_memory_bytes(tiny_model.model.layers)
    quantize_model_(tiny_model, QuantConfig(**quant), torch.float32)
    kind = bnb.nn.Linear4bit if quant["bits"] == 4 else bnb.nn.Linear8bitLt
    layer = tiny_model.model.layers[0]
    assert all(isinstance(getattr(layer.self_attn, n), kind) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert all(isinstance(getattr(layer.mlp, n), kind) for n in ("gate_proj", "up_proj", "down_proj"))
    assert type(tiny_model.lm_head) is torch.nn.Linear
    assert tiny_model.lm_head.weight is tiny_model.model.embed_tokens.weight  # still tied
    after = base_memory_bytes(tiny_model.model.layers)
    assert after < before * (0.2 if quant["bits"] == 4 else 0.3)
    with torch.no_grad():
        out = tiny_model(input_ids=ids).logits
    # quantization noise, but the same model
    assert (out - ref).abs().max() < 0.2 * ref.abs().max()
    if quant.get("quant_type") == "nf4":
        assert tiny_model.model.layers[0].mlp.up_proj.weight.quant_state.quant_type == "nf4"


def test_load_quantized_from_a_folder(tmp_path, tiny_model):
    import bitsandbytes as bnb

    from tuneforge.methods.qlora.model import load_quantized_model

    tiny_model.save_pretrained(tmp_path)
    model = load_quantized_model(str(tmp_path), QuantConfig(), torch.float32)
    assert isinstance(model.model.layers[1].mlp.down_proj, bnb.nn.Linear4bit)
    assert model.is_loaded_in_4bit


def test_peft_uses_its_quantized_lora_layers(tiny_model):
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    from tuneforge.methods import apply_method

    model = apply_method(tiny_model, run_config("qlora", {"lora": {"r": 4}}))
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, LoraLinear4bit)


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit", "paged_adamw_8bit"])
def test_optimizers_step_on_cpu(name):
    from tuneforge.methods.qlora.model import make_optimizer

    p = torch.nn.Parameter(torch.ones(64, 128))
    opt = make_optimizer([p], name, lr=1e-2)
    p.grad = torch.ones_like(p)
    opt.step()
    assert (p < 1).all()


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch, tiny_model):
    import importlib.util

    from tuneforge.methods.qlora import model as qlora

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(qlora.QuantizationUnavailableError, match="pip install 'bitsandbytes"):
        qlora.quantize_model_(tiny_model, QuantConfig())
