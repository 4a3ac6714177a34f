"""Merge and export: merged == unmerged, saved dtype as asked, refusals, and a check that catches corruption."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from _method_helpers import HAS_BNB, run_config
from tuneforge.config import dump_config
from tuneforge.export import MergeCheckError, merge_run, verify_merge
from tuneforge.export.commands import add_merge_command
from tuneforge.methods import NotMergeableError, apply_method, save_trained

PROMPTS = ["Hi there", "2 + 2 ="]
SECTIONS = {
    "lora": ("lora", {"lora": {"r": 4, "dropout": 0.0}}),
    "dora": ("lora", {"lora": {"r": 4, "dropout": 0.0, "use_dora": True}}),
    "ia3": ("ia3", {}),
    "qlora": ("qlora", {"lora": {"r": 4, "dropout": 0.0}}),
    "adapter": ("adapter", {"adapter": {"bottleneck": 4}}),
    "prefix": ("prefix", {"prefix": {"num_virtual_tokens": 3}}),
    "prompt": ("prompt", {"prompt": {"num_virtual_tokens": 3}}),
}


@pytest.fixture(scope="module")
def base_dir(tiny_model_dir):
    return tiny_model_dir


def make_run(tmp_path, base_dir, tokenizer, case: str):
    """A run folder as the trainer writes it: config.yaml, adapter files, tokenizer + chat template."""
    from transformers import AutoModelForCausalLM

    method, sections = SECTIONS[case]
    config = run_config(method, {**sections, "model": str(base_dir)})
    model = apply_method(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), config, tokenizer)
    torch.manual_seed(0)
    with torch.no_grad():  # a "trained" adapter: far from the identity start
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    run = tmp_path / f"run_{case}"
    save_trained(model, run, config)
    tokenizer.save_pretrained(run)
    (run / "config.yaml").write_text(dump_config(config))
    (run / "run.json").write_text(json.dumps({"method": method}))
    return run


def unmerged_logits(base_dir, run, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, str(run)).eval()(input_ids=ids).logits[0]


@pytest.mark.parametrize("case,dtype", [("lora", "fp32"), ("dora", "bf16"), ("ia3", "fp16"), ("qlora", "bf16")])
def test_merged_matches_unmerged_in_the_requested_dtype(case, dtype, tmp_path, base_dir, tokenizer):
    if case == "qlora" and not HAS_BNB:
        pytest.skip("bitsandbytes not installed")
    from transformers import AutoModelForCausalLM, GenerationConfig

    run = make_run(tmp_path, base_dir, tokenizer, case)
    out = tmp_path / "merged"
    report = merge_run(run, out, dtype=dtype, check_prompts=PROMPTS)
    assert report.passed and report.max_abs_diff <= report.tolerance
    assert not (tmp_path / "merged.partial").exists()

    expected = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    with safe_open(str(out / "model.safetensors"), framework="pt") as st:
        assert {st.get_tensor(k).dtype for k in st.keys()} == {expected}
    assert json.loads((out / "config.json").read_text())["dtype"] == {"fp32": "float32", "bf16": "bfloat16",
                                                                       "fp16": "float16"}[dtype]
    assert "lora_A" not in " ".join(load_file(out / "model.safetensors"))
    assert GenerationConfig.from_pretrained(out).eos_token_id == tokenizer.eos_token_id == 2
    assert (out / "chat_template.jinja").is_file() and (out / "tokenizer.json").is_file()

    ids = torch.randint(0, 49152, (1, 9), generator=torch.Generator().manual_seed(5))
    reference = unmerged_logits(base_dir, run, ids)
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(input_ids=ids).logits[0]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits[0]
    atol = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 5e-3}[dtype]
    torch.testing.assert_close(merged, reference, rtol=0, atol=atol)
    # the adapter matters far more than the merge error, so the match means something
    assert (reference - base_logits).abs().max() > 5 * (merged - reference).abs().max()


@pytest.mark.parametrize("case", ["adapter", "prefix", "prompt"])
def test_methods_that_cannot_merge_are_refused(case, tmp_path, base_dir, tokenizer):
    run = make_run(tmp_path, base_dir, tokenizer, case)
    with pytest.raises(NotMergeableError, match="cannot be merged.*Serve the base model with the adapter"):
        merge_run(run, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    parser = argparse.ArgumentParser()
    add_merge_command(parser.add_subparsers())
    args = parser.parse_args(["merge", str(run), "--out", str(tmp_path / "merged")])
    assert args.func(args) == 2


def test_check_fails_on_a_corrupted_merged_weight(tmp_path, base_dir, tokenizer):
    run = make_run(tmp_path, base_dir, tokenizer, "lora")
    out = tmp_path / "merged"
    merge_run(run, out, dtype="fp32", check_prompts=PROMPTS)
    verify_merge(out, base_dir, run, check_prompts=PROMPTS)  # passes as written

    tensors = load_file(out / "model.safetensors")
    key = "model.layers.1.self_attn.o_proj.weight"
    tensors[key] = tensors[key] + 0.05 * torch.randn_like(tensors[key])
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MergeCheckError, match="differ from the unmerged model"):
        verify_merge(out, base_dir, run, check_prompts=PROMPTS)


def test_merge_with_a_bad_fold_is_not_published(tmp_path, base_dir, tokenizer, monkeypatch):
    """A merge whose weights come out wrong raises, keeps <out>.partial for inspection and never creates <out>."""
    from tuneforge.export import merge as merge_module

    real = merge_module._fix_generation_config

    def corrupting(model, tok):
        real(model, tok)
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.mul_(1.5)

    monkeypatch.setattr(merge_module, "_fix_generation_config", corrupting)
    run = make_run(tmp_path, base_dir, tokenizer, "ia3")
    with pytest.raises(MergeCheckError):
        merge_run(run, tmp_path / "merged", dtype="bf16", check_prompts=PROMPTS)
    assert not (tmp_path / "merged").exists() and (tmp_path / "merged.partial").is_dir()


def test_cli_merge_succeeds(tmp_path, base_dir, tokenizer):
    run = make_run(tmp_path, base_dir, tokenizer, "lora")
    parser = argparse.ArgumentParser()
    add_merge_command(parser.add_subparsers())
    args = parser.parse_args(["merge", str(run), "--out", str(tmp_path / "m"), "--dtype", "bf16", "--prompt", "Hello"])
    assert args.func(args) == 0
    assert json.loads((tmp_path / "m" / "merge_report.json").read_text())["passed"] is True
