"""The CUDA kernels against the reference paths, with the parity checks the CPU kernels have: flash-attn's varlen
kernel against per-example SDPA on a packed row (outputs and gradients), Liger's RMSNorm and SwiGLU/GeGLU against
transformers' modules, Liger's fused linear cross-entropy (a sum) against tuneforge's chunked loss, bitsandbytes'
CUDA 4-bit layers, and training steps with the chosen kernels against tuneforge's own, within bf16 tolerance.

Marked ``gpu`` and skipped without CUDA; flash-attn and liger-kernel are imported inside the tests that need them
(skipped when missing), so this file imports anywhere. Not yet run on a GPU.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from _architectures import build
from _method_helpers import HAS_BNB, METHOD_SECTIONS, packed_row, perturbed, run_config
from tuneforge.kernels import flash_varlen, select
from tuneforge.kernels.packed_attention import NAME as PACKED_SDPA
from tuneforge.kernels.packed_attention import packed_sdpa_attention, set_attention
from tuneforge.methods import apply_method, method_forward

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")
BF16 = {"atol": 2e-2, "rtol": 2e-2}


def _counting_varlen(monkeypatch) -> list[int]:
    """Count the calls that reach flash-attn's kernel (so a silent fallback to SDPA fails the test)."""
    pytest.importorskip("flash_attn")
    real = flash_varlen.varlen_function()
    flash_varlen.supports_softcap()       # cached from the real function's signature before it is wrapped
    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(flash_varlen, "varlen_function", lambda: counted)
    return calls


def _grads(tensors):
    return [t.grad.clone() for t in tensors]


def _varlen_against_sdpa(kv_heads: int, **kwargs) -> None:
    """A packed row of 3 examples (bf16, GQA with ``kv_heads``): the varlen path's outputs and q/k/v gradients
    equal per-example SDPA's (``kwargs``: the module's attention arguments, a window or a soft cap)."""
    torch.manual_seed(0)
    lengths, H, D = (37, 5, 90), 4, 64
    T = sum(lengths)
    q = torch.randn(1, H, T, D, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, kv_heads, T, D, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, kv_heads, T, D, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.cat([torch.arange(n) for n in lengths])[None].to(CUDA)
    cu = torch.tensor([0, 37, 42, 132], device=CUDA)
    module = torch.nn.Module().eval()
    g = torch.randn(1, T, H, D, device=CUDA, dtype=torch.bfloat16)
    results = []
    for fn in (packed_sdpa_attention, flash_varlen.packed_varlen_attention):
        for t in (q, k, v):
            t.grad = None
        out, _ = fn(module, q, k, v, None, scaling=D ** -0.5, position_ids=pos, cu_seq_lens_q=cu, **kwargs)
        out.backward(g)
        results.append((out.detach().float(), [x.float() for x in _grads((q, k, v))]))
    (ref, ref_grads), (got, grads) = results
    assert got.shape == (1, T, H, D)
    torch.testing.assert_close(got, ref, **BF16)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, **BF16)


@pytest.mark.parametrize("window,softcap", [(None, None), (5, None), (None, 30.0)])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_flash_varlen_equals_per_example_sdpa_outputs_and_gradients(monkeypatch, window, softcap, kv_heads):
    calls = _counting_varlen(monkeypatch)
    if softcap is not None and not flash_varlen.supports_softcap():
        pytest.skip("this flash-attn has no softcap (2.6+)")
    _varlen_against_sdpa(kv_heads, sliding_window=window, softcap=softcap)
    assert len(calls) == 1


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_torchs_varlen_attention_equals_per_example_sdpa(monkeypatch, window, kv_heads):
    """``attention: flash_varlen`` without flash-attn: torch's own varlen attention (torch >= 2.10) through
    :func:`flash_varlen.torch_varlen`, outputs and gradients against per-example SDPA."""
    if not flash_varlen.torch_varlen_available():
        pytest.skip("this torch has no varlen attention")
    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(1)
        return flash_varlen.torch_varlen(*args, **kwargs)

    monkeypatch.setattr(flash_varlen, "varlen_function", lambda: counted)
    monkeypatch.setattr(flash_varlen, "supports_softcap", lambda: False)
    _varlen_against_sdpa(kv_heads, sliding_window=window)
    assert len(calls) == 1


