"""llama.cpp, the GGUF consumer users have, reads tuneforge's GGUF files as the model they came from.

llama.cpp (``llama-cpp-python``, compiled once per machine into its own cached venv: ``python
benchmarks/throughput/venvs.py llamacpp``; ``.ci/run`` builds it) loads each export of a LoRA run's merged
model (f16, q8_0, q4_0) and the base model's f16 file with the run's GGUF LoRA adapter, evaluates the same
token ids and continues them greedily. The reference is transformers on the merged model with its weights
rounded as the file stores them (what llama.cpp should compute, up to its own arithmetic: f16 activations,
8-bit activations in quantized dot products), and, for the tokenizer, the run's tokenizer. Without the venv
the tests skip, naming the command that builds it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "gguf"))
from compare import agreement, llamacpp_outputs, llamacpp_python, reference_outputs  # noqa: E402

pytestmark = pytest.mark.skipif(llamacpp_python() is None, reason="llama.cpp's venv is not built: "
                                "python benchmarks/throughput/venvs.py llamacpp")

TEXTS = ["Hi there, where is my parcel?", "<|im_start|>user\nList three prime numbers.<|im_end|>\n"
         "<|im_start|>assistant\n"]
GREEDY = 8
# llama.cpp's arithmetic against the same rounded weights in fp32: the largest logit difference allowed, as a
# share of the largest logit. Measured on this model: f16 0.12%, q8_0 1.4%, q4_0 1.3% (f16 and 8-bit
# activations in its dot products); a transposed or unpermuted tensor, a wrong norm epsilon or RoPE base gives
# differences of the order of the logits themselves.
TOLERANCE = {"f16": 0.01, "q8_0": 0.03, "q4_0": 0.05}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, tokenizer):
    """A LoRA run on a tiny model whose weights are scaled up (logits of a few units, not near-uniform), its
    fp32 merge, and the token ids of TEXTS."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from test_export_gguf import _lora_run

    tmp = tmp_path_factory.mktemp("llamacpp")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in base.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
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

    from tuneforge.export.gguf import _rounded_state_dict

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.load_state_dict(_rounded_state_dict(model_dir, quant), strict=False)
    return model


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0"])
def test_llama_cpp_computes_the_merged_model_from_each_export(quant, lora_run, tokenizer):
    from tuneforge.export.gguf import write_gguf

    tmp, _, sequences = lora_run
    gguf = tmp / f"merged-{quant}.gguf"
    write_gguf(tmp / "merged", gguf, quant)
    got = llamacpp_outputs(gguf, sequences, GREEDY, TEXTS)
    assert [got[f"tokens_{i}"].tolist() for i in range(len(TEXTS))] == sequences   # its tokenizer is the run's
    ref = reference_outputs(_rounded(tmp / "merged", quant), sequences, GREEDY)
    seen = agreement(ref, got, len(sequences))
    assert seen["max_abs_logit"] > 1.0, seen
    assert seen["max_abs_diff"] <= TOLERANCE[quant] * seen["max_abs_logit"], seen
    assert seen["decisive_flips"] == 0, seen       # an argmax may move only where the top two nearly tie
    # (f16 too: this tiny model's logits are small, and a CI run saw one tied argmax of 22 move: top1 0.95)
    assert seen["top1"] >= 0.9, seen


def test_llama_cpp_applies_the_gguf_lora_to_the_base_as_the_merge_does(lora_run):
    from tuneforge.export.gguf import write_gguf
    from tuneforge.export.gguf_lora import export_gguf_lora

    tmp, run, sequences = lora_run
    base = tmp / "base-f16.gguf"
    write_gguf(tmp / "base", base, "f16")
    adapter = export_gguf_lora(run, tmp / "adapter.gguf")
    got = llamacpp_outputs(base, sequences, GREEDY, lora=Path(adapter))
    without = llamacpp_outputs(base, sequences, GREEDY)
    merged = _rounded(tmp / "merged", "f16")      # base rounded to f16 plus the delta: close to this
    seen = agreement(reference_outputs(merged, sequences, GREEDY), got, len(sequences))
    assert seen["max_abs_diff"] <= TOLERANCE["f16"] * seen["max_abs_logit"], seen
    assert seen["decisive_flips"] == 0 and seen["greedy_same"] == seen["greedy_all"], seen
    moved = agreement(got, without, len(sequences))
    assert moved["max_abs_diff"] > 20 * seen["max_abs_diff"], (moved, seen)   # the adapter was applied


def test_llama_cpp_tells_an_export_without_the_qk_permutation_apart(lora_run, monkeypatch):
    """The comparison can fail: the same file written without llama.cpp's Q/K row permutation is far off."""
    from tuneforge.export import gguf as gguf_module

    tmp, _, sequences = lora_run
    monkeypatch.setattr(gguf_module, "permute_qk", lambda weight, n_head: weight)
    bad = tmp / "unpermuted-f16.gguf"
    gguf_module.write_gguf(tmp / "merged", bad, "f16")
    seen = agreement(reference_outputs(_rounded(tmp / "merged", "f16"), sequences, GREEDY),
                     llamacpp_outputs(bad, sequences, GREEDY), len(sequences))
    assert seen["max_abs_diff"] > TOLERANCE["f16"] * seen["max_abs_logit"], seen
