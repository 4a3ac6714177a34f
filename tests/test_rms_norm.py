"""tuneforge's one-function RMSNorm equals transformers' module: values, input and weight gradients, in fp32
and bf16, alone and inside a model."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from _method_helpers import run_config
from tuneforge.kernels.rms_norm import fuse_rms_norm, rms_norm


def _norm(dtype, train_weight):
    torch.manual_seed(0)
    m = LlamaRMSNorm(48, eps=1e-5).to(dtype)
    m.weight.data.uniform_(0.5, 1.5)
    m.weight.requires_grad_(train_weight)
    return m


@pytest.mark.parametrize("train_weight", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_transformers(dtype, train_weight):
    ref = _norm(dtype, train_weight)
    ours = copy.deepcopy(ref)
    assert fuse_rms_norm(ours) == 1 and type(ours).__name__ == "FusedLlamaRMSNorm"
    x = (torch.randn(2, 9, 48) * 3).to(dtype)
    g = torch.randn(2, 9, 48).to(dtype)
    results = []
    for m in (ref, ours):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(g)
        results.append((y, xi.grad, m.weight.grad))
    (y_ref, gx_ref, gw_ref), (y, gx, gw) = results
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    assert y.dtype == y_ref.dtype and gx.dtype == dtype
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(gx, gx_ref, **tol)
    if train_weight:
        torch.testing.assert_close(gw, gw_ref, **tol)
    else:
        assert gw is None


def test_rms_norm_gradient_is_the_analytic_one_in_float64():
    torch.manual_seed(1)
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(16, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-6), (x, w))


def test_fused_norms_leave_a_models_loss_gradients_and_state_dict_unchanged(tiny_model):
    from tuneforge.data.packing import pack
    from tuneforge.data.rendering import TokenizedExample
    from tuneforge.methods import apply_method
    from tuneforge.methods.loss import packed_loss_sum

    ref = apply_method(tiny_model, run_config("lora", {"lora": {"r": 4, "dropout": 0.0}}))
    torch.manual_seed(0)
    for n, p in ref.named_parameters():
        if "lora_B" in n:       # non-zero B, so every LoRA gradient (A's too) passes through the norms
            p.data.normal_(0, 0.05)
    ours = copy.deepcopy(ref)
    assert fuse_rms_norm(ours) == 2 * ours.config.num_hidden_layers + 1
    assert list(ours.state_dict()) == list(ref.state_dict())
    row = pack([TokenizedExample(list(range(5, 17)), [False] * 4 + [True] * 8),
                TokenizedExample(list(range(40, 49)), [True] * 9)])
    losses = []
    for m in (ref, ours):
        m.train()
        loss = packed_loss_sum(m, row, "lora")
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-6)
    grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    for n, p in ours.named_parameters():
        if p.requires_grad:
            assert p.grad.abs().sum() > 0
            torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-4)


def test_norms_of_another_formula_are_left_alone():
    class OtherRMSNorm(torch.nn.Module):       # a formula fuse_rms_norm does not know
        def __init__(self, dim: int):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(dim))
            self.variance_epsilon = self.eps = 1e-6

    m = torch.nn.Sequential(OtherRMSNorm(8), LlamaRMSNorm(8))
    assert fuse_rms_norm(m) == 1 and type(m[0]) is OtherRMSNorm