@pytest.mark.parametrize("family", ["llama3", "mistral", "gemma2", "gemma3"])
def test_a_model_on_flash_varlen_equals_packed_sdpa(monkeypatch, tokenizer, family):
    """Logits and LoRA gradients of a packed row, bf16, flash varlen vs packed SDPA (windows, soft caps, GQA)."""
    calls = _counting_varlen(monkeypatch)
    if family == "gemma2" and not flash_varlen.supports_softcap():
        pytest.skip("this flash-attn has no softcap (2.6+)")
    config = run_config("lora", METHOD_SECTIONS["lora"])
    model = perturbed(apply_method(build(family, tokenizer), config, tokenizer)).to(CUDA, torch.bfloat16).train()
    ids, pos, lengths = packed_row(lengths=(40, 3, 57), vocab=len(tokenizer))
    ids, pos, keep = ids.to(CUDA), pos.to(CUDA), torch.arange(ids.shape[1], device=CUDA)
    cu = torch.tensor([0, 40, 43, 100], device=CUDA)
    results = []
    for name in (PACKED_SDPA, flash_varlen.NAME):
        set_attention(model, name)
        model.zero_grad()
        logits = method_forward(model, config, ids, pos, keep, lengths=list(lengths), cu_seqlens=cu)
        logits.float().logsumexp(-1).sum().backward()
        results.append((logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()
                                                  if p.grad is not None}))
    (ref, ref_grads), (got, grads) = results
    assert len(calls) == model.config.num_hidden_layers
    torch.testing.assert_close(got, ref, **BF16)
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=5e-2, rtol=5e-2, msg=n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama3", "qwen3", "gemma3"])
def test_liger_norms_and_mlps_equal_transformers_modules(tokenizer, family, dtype):
    """The instance patched with Liger's RMSNorm and SwiGLU/GeGLU: logits and gradients of every parameter equal
    the unpatched model's (fp32 tight, bf16 within its rounding)."""
    pytest.importorskip("liger_kernel")
    from tuneforge.kernels import liger

    ref = perturbed(build(family, tokenizer), max_numel=None).to(CUDA, dtype).train()
    ours = copy.deepcopy(ref)
    assert liger.patch_rms_norms(ours) > 0 and liger.patch_mlps(ours) == ours.config.num_hidden_layers
    ids, pos, _ = packed_row(lengths=(30, 20), vocab=len(tokenizer))
    ids, pos = ids.to(CUDA), pos.to(CUDA)
    results = []
    for model in (ref, ours):
        set_attention(model, PACKED_SDPA)
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        logits.float().logsumexp(-1).sum().backward()
        results.append((logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}))
    (want, want_grads), (got, grads) = results
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else BF16
    torch.testing.assert_close(got, want, **tol)
    for n in grads:
        torch.testing.assert_close(grads[n], want_grads[n], **(tol if dtype == torch.float32 else
                                                               {"atol": 5e-2, "rtol": 5e-2}), msg=n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_trains", [False, True])
def test_liger_fused_linear_cross_entropy_sum_equals_the_chunked_loss(dtype, head_trains):
    pytest.importorskip("liger_kernel")
    from tuneforge.kernels.chunked_loss import chunked_cross_entropy_sum
    from tuneforge.kernels.liger import liger_cross_entropy_sum

    torch.manual_seed(0)
    head = torch.nn.Linear(64, 1000, bias=False).to(CUDA, dtype).requires_grad_(head_trains)
    hidden = torch.randn(300, 64, device=CUDA, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 1000, (300,), device=CUDA)
    results = []
    for fn in (lambda: chunked_cross_entropy_sum(hidden, head, targets, chunk=64),
               lambda: liger_cross_entropy_sum(hidden, head, targets)):
        hidden.grad, head.weight.grad = None, None
        loss = fn()
        (loss * 0.25).backward()         # an upstream scale (the step's normaliser), as the trainer's
        results.append((loss.detach(), hidden.grad.float(), None if not head_trains else head.weight.grad.float()))
    (ref, ref_h, ref_w), (got, got_h, got_w) = results
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got, ref, atol=1e-2 if dtype == torch.bfloat16 else 1e-3, rtol=1e-4)
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else BF16
    torch.testing.assert_close(got_h, ref_h, **tol)
    if head_trains:
        torch.testing.assert_close(got_w, ref_w, **tol)


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
def test_qlora_computes_with_bitsandbytes_cuda_kernels(tokenizer, caplog):
    from tuneforge.methods.loss import packed_loss_sum

    config = run_config("qlora", METHOD_SECTIONS["qlora"])
    base = build("llama3", tokenizer).to(CUDA, torch.bfloat16)
    model = apply_method(base, config, tokenizer)
    with caplog.at_level(logging.INFO, logger="tuneforge.kernels.select"):
        select.apply_kernels(model, config)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("bitsandbytes"))
    assert "layers on cuda (its CUDA kernels; CUDA build)" in line, line
    loss = packed_loss_sum(model, _row().to(CUDA), "qlora")
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def _row():
    from tuneforge.data.packing import pack
    from tuneforge.data.rendering import TokenizedExample

    g = torch.Generator().manual_seed(0)
    return pack([TokenizedExample(torch.randint(0, 49152, (n,), generator=g).tolist(), [i % 3 != 0 for i in range(n)])
                 for n in (90, 50, 120)])


@pytest.mark.parametrize("method", ["lora", "full"])
def test_training_steps_with_the_gpu_kernels_equal_tuneforges_kernels(tokenizer, method, caplog):
    """Three optimizer steps of the same bf16 model: attention and kernels as chosen on this GPU (flash varlen and
    Liger when installed) against packed SDPA and tuneforge's kernels; every step's loss within bf16 tolerance."""
    from tuneforge.methods.loss import packed_loss_sum
    from tuneforge.training.trainer import make_optimizer

    sections = {**METHOD_SECTIONS[method], "learning_rate": 1e-3}
    auto, reference = run_config(method, sections), run_config(method, {**sections, "kernels": "tuneforge"})
    ref = apply_method(build("llama3", tokenizer), reference, tokenizer).to(CUDA, torch.bfloat16)
    ours = copy.deepcopy(ref)
    select.apply_kernels(ref, reference)
    set_attention(ref, PACKED_SDPA)
    with caplog.at_level(logging.INFO, logger="tuneforge.kernels.select"):
        select.apply_kernels(ours, auto)
    print(caplog.text)          # which kernels this machine ran (pytest -s / -rA shows it)
    row = _row().to(CUDA)
    losses = []
    for model, config in ((ref, reference), (ours, auto)):
        model.train()
        opt = make_optimizer(config, [p for p in model.parameters() if p.requires_grad])
        steps = []
        for _ in range(3):
            opt.zero_grad()
            loss = packed_loss_sum(model, row, method)
            (loss / row.num_loss_tokens).backward()
            opt.step()
            steps.append(loss.item() / row.num_loss_tokens)
        losses.append(steps)
    want, got = losses
    assert got[-1] < got[0]            # it trains
    assert got == pytest.approx(want, rel=2e-2, abs=2e-2)
