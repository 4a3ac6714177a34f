"""The memory estimator against exact references: known parameter counts, tensor bytes after a real
optimizer step, and the tensors autograd actually saves in a Llama block."""

from __future__ import annotations

import argparse
import importlib.util

import pytest
import torch

from tuneforge.config import RunConfig
from tuneforge.estimate import NAMED_SHAPES, estimate_memory, resolve_shape, seeds_table
from tuneforge.estimate.memory import activation_bytes_per_token_layer
from tuneforge.estimate.shapes import shape_from_config

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
TINY = dict(num_hidden_layers=3, hidden_size=64, intermediate_size=160, num_attention_heads=8, num_key_value_heads=2)


@pytest.mark.parametrize("name, params", [
    ("7b", 6_738_415_616), ("13b", 13_015_864_320), ("70b", 68_976_648_192),
    ("llama-3.2-1b", 1_235_814_400), ("llama-3.1-8b", 8_030_261_248), ("smollm2-135m", 134_515_008),
])
def test_named_shapes_have_the_published_parameter_counts(name, params):
    assert NAMED_SHAPES[name].num_parameters() == params


def test_lora_parameters_of_llama2_7b_match_peft():
    # peft prints "trainable params: 39,976,960" for r=16 on all linear layers of Llama-2-7B
    assert NAMED_SHAPES["7b"].lora_parameters(16) == 39_976_960
    shape = NAMED_SHAPES["7b"]
    per_layer = 16 * ((4096 + 4096) * 4 + (4096 + 11008) * 3)
    assert shape.lora_parameters(16) == 32 * per_layer


def test_the_real_smollm2_config_gives_the_named_shape_and_the_models_parameter_count(real_model_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = resolve_shape("smollm2-135m-instruct")
    named = NAMED_SHAPES["smollm2-135m"]
    assert (shape.hidden_size, shape.intermediate_size, shape.num_layers, shape.num_heads, shape.num_kv_heads,
            shape.vocab_size, shape.hd, shape.tie_word_embeddings) == (
            named.hidden_size, named.intermediate_size, named.num_layers, named.num_heads, named.num_kv_heads,
            named.vocab_size, named.hd, named.tie_word_embeddings)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(real_model_path))
    unique = {id(p): p.numel() for p in model.parameters()}  # tied lm_head counted once
    assert sum(unique.values()) == shape.num_parameters() == 134_515_008


def _tiny(dtype=torch.float32):
    from tuneforge.models.loading import build_tiny_model

    return build_tiny_model(**TINY).to(dtype)


def _one_step(model, method: str):
    from tuneforge.data.packing import pack
    from tuneforge.data.rendering import TokenizedExample
    from tuneforge.methods.loss import packed_loss_sum

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    row = pack([TokenizedExample(list(range(5, 17)), [True] * 12)])
    packed_loss_sum(model, row, method).backward()
    optimizer.step()
    return params, optimizer


def _nbytes(tensors) -> int:
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("method", ["full", "lora", pytest.param(
    "qlora", marks=pytest.mark.skipif(not HAS_BNB, reason="no bitsandbytes"))])
def test_weights_gradients_and_optimizer_states_match_tensor_bytes_after_a_step(method):
    from tuneforge.methods import apply_method
    from tuneforge.methods.qlora.model import base_memory_bytes

    model = _tiny()
    shape = shape_from_config(model.config, "tiny")
    model = apply_method(model, RunConfig.model_validate({"method": method, "data": {"train": "x"},
                                                          "lora": {"r": 4, "dropout": 0.0}}))
    params, optimizer = _one_step(model, method)
    est = estimate_memory(shape, method, seq=12, lora_r=4, dtype="fp32", device="cpu")
    weights = base_memory_bytes(model) if method == "qlora" else _nbytes(model.parameters())
    states = [s for state in optimizer.state.values() for s in state.values() if s.dim() > 0]
    assert est.trainable_params == sum(p.numel() for p in params)
    assert est.gradients == _nbytes(p.grad for p in params)
    assert est.optimizer_states == _nbytes(states)
    if method == "qlora":  # quantization statistics are per block: exact up to the nested code tables
        assert est.weights == pytest.approx(weights, rel=0.02)
    else:
        assert est.weights == weights


