"""tuneforge export --format gguf: transformers loads our GGUF back to the merged model (the reference).

The strongest check: every tensor transformers reads back from the file (after it de-permutes Q/K and
de-quantizes) equals the merged model's tensor rounded the same way in numpy, bit for bit; so the logits
equal those of that rounded model, and differ from the merged fp32 model only by the rounding itself.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from test_merge import make_run
from tuneforge.export.gguf import (
    check_gguf,
    export_gguf,
    permute_qk,
    round_trip,
    tensor_type,
    write_gguf,
)

PROMPTS = ["Hi there", "List three prime numbers."]


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_model_dir, tokenizer):
    """A LoRA run on the tiny model (adapter far from zero) and its fp32 merge."""
    from tuneforge.export.merge import merge_run

    tmp = tmp_path_factory.mktemp("gguf")
    run = make_run(tmp, tiny_model_dir, tokenizer, "lora")
    merge_run(run, tmp / "merged", dtype="fp32", check_prompts=PROMPTS[:1])
    return run, tmp / "merged"


@pytest.fixture(scope="module")
def written(merged, tmp_path_factory):
    _, merged_dir = merged
    out = tmp_path_factory.mktemp("files")
    files = {}
    for quant in ("f16", "q8_0"):
        files[quant] = out / f"tiny-{quant}.gguf"
        write_gguf(merged_dir, files[quant], quant)
    return files


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_every_tensor_reads_back_as_the_merged_weight_rounded_the_same_way(quant, merged, written):
    from safetensors.torch import load_file

    _, merged_dir = merged
    weights = load_file(str(merged_dir / "model.safetensors"))
    loaded = _load(written[quant]).state_dict()
    for name, w in weights.items():
        qtype = tensor_type(name, tuple(w.shape), quant)
        expected = torch.from_numpy(round_trip(w.numpy(), qtype).copy())
        assert torch.equal(loaded[name], expected), name
        if w.dim() == 2:       # the rounding is the quantization's: tight for f16, looser for q8_0
            rel = ((loaded[name] - w).abs().max() / w.abs().max()).item()
            assert rel <= {"f16": 2 ** -11, "q8_0": 2 ** -7}[quant], (name, rel)
    # tied embeddings: no output.weight in the file, and transformers ties lm_head to token_embd again
    assert torch.equal(loaded["lm_head.weight"], loaded["model.embed_tokens.weight"])


def test_round_trip_logits_and_greedy_tokens(merged, written):
    _, merged_dir = merged
    reports = {quant: check_gguf(written[quant], merged_dir, quant, PROMPTS) for quant in ("f16", "q8_0")}
    for report in reports.values():
        # passed: greedy tokens agree wherever the merged model's top-2 margin exceeds twice the logit difference
        assert report.passed, str(report)
        assert report.format_diff <= 1e-4 * report.scale            # the file holds exactly the rounded weights
    assert all(agree == n for agree, n in reports["f16"].greedy_agreement), str(reports["f16"])
    # vs the fp32 merged model: the rounding's own effect, tight for f16, looser (but bounded) for q8_0 (which
    # depends on the trained weights: 0.05-0.15 seen on the tiny model; a wrong block scale gives logits off by >> 1)
    f16, q8 = reports["f16"].quant_diff, reports["q8_0"].quant_diff
    assert 0 < f16 <= 1e-2 * reports["f16"].scale and f16 < q8 <= 0.5 * reports["q8_0"].scale, (f16, q8)


def test_metadata_tokenizer_and_chat_template(merged, written, tokenizer):
    from gguf import GGUFReader

    run, merged_dir = merged
    config = json.loads((merged_dir / "config.json").read_text())
    reader = GGUFReader(str(written["q8_0"]))

    def field(key):
        return reader.fields[key].contents()

    assert field("general.architecture") == "llama" and field("general.file_type") == 7
    for key, hf in (("block_count", "num_hidden_layers"), ("embedding_length", "hidden_size"),
                    ("feed_forward_length", "intermediate_size"), ("attention.head_count", "num_attention_heads"),
                    ("attention.head_count_kv", "num_key_value_heads"), ("rope.dimension_count", "head_dim"),
                    ("vocab_size", "vocab_size")):
        assert field(f"llama.{key}") == config[hf], key
    assert field("llama.rope.freq_base") == pytest.approx(config["rope_parameters"]["rope_theta"])
    tokens = field("tokenizer.ggml.tokens")
    vocab = tokenizer.get_vocab()
    assert len(tokens) == config["vocab_size"] and all(tokens[i] == t for t, i in vocab.items())
    types = field("tokenizer.ggml.token_type")
    assert types[2] == 3 and types[1000] == 1                       # <|im_end|> is a control token
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "smollm"
    assert len(field("tokenizer.ggml.merges")) == len(json.loads((run / "tokenizer.json").read_text())["model"]
                                                      ["merges"])
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id == 2
    assert field("tokenizer.ggml.padding_token_id") == 2 and field("tokenizer.ggml.add_bos_token") is False
    assert field("tokenizer.chat_template") == (run / "chat_template.jinja").read_text()
    names = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in names and len(names) == 2 + 9 * config["num_hidden_layers"]
    assert names["blk.0.attn_q.weight"] == "Q8_0" and names["blk.0.attn_norm.weight"] == "F32"


def test_the_qk_permutation_is_llama_cpps():
    # one head of head_dim 4, in 1: rows (0, 1, 2, 3) -> llama.cpp's interleaved order (0, 2, 1, 3)
    w = np.arange(4, dtype=np.float32).reshape(4, 1)
    assert permute_qk(w, 1)[:, 0].tolist() == [0, 2, 1, 3]
    w = np.arange(8, dtype=np.float32).reshape(8, 1)              # two heads
    assert permute_qk(w, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tuneforge.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_cli_export_writes_and_checks_the_file(merged, tmp_path):
    run, _ = merged
    out = tmp_path / "model.gguf"
    proc = _cli("export", run, "--format", "gguf", "--quant", "q8_0", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and "OK" in proc.stdout and "Q8_0" in proc.stdout
    assert not list(tmp_path.glob(".merge-*")) and not list(tmp_path.glob("*.partial"))


def test_cli_refuses_what_cannot_be_exported(tmp_path, tiny_model_dir, tokenizer):
    run = make_run(tmp_path, tiny_model_dir, tokenizer, "prefix")
    for argv, message in (((run,), "cannot be merged"), ((tmp_path / "nothing",), "is not a folder")):
        proc = _cli("export", *argv, "--format", "gguf")
        assert proc.returncode == 2, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if "bitsandbytes" not in ln]   # its import warning
        assert len(lines) == 1 and message in lines[0], proc.stderr


def test_a_full_fine_tune_exports_without_a_merge(tmp_path, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from tuneforge.config import RunConfig, dump_config
    from tuneforge.methods import apply_method, save_trained

    config = RunConfig.model_validate({"data": {"train": "unused.jsonl"}, "method": "full",
                                       "model": str(tiny_model_dir)})
    model = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), config)
    run = tmp_path / "run_full"
    save_trained(model, run, config)
    tokenizer.save_pretrained(run)
    (run / "config.yaml").write_text(dump_config(config))
    report = export_gguf(run, tmp_path / "full.gguf", quant="f16", check_prompts=PROMPTS[:1], max_new_tokens=4)
    assert report.passed and report.format_diff == 0.0


def test_a_file_without_the_qk_permutation_fails_the_check(merged, tmp_path, monkeypatch):
    import tuneforge.export.gguf as gguf_module

    _, merged_dir = merged
    monkeypatch.setattr(gguf_module, "permute_qk", lambda w, n: w)
    bad = tmp_path / "unpermuted.gguf"
    write_gguf(merged_dir, bad, "f16")
    report = check_gguf(bad, merged_dir, "f16", PROMPTS[:1], max_new_tokens=2)
    assert not report.passed and "mis-permuted" in str(report)


def _lora_run(tmp_path, base_dir, tokenizer, name: str, lora: dict, noise: float = 0.1, only_b: bool = False):
    """A LoRA run folder (config.yaml, adapter, tokenizer) with ``noise * N(0, 1)`` added to the adapter
    (to B alone with ``only_b``: A keeps peft's init, as after a short real training)."""
    from transformers import AutoModelForCausalLM

    from _method_helpers import run_config
    from tuneforge.config import dump_config
    from tuneforge.methods import apply_method, save_trained

    config = run_config("lora", {"lora": {"dropout": 0.0, **lora}, "model": str(base_dir)})
    model = apply_method(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), config, tokenizer)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and (not only_b or "lora_B" in n):
                p.add_(noise * torch.randn_like(p))
    run = tmp_path / name
    save_trained(model, run, config)
    tokenizer.save_pretrained(run)
    (run / "config.yaml").write_text(dump_config(config))
    return run


