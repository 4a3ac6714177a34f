"""GGUF export of Gemma 3 (``general.architecture = gemma3``): the file round-trips through transformers, and
llama.cpp computes the merged model from it and applies the GGUF LoRA adapter as the merge does.

The model is the tiny random Gemma 3 of ``_architectures`` (two layers, the first sliding with a window of 4
tokens, shorter than the test rows; query/key norms; tied embeddings) with SmolLM2's tokenizer (a byte-level
BPE, written as ``tokenizer.ggml.model = gpt2``, which llama.cpp's gemma3 reads as any other). Its 2-D
weights are scaled up (logits of a few units) and its norm weights moved off zero, so that a norm written
without Gemma's ``+ 1`` shift, a wrong sliding-window pattern or local RoPE base changes the logits.
The llama.cpp tests skip without llama.cpp's venv (``python benchmarks/throughput/venvs.py llamacpp``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _architectures import build
from test_export_gguf import _lora_run
from tuneforge.export.gguf import (
    GEMMA3,
    UnsupportedModelError,
    _rounded_state_dict,
    check_gguf,
    export_gguf,
    gguf_tensor_name,
    write_gguf,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "gguf"))
from compare import agreement, llamacpp_outputs, llamacpp_python, reference_outputs  # noqa: E402

PROMPTS = ["Hi there", "List three prime numbers."]
TEXTS = ["Hi there, where is my parcel?", "<|im_start|>user\nList three prime numbers.<|im_end|>\n"
         "<|im_start|>assistant\n"]
GREEDY = 8
# llama.cpp against the same rounded weights in fp32, as a share of the largest logit: f16 as in
# test_export_llamacpp.py; q8_0 looser than llama's 3%: measured 3.2% on this model, whose logits are small (2.5;
# Gemma's norms undo the weights' scaling) next to the error of llama.cpp's 8-bit activations
TOLERANCE = {"f16": 0.01, "q8_0": 0.05}
needs_llamacpp = pytest.mark.skipif(llamacpp_python() is None, reason="llama.cpp's venv is not built: "
                                    "python benchmarks/throughput/venvs.py llamacpp")


@pytest.fixture(scope="module")
def gemma3_run(tmp_path_factory, tokenizer):
    """The tiny Gemma 3 base, a LoRA run on it, its fp32 merge, and the token ids of TEXTS."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("gemma3-gguf")
    base = build("gemma3", tokenizer)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if p.dim() == 2:
                p.mul_(3.0)
            elif name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    base.save_pretrained(tmp / "base")
    tokenizer.save_pretrained(tmp / "base")
    run = _lora_run(tmp, tmp / "base", tokenizer, "run", {"r": 4, "alpha": 8})
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp / "base", dtype=torch.float32),
                                       str(run)).merge_and_unload()
    merged.save_pretrained(tmp / "merged")
    tokenizer.save_pretrained(tmp / "merged")
    sequences = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    return tmp, run, sequences