def _saved_bytes_of_layer(model, method: str, layer: int, batch: int, seq: int, vocab: int = 49152) -> int:
    """Bytes of the tensors autograd saves inside decoder layer ``layer`` (parameters and RoPE cos/sin excluded)."""
    from tuneforge.data.packing import pack
    from tuneforge.data.rendering import TokenizedExample
    from tuneforge.methods.loss import packed_loss_sum

    g = torch.Generator().manual_seed(0)
    row = pack([TokenizedExample(torch.randint(0, vocab, (seq,), generator=g).tolist(), [True] * seq)
                for _ in range(batch)])
    decoder = next(m for name, m in model.named_modules() if name.endswith(("model.layers", "gpt_neox.layers")))
    target = decoder[layer]
    inside = [False]
    target.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    target.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    mc = model.config
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    rope_dim = int(head_dim * getattr(mc, "rotary_pct", 1.0))     # GPT-NeoX rotates part of each head

    def pack_hook(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr in skip:
            return t
        if not inside[0] or (t.dim() == 4 and t.shape[1] == 1 and t.shape[-1] == rope_dim):
            skip.add(ptr)  # saved outside the layer (first use elsewhere), or the shared RoPE cos/sin
            return t
        seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        packed_loss_sum(model, row, method)
    return sum(seen.values())


@pytest.mark.parametrize("attention", ["packed_sdpa", "sdpa"])
@pytest.mark.parametrize("method, dtype, batch, lora", [
    ("full", torch.float32, 1, {}), ("full", torch.float32, 3, {}), ("full", torch.bfloat16, 3, {}),
    ("lora", torch.float32, 1, {"dropout": 0.05}), ("lora", torch.float32, 3, {"dropout": 0.05}),
    ("lora", torch.bfloat16, 1, {"dropout": 0.05}), ("lora", torch.bfloat16, 3, {"dropout": 0.05}),
    ("lora", torch.float32, 3, {"dropout": 0.05, "fused_forward": False}),
    ("lora", torch.bfloat16, 3, {"dropout": 0.05, "fused_forward": False}),
    ("lora", torch.float32, 3, {"dropout": 0.05, "shared_dropout_mask": False}),
    ("lora", torch.bfloat16, 3, {"dropout": 0.05, "shared_dropout_mask": False}),
    ("lora", torch.bfloat16, 3, {"dropout": 0.0, "fused_forward": False}),
    ("lora", torch.float32, 3, {"dropout": 0.0}), ("lora", torch.bfloat16, 3, {"dropout": 0.0}),
    ("full", torch.float32, 3, {"hf_rms_norm": True}), ("full", torch.bfloat16, 3, {"hf_rms_norm": True}),
    ("lora", torch.bfloat16, 3, {"dropout": 0.05, "hf_rms_norm": True}),
])
def test_activation_formula_matches_the_tensors_autograd_saves(method, dtype, batch, lora, attention):
    from tuneforge.kernels.packed_attention import NAME, set_attention
    from tuneforge.kernels.rms_norm import fuse_rms_norm
    from tuneforge.methods import apply_method

    seq = 16
    lora = dict(lora)
    fused_norm = not lora.pop("hf_rms_norm", False)
    model = _tiny(dtype)
    shape = shape_from_config(model.config, "tiny")
    model = apply_method(model, RunConfig.model_validate({"method": method, "data": {"train": "x"},
                                                          "lora": {"r": 4, **lora}}))
    set_attention(model, NAME if attention == "packed_sdpa" else "sdpa")
    if fused_norm:
        assert fuse_rms_norm(model) == 2 * model.config.num_hidden_layers + 1
    model.train()
    measured = _saved_bytes_of_layer(model, method, layer=1, batch=batch, seq=seq)
    a = 2 if dtype == torch.bfloat16 else 4
    T = batch * seq
    dense = batch > 1 and attention == "sdpa"
    predicted = T * activation_bytes_per_token_layer(
        shape, method, a, batch > 1, lora_r=4, lora_dropout=lora.get("dropout", 0.05), device="cpu",
        attention=attention, fused_forward=lora.get("fused_forward", True),
        shared_dropout_mask=lora.get("shared_dropout_mask", True), fused_rms_norm=fused_norm,
    ) + (a * T * T if dense else 0)
    assert measured == predicted


def test_checkpointing_and_shorter_rows_need_less():
    plain = estimate_memory("7b", "lora", 2048, 1)
    ckpt = estimate_memory("7b", "lora", 2048, 1, gradient_checkpointing=True)
    short = estimate_memory("7b", "lora", 512, 1)
    assert ckpt.activations < plain.activations / 5
    assert short.peak < plain.peak
    quarter = estimate_memory("7b", "lora", 2048, trained_fraction=0.25)
    assert quarter.logits == pytest.approx(plain.logits / 4, rel=1e-3)


def test_seeds_table_orders_methods_and_states_assumptions():
    est = {m: estimate_memory("7b", m, 512, 1, gradient_checkpointing=True, master_weights=True,
                              optimizer_impl="fused") for m in ("full", "lora", "qlora")}
    gib = {m: e.peak / 1024 ** 3 for m, e in est.items()}
    assert 95 < gib["full"] < 115          # 16 B/param x 6.74B = 100.4 GiB plus activations
    assert 13 < gib["lora"] < 17
    assert 4 < gib["qlora"] < 8
    text = seeds_table()
    assert "llama-2-70b" in text and "Assumptions" in text


def test_cli_parser_registers_estimate(capsys):
    from tuneforge.estimate.commands import add_estimate_command

    parser = argparse.ArgumentParser()
    add_estimate_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["estimate", "--model", "7b", "--method", "qlora", "--seq", "1024",
                              "--gradient-checkpointing"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "llama-2-7b" in out and "peak" in out
    args = parser.parse_args(["estimate", "--seeds-table"])
    assert args.func(args) == 0
    assert "llama-2-13b" in capsys.readouterr().out


@pytest.mark.parametrize("pair, message", [
    ("lora.rr=3", "error: --set: unknown key 'lora.rr' (did you mean 'lora.r'?)"),
    ("adapter.bottleneck=abc", "error: --set adapter.bottleneck: Input should be a valid integer"),
    ("nolora.r=3", "error: --set nolora.*: no method owns a section 'nolora'"),
    ("nonsense", "error: --set 'nonsense': write SECTION.KEY=VALUE"),
])
def test_estimate_set_refuses_a_bad_key_or_value_in_one_line(pair, message, capsys):
    from tuneforge.cli import main

    assert main(["estimate", "--model", "smollm2-135m", "--method", "lora", "--set", pair]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(message), err