@pytest.mark.parametrize("lora", [{"r": 4, "alpha": 8}, {"r": 8, "alpha": 4, "use_rslora": True}],
                         ids=["lora", "rslora"])
def test_gguf_lora_applied_as_llama_cpp_does_gives_the_merged_weights(lora, tmp_path, tiny_model_dir, tokenizer):
    """llama.cpp adds (alpha / r) * B A to each base GGUF tensor: that must be the merged weight, permuted alike."""
    from gguf import GGUFReader
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneforge.export.gguf import gguf_tensor_name
    from tuneforge.export.gguf_lora import export_gguf_lora

    run = _lora_run(tmp_path, tiny_model_dir, tokenizer, "run", lora)
    out = export_gguf_lora(run, tmp_path / "adapter.gguf")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base_sd = {k: v.clone().numpy() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(run)).merge_and_unload().state_dict()
    cfg = base.config
    reader = GGUFReader(str(out))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["general.architecture"].contents() == "llama"
    alpha = reader.fields["adapter.lora.alpha"].contents()
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    checked = 0
    for name, w in merged.items():
        target = gguf_tensor_name(name) if name != "lm_head.weight" else None
        if target is None or target + ".lora_a" not in tensors:
            continue
        a, b = tensors[target + ".lora_a"], tensors[target + ".lora_b"]
        delta = alpha / a.shape[0] * b @ a                       # llama.cpp: r from lora_a's shape
        expected = w.numpy() - base_sd[name]
        if name.endswith("q_proj.weight"):
            expected = permute_qk(expected, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            expected = permute_qk(expected, cfg.num_key_value_heads)
        np.testing.assert_allclose(delta, expected, atol=1e-5, rtol=0, err_msg=name)
        assert np.abs(expected).max() > 1e-3                      # the adapter really changes this weight
        checked += 1
    assert checked == 7 * cfg.num_hidden_layers


def test_gguf_lora_refuses_dora_with_one_line(tmp_path, tiny_model_dir, tokenizer):
    run = _lora_run(tmp_path, tiny_model_dir, tokenizer, "dora", {"r": 4, "use_dora": True})
    proc = _cli("export", run, "--format", "gguf-lora")
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "bitsandbytes" not in ln]
    assert len(lines) == 1 and "DoRA" in lines[0]


@pytest.mark.integration
def test_real_model_f16_gguf_gives_the_same_greedy_answers(tmp_path, real_model_path, tokenizer):
    """SmolLM2-135M (9 heads, 3 KV heads) with a LoRA adapter of a realistic size: the f16 GGUF answers token
    for token like the merged model."""
    run = _lora_run(tmp_path, real_model_path, tokenizer, "run", {"r": 8, "alpha": 16}, noise=0.01, only_b=True)
    report = export_gguf(run, tmp_path / "smollm2-f16.gguf", quant="f16", check_prompts=["List three prime numbers."],
                         max_new_tokens=12)
    assert report.passed, str(report)
    assert all(agree == n for agree, n in report.greedy_agreement), str(report)
