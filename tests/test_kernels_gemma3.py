"""The fused kernels on Gemma 3 (tiny random model, tests/_architectures.py): its ``(1 + w)`` RMSNorm (also the
query/key norms) and the chunked LM-head loss give the unfused path's loss and gradients; Gemma 2's soft-capped
logits keep the plain loss, told in one log line."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

from _architectures import build
from _method_helpers import run_config
from tuneforge.kernels import chunked_loss
from tuneforge.kernels.chunked_loss import use_chunked_loss
from tuneforge.kernels.rms_norm import fuse_rms_norm, gemma_rms_norm
from tuneforge.methods import apply_method
from tuneforge.methods.loss import packed_loss_sum


@pytest.mark.parametrize("train_weight", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma3_rms_norm_equals_transformers(dtype, train_weight):
    torch.manual_seed(0)
    ref = Gemma3RMSNorm(48, eps=1e-6).to(dtype)
    ref.weight.data.uniform_(-0.5, 0.5)         # Gemma's weights are offsets from 1
    ref.weight.requires_grad_(train_weight)
    ours = copy.deepcopy(ref)
    assert fuse_rms_norm(ours) == 1 and type(ours).__name__ == "FusedGemma3RMSNorm"
    x = (torch.randn(2, 9, 48) * 3).to(dtype)
    g = torch.randn(2, 9, 48).to(dtype)
    results = []
    for m in (ref, ours):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(g)
        results.append((y, xi.grad, m.weight.grad))
    (y_ref, gx_ref, gw_ref), (y, gx, gw) = results
    assert y.dtype == y_ref.dtype == dtype and gx.dtype == dtype
    # the forward is the same sequence of fp32 operations, cast once at the end: identical values
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0) if dtype == torch.float32 else \
        torch.testing.assert_close(y, y_ref, atol=1e-2, rtol=1e-2)
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(gx, gx_ref, **tol)
    if train_weight:
        torch.testing.assert_close(gw, gw_ref, **tol)
    else:
        assert gw is None


def test_gemma_rms_norm_gradient_is_the_analytic_one_in_float64():
    torch.manual_seed(1)
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(16, dtype=torch.float64) - 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: gemma_rms_norm(x, w, 1e-6), (x, w))


def _row(vocab: int):
    from tuneforge.data.packing import pack
    from tuneforge.data.rendering import TokenizedExample

    g = torch.Generator().manual_seed(0)
    return pack([TokenizedExample(torch.randint(0, vocab, (n,), generator=g).tolist(), [i % 3 != 0 for i in range(n)])
                 for n in (9, 5, 12)])


def _loss_and_grads(model, method: str, chunked: str, vocab: int):
    model.zero_grad()
    model.train()
    loss = packed_loss_sum(model, _row(vocab), method, chunked=chunked)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gemma3_fused_norms_and_chunked_loss_give_the_plain_loss_and_gradients(method, tokenizer):
    sections = {"lora": {"lora": {"r": 4, "dropout": 0.0}}, "full": {}}[method]
    ref = apply_method(build("gemma3", tokenizer), run_config(method, sections))
    torch.manual_seed(0)
    for n, p in ref.named_parameters():
        if "lora_B" in n:       # non-zero B, so every LoRA gradient passes through the norms
            p.data.normal_(0, 0.05)
    ours = copy.deepcopy(ref)
    config = ours.config if hasattr(ours, "config") else ours.base_model.config
    norms = 4 * config.num_hidden_layers + 2 * config.num_hidden_layers + 1    # 4 per layer, q/k norms, final
    assert fuse_rms_norm(ours) == norms
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert use_chunked_loss(ours, 1, "on"), "Gemma 3 without final-logit soft-capping takes the chunked loss"
    vocab = len(tokenizer)
    plain, plain_grads = _loss_and_grads(ref, method, "off", vocab)
    fused, fused_grads = _loss_and_grads(ours, method, "on", vocab)
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-6)
    assert plain_grads.keys() == fused_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0 or "lora_B" not in name
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_soft_capped_logits_keep_the_plain_loss_with_one_log_line(tokenizer, caplog, monkeypatch):
    model = build("gemma3", tokenizer)
    model.config.final_logit_softcapping = 30.0
    monkeypatch.setattr(chunked_loss, "_told", set())
    with caplog.at_level(logging.INFO, logger="tuneforge.kernels.chunked_loss"):
        assert not use_chunked_loss(model, 10 ** 9, "on")
        assert not use_chunked_loss(model, 10 ** 9, "on")
    lines = [r for r in caplog.records if "chunked loss: not applied" in r.getMessage()]
    assert len(lines) == 1 and "gemma3_text" in lines[0].getMessage()


def test_norms_of_an_unchecked_formula_are_named_in_one_log_line(caplog):
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm

    m = torch.nn.Sequential(Phi3RMSNorm(8), Phi3RMSNorm(8), Gemma2RMSNorm(8), Gemma3RMSNorm(8))
    with caplog.at_level(logging.INFO, logger="tuneforge.kernels.rms_norm"):
        assert fuse_rms_norm(m) == 2
    assert type(m[0]) is Phi3RMSNorm and type(m[2]).__name__ == "FusedGemma2RMSNorm"
    lines = [r.getMessage() for r in caplog.records if "left unfused" in r.getMessage()]
    assert len(lines) == 1 and "Phi3RMSNorm" in lines[0]
