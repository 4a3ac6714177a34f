"""Every method that can be disabled computes exactly its base model inside ``method_disabled`` (the reference
model of preference training, the base for serving), through the packed training forward and generation."""

from __future__ import annotations

import pytest
import torch

from _method_helpers import HAS_BNB, METHOD_SECTIONS, perturbed, run_config
from tuneforge.methods import apply_method, get_method, method_disabled, method_forward, method_generate

SECTIONS = {k: v for k, v in METHOD_SECTIONS.items() if k != "full"}


def _perturbed(model):
    return perturbed(model, scale=0.1, max_numel=None)


@pytest.mark.parametrize("method", list(SECTIONS))
def test_disabled_method_is_the_base_model(method, tiny_model):
    if method == "qlora" and not HAS_BNB:
        pytest.skip("bitsandbytes not installed")
    config = run_config(method, SECTIONS[method])
    ids = torch.randint(0, 49152, (1, 9), generator=torch.Generator().manual_seed(4))
    pos = torch.cat([torch.arange(5), torch.arange(4)])[None]
    keep = torch.arange(9)
    if method == "qlora":      # the reference is the quantized base, without LoRA
        from tuneforge.methods.qlora.model import quantize_model_
        quantize_model_(tiny_model, config.qlora)
    with torch.no_grad():
        base = method_forward(tiny_model, "base", ids, pos, keep)
        base_gen = tiny_model.generate(input_ids=ids[:, :5], attention_mask=torch.ones(1, 5, dtype=torch.long),
                                       max_new_tokens=3, do_sample=False, output_scores=True,
                                       return_dict_in_generate=True).scores
    model = _perturbed(apply_method(tiny_model, config))
    with torch.no_grad():
        tuned = method_forward(model, config, ids, pos, keep)
        assert (tuned - base).abs().max() > 1e-3
        with method_disabled(model, config):
            torch.testing.assert_close(method_forward(model, config, ids, pos, keep), base, rtol=0, atol=1e-5)
            gen = method_generate(model, config, input_ids=ids[:, :5],
                                  attention_mask=torch.ones(1, 5, dtype=torch.long),
                                  max_new_tokens=3, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True).scores
        for a, b in zip(gen, base_gen, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        torch.testing.assert_close(method_forward(model, config, ids, pos, keep), tuned, rtol=0, atol=0)  # back on


def test_full_tuning_cannot_be_disabled_and_says_why(tiny_model):
    config = run_config("full", {})
    model = apply_method(tiny_model, config)
    assert get_method("full").disable is None
    with pytest.raises(ValueError, match="cannot be disabled.*separate copy of the base model"):
        with method_disabled(model, config):
            pass