def _rounded(model_dir: Path, quant: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.load_state_dict(_rounded_state_dict(model_dir, quant), strict=False)
    return model


def test_gemma3_metadata_names_and_shifted_norms(gemma3_run):
    from gguf import GGUFReader
    from safetensors.torch import load_file

    tmp, _, _ = gemma3_run
    out = tmp / "merged-q8_0.gguf"
    write_gguf(tmp / "merged", out, "q8_0")
    config = json.loads((tmp / "merged" / "config.json").read_text())
    reader = GGUFReader(str(out))

    def field(key):
        return reader.fields[key].contents()

    assert field("general.architecture") == "gemma3"
    for key, value in (("block_count", 2), ("embedding_length", 64), ("feed_forward_length", 128),
                       ("attention.head_count", 4), ("attention.head_count_kv", 2), ("attention.key_length", 16),
                       ("attention.value_length", 16), ("attention.sliding_window", 4),
                       ("context_length", 256), ("vocab_size", config["vocab_size"])):
        assert field(f"gemma3.{key}") == value, key
    assert field("gemma3.attention.sliding_window_pattern") == [True, False]      # layer 0 sliding, 1 full
    assert field("gemma3.rope.freq_base") == 1_000_000.0 and field("gemma3.rope.freq_base_swa") == 10_000.0
    assert "gemma3.final_logit_softcapping" not in reader.fields
    assert field("tokenizer.ggml.model") == "gpt2"
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors and len(tensors) == 2 + 13 * 2        # tied: no output.weight
    weights = load_file(str(tmp / "merged" / "model.safetensors"))
    for name, w in weights.items():
        target = gguf_tensor_name(name, GEMMA3)
        assert target in tensors, name
        if name.endswith("norm.weight"):      # llama.cpp multiplies by w: the file holds 1 + w, in F32
            assert tensors[target].tensor_type.name == "F32"
            np.testing.assert_array_equal(np.array(tensors[target].data), w.numpy() + np.float32(1.0))
    assert tensors["blk.0.post_attention_norm.weight"] and tensors["blk.0.ffn_norm.weight"]
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "Q8_0"


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_gemma3_round_trip_through_transformers(quant, gemma3_run):
    """Every tensor reads back as the merged weight rounded the same way (norms: 1 + w rounded, minus 1), so
    the logits equal the rounded model's; greedy tokens agree."""
    tmp, _, _ = gemma3_run
    out = tmp / f"rt-{quant}.gguf"
    write_gguf(tmp / "merged", out, quant)
    report = check_gguf(out, tmp / "merged", quant, PROMPTS, max_new_tokens=6)
    assert report.passed, str(report)
    assert report.format_diff <= 1e-4 * report.scale and report.scale > 1.0, str(report)
    if quant == "f16":
        assert all(agree == n for agree, n in report.greedy_agreement), str(report)


def test_gemma3_without_the_norm_shift_fails_the_check(gemma3_run, monkeypatch):
    """The check can fail: the same file written without Gemma's + 1 on the norms is far off."""
    import tuneforge.export.gguf as gguf_module

    tmp, _, _ = gemma3_run
    unshifted = gguf_module.GGUFArchitecture(**{**gguf_module.GEMMA3.__dict__, "norm_shift": 0.0})
    monkeypatch.setitem(gguf_module.ARCHITECTURES, "gemma3_text", unshifted)
    bad = tmp / "unshifted-f16.gguf"
    write_gguf(tmp / "merged", bad, "f16")
    monkeypatch.setitem(gguf_module.ARCHITECTURES, "gemma3_text", gguf_module.GEMMA3)
    report = check_gguf(bad, tmp / "merged", "f16", PROMPTS[:1], max_new_tokens=2)
    assert not report.passed and "mis-shifted" in str(report)


def test_export_gguf_merges_a_gemma3_lora_run(gemma3_run):
    tmp, run, _ = gemma3_run
    report = export_gguf(run, tmp / "export-q8_0.gguf", quant="q8_0", check_prompts=PROMPTS[:1], max_new_tokens=4)
    assert report.passed and report.tensor_types == {"F32": 13, "Q8_0": 15}, str(report)


def test_gemma3_features_llama_cpp_cannot_compute_are_refused(gemma3_run, tmp_path):
    tmp, _, _ = gemma3_run
    config = json.loads((tmp / "base" / "config.json").read_text())
    for change, message in (({"query_pre_attn_scalar": 32}, "query_pre_attn_scalar"),
                            ({"attn_logit_softcapping": 50.0}, "soft-capping"),
                            ({"model_type": "qwen2"}, "gemma3_text, llama only")):
        folder = tmp_path / message.replace(" ", "_").replace(",", "")
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UnsupportedModelError, match=message):
            write_gguf(folder, tmp_path / "x.gguf", "f16")


