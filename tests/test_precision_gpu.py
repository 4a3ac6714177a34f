"""The precision modes on a CUDA GPU (marked ``gpu``; skipped without one): each mode's first gradient against the
fp32 one for several methods, and fp16-mixed's scaler skipping an injected overflow and recovering, as
``tests/test_precision.py`` proves them on CPU."""

from __future__ import annotations

import pytest
import torch

from test_precision import _first_gradient, _NoMetrics, _overflow_at, _recipe

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CASES = {"lora": ("lora", {"lora": {"r": 4, "dropout": 0.0}}), "dora": ("lora", {"lora": {"r": 4, "dropout": 0.0,
                                                                                           "use_dora": True}}),
         "full": ("full", {}), "ia3": ("ia3", {}), "prompt": ("prompt", {"prompt": {"num_virtual_tokens": 5}}),
         "adapter": ("adapter", {"adapter": {"bottleneck": 8}})}


@pytest.fixture()
def data(tmp_path):
    from conftest import write_jsonl
    from test_precision import ROWS

    return write_jsonl(tmp_path / "train.jsonl", ROWS)


@pytest.mark.parametrize("mode", ["bf16-mixed", "bf16-true", "fp16-mixed"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_low_precision_step_equals_the_fp32_step_on_cuda(case, mode, tiny_model_dir, data, tmp_path):
    method, sections = CASES[case]
    extra = {"dtype": "bf16"} if (mode == "bf16-true" and method == "full") else {}
    ref = _recipe(tiny_model_dir, data, tmp_path / "fp32", method, sections, precision="fp32", device="cuda")
    low = _recipe(tiny_model_dir, data, tmp_path / mode, method, sections, precision=mode, device="cuda", **extra)
    assert low.device.type == "cuda" and {p.dtype for p in low.dist.params} == {low.plan.trained_dtype}
    if low.precision.scaler is not None:
        low.precision.scaler = torch.amp.GradScaler("cuda", init_scale=256.0)
    loss_ref, grad_ref = _first_gradient(ref)
    loss_low, grad_low = _first_gradient(low)
    if low.precision.scaler is not None:
        grad_low = grad_low / low.precision.scaler.get_scale()
    assert abs(loss_low - loss_ref) <= 1e-2 * abs(loss_ref), (loss_low, loss_ref)
    cosine = torch.nn.functional.cosine_similarity(grad_ref, grad_low, dim=0).item()
    assert cosine > 0.99, cosine


def test_the_fp16_scaler_skips_an_overflow_and_recovers_on_cuda(tiny_model_dir, data, tmp_path):
    recipe = _recipe(tiny_model_dir, data, tmp_path / "out", precision="fp16-mixed", device="cuda", max_steps=3)
    recipe.precision.scaler = torch.amp.GradScaler("cuda", init_scale=256.0)
    _overflow_at(recipe, {1})
    recipe.loop_start, recipe.metrics = 0.0, _NoMetrics()
    before = [p.detach().clone() for p in recipe.dist.params]
    row = recipe.train_step()
    assert row["scaler_skipped"] is True and row["loss_scale"] == 128.0
    assert all(torch.equal(a, p) for a, p in zip(before, recipe.dist.params, strict=True))
    row = recipe.train_step()
    assert "scaler_skipped" not in row and row["grad_norm"] > 0
