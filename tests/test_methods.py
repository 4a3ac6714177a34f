"""Every method behind ``method:``: analytic trainable counts, identity start, learning, save/load in a new process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from _method_helpers import CASE_IDS, CASES, HAS_BNB, expected_trainable, packed_row, run_config
from tuneforge.methods import apply_method, count_parameters, method_forward, save_trained

MODEL = "smollm2-135m-instruct"


def _skip_without_bnb(method: str) -> None:
    if method == "qlora" and not HAS_BNB:
        pytest.skip("bitsandbytes not installed")


def _logits(model, ids, pos):
    with torch.no_grad():
        return model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]


@pytest.mark.parametrize("case,method,sections", CASES, ids=CASE_IDS)
def test_trainable_parameters_match_formula(case, method, sections, tiny_model, tokenizer):
    _skip_without_bnb(method)
    config = run_config(method, sections)
    expected = expected_trainable(config, tiny_model)
    model = apply_method(tiny_model, config, tokenizer)
    trainable, _ = count_parameters(model)
    assert trainable == expected > 0


@pytest.mark.parametrize("case,method,sections", [c for c in CASES if c[1] in ("lora", "ia3", "adapter")],
                         ids=[c[0] for c in CASES if c[1] in ("lora", "ia3", "adapter")])
def test_identity_at_start(case, method, sections, tiny_model):
    """LoRA/DoRA (B = 0), IA3 (l = 1) and adapters (up = 0) compute exactly the base model before training."""
    ids, pos, _ = packed_row()
    base = _logits(tiny_model, ids, pos)
    model = apply_method(tiny_model, run_config(method, sections))
    model.eval()
    torch.testing.assert_close(_logits(model, ids, pos), base, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prompt_methods_disabled_are_the_base(method, tiny_model):
    ids = torch.randint(0, 49152, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = tiny_model(input_ids=ids).logits
    model = apply_method(tiny_model, run_config(method, {method: {"num_virtual_tokens": 4}}))
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            disabled = model(input_ids=ids).logits
    assert (adapted[:, -ids.shape[1]:] - base).abs().max() > 1e-3  # the virtual tokens do change the output
    torch.testing.assert_close(disabled, base, rtol=0, atol=0)


TRAIN_CASES = ("full_frozen", "lora", "dora", "qlora", "adapter", "prefix", "prompt", "ia3")
SAVE_CASES = TRAIN_CASES + ("full", "qlora8", "prefix_reparam", "adapter_attn")


@pytest.mark.parametrize("case,method,sections", [c for c in CASES if c[0] in TRAIN_CASES], ids=list(TRAIN_CASES))
def test_a_few_steps_reduce_the_loss(case, method, sections, tiny_model, tokenizer):
    _skip_without_bnb(method)
    torch.manual_seed(0)
    config = run_config(method, sections)
    model = apply_method(tiny_model, config, tokenizer)
    model.train()
    ids, pos, _ = packed_row()
    keep = torch.arange(ids.shape[1] - 1)
    targets = ids[0, 1:]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr={"full": 1e-3, "prefix": 5e-2, "prompt": 5e-2}.get(method, 1e-2))
    losses = []
    for _ in range(4):
        logits = method_forward(model, config, ids, pos, keep)
        loss = torch.nn.functional.cross_entropy(logits.float(), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-2, losses


LOAD_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from tuneforge.config import RunConfig
    from tuneforge.methods import apply_method, load_trained, method_forward
    from transformers import AutoModelForCausalLM
    spec = json.loads(sys.argv[1])
    ids, pos = torch.tensor(spec["ids"]), torch.tensor(spec["pos"])
    for case in spec["cases"]:
        config = RunConfig.model_validate(case["config"])
        base = AutoModelForCausalLM.from_pretrained(spec["base"], dtype=torch.float32)
        if config.method == "qlora":  # the base trained quantized: quantize it the same way
            from tuneforge.methods.qlora.model import quantize_model_
            quantize_model_(base, config.qlora, torch.float32)
        model = load_trained(base, case["dir"], config).eval()
        with torch.no_grad():
            logits = method_forward(model, config, ids, pos, torch.arange(ids.shape[1]))
        torch.save(logits, case["dir"] + "/logits.pt")
""")


def test_save_then_load_in_a_new_process_gives_identical_logits(tmp_path, tokenizer):
    from tuneforge.models.loading import build_tiny_model

    base_dir = tmp_path / "base"
    build_tiny_model(MODEL, seed=0).save_pretrained(base_dir)
    ids, pos, _ = packed_row()
    keep = torch.arange(ids.shape[1])
    cases, expected = [], {}
    for case, method, sections in CASES:
        if case not in SAVE_CASES or (method == "qlora" and not HAS_BNB):
            continue
        from transformers import AutoModelForCausalLM

        config = run_config(method, sections)
        model = apply_method(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), config, tokenizer)
        torch.manual_seed(1)
        with torch.no_grad():  # move away from the identity start, as training would
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.02 * torch.randn_like(p))
        model.eval()
        with torch.no_grad():
            expected[case] = method_forward(model, config, ids, pos, keep)
        out = tmp_path / case
        save_trained(model, out, config)
        cases.append({"dir": str(out), "config": config.model_dump(mode="json")})
    spec = {"base": str(base_dir), "ids": ids.tolist(), "pos": pos.tolist(), "cases": cases}
    proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, json.dumps(spec)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for c in cases:
        case = c["dir"].rsplit("/", 1)[-1]
        loaded = torch.load(c["dir"] + "/logits.pt")
        torch.testing.assert_close(loaded, expected[case], rtol=0, atol=1e-5, msg=f"{case}: reloaded logits differ")


def test_adapter_files_identify_the_method(tmp_path, tiny_model):
    from tuneforge.methods import saved_method

    config = run_config("adapter", {"adapter": {"bottleneck": 4}})
    save_trained(apply_method(tiny_model, config), tmp_path, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["adapter_type"] == "tuneforge.bottleneck_adapter"
    assert saved_method(tmp_path) == "adapter"


def test_prompt_init_text_without_tokenizer_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="prompt.init_text needs the tokenizer"):
        apply_method(tiny_model, run_config("prompt", {"prompt": {"init_text": "hi"}}))


def test_prompt_init_text_copies_token_embeddings(tiny_model, tokenizer):
    config = run_config("prompt", {"prompt": {"num_virtual_tokens": 6, "init_text": "Answer politely:"}})
    word = tiny_model.get_input_embeddings().weight.detach().clone()
    model = apply_method(tiny_model, config, tokenizer)
    ids = tokenizer("Answer politely:", add_special_tokens=False)["input_ids"]
    ids = (ids * 6)[:6]
    soft = model.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(soft, word[ids], rtol=0, atol=0)