def test_gemma3_gguf_lora_is_the_merge_delta_unpermuted(gemma3_run):
    """llama.cpp adds (alpha / r) * B A to each base GGUF tensor; gemma3 has no Q/K permutation."""
    from gguf import GGUFReader
    from safetensors.torch import load_file

    from tuneforge.export.gguf_lora import write_gguf_lora

    tmp, run, _ = gemma3_run
    base_config = json.loads((tmp / "base" / "config.json").read_text())
    out = tmp / "adapter.gguf"
    write_gguf_lora(run, base_config, out)
    reader = GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == "gemma3"
    alpha = reader.fields["adapter.lora.alpha"].contents()
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    base = load_file(str(tmp / "base" / "model.safetensors"))
    merged = load_file(str(tmp / "merged" / "model.safetensors"))
    checked = 0
    for name, w in merged.items():
        target = gguf_tensor_name(name, GEMMA3) if name != "lm_head.weight" else None
        if target is None or target + ".lora_a" not in tensors:
            continue
        a, b = tensors[target + ".lora_a"], tensors[target + ".lora_b"]
        expected = (w - base[name]).numpy()
        np.testing.assert_allclose(alpha / a.shape[0] * b @ a, expected, atol=1e-5, rtol=0, err_msg=name)
        assert np.abs(expected).max() > 1e-3
        checked += 1
    assert checked == 7 * base_config["num_hidden_layers"]


@needs_llamacpp
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_llama_cpp_computes_the_merged_gemma3_from_each_export(quant, gemma3_run, tokenizer):
    tmp, _, sequences = gemma3_run
    gguf = tmp / f"llamacpp-{quant}.gguf"
    write_gguf(tmp / "merged", gguf, quant)
    got = llamacpp_outputs(gguf, sequences, GREEDY, TEXTS)
    assert [got[f"tokens_{i}"].tolist() for i in range(len(TEXTS))] == sequences   # its tokenizer is the run's
    ref = reference_outputs(_rounded(tmp / "merged", quant), sequences, GREEDY)
    seen = agreement(ref, got, len(sequences))
    assert seen["max_abs_logit"] > 1.0, seen
    assert seen["max_abs_diff"] <= TOLERANCE[quant] * seen["max_abs_logit"], seen
    assert seen["decisive_flips"] == 0, seen
    if quant == "f16":
        assert seen["top1"] == 1.0 and seen["greedy_same"] == seen["greedy_all"], seen


@needs_llamacpp
def test_llama_cpp_applies_the_gemma3_gguf_lora_as_the_merge_does(gemma3_run):
    from tuneforge.export.gguf_lora import write_gguf_lora

    tmp, run, sequences = gemma3_run
    base = tmp / "base-f16.gguf"
    write_gguf(tmp / "base", base, "f16")
    adapter = tmp / "llamacpp-adapter.gguf"
    write_gguf_lora(run, json.loads((tmp / "base" / "config.json").read_text()), adapter)
    got = llamacpp_outputs(base, sequences, GREEDY, lora=adapter)
    without = llamacpp_outputs(base, sequences, GREEDY)
    seen = agreement(reference_outputs(_rounded(tmp / "merged", "f16"), sequences, GREEDY), got, len(sequences))
    assert seen["max_abs_diff"] <= TOLERANCE["f16"] * seen["max_abs_logit"], seen
    assert seen["decisive_flips"] == 0 and seen["greedy_same"] == seen["greedy_all"], seen
    moved = agreement(got, without, len(sequences))
    assert moved["max_abs_diff"] > 20 * seen["max_abs_diff"], (moved, seen)       # the adapter was applied


@needs_llamacpp
def test_llama_cpp_tells_a_wrong_sliding_window_pattern_apart(gemma3_run, monkeypatch):
    """The comparison can fail: the file with llama.cpp's default pattern (5 sliding layers in 6: both tiny
    layers sliding) attends past the window on layer 1 no more, and its logits are far off."""
    import tuneforge.export.gguf as gguf_module

    tmp, _, sequences = gemma3_run
    monkeypatch.setattr(gguf_module, "gemma3_layer_types", lambda config: ["sliding_attention"] * 2)
    bad = tmp / "all-sliding-f16.gguf"
    write_gguf(tmp / "merged", bad, "f16")
    seen = agreement(reference_outputs(_rounded(tmp / "merged", "f16"), sequences, GREEDY),
                     llamacpp_outputs(bad, sequences, GREEDY), len(sequences))
    assert seen["max_abs_diff"] > TOLERANCE["f16"] * seen["max_abs_logit"], seen
