"""Which kernels a run gets (kernels/select.py), with flash-attn, liger-kernel and CUDA made present or absent:
the choice and its log line, the refusals (one line naming the key, exit 2, before any weights load), the CPU path
unchanged, and the wiring of flash-attn's varlen call and Liger's modules and loss, run on CPU through stand-ins
that compute what the libraries' documented functions compute (tests/test_kernels_gpu.py runs the real ones)."""

from __future__ import annotations

import copy
import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from _architectures import build
from _method_helpers import HAS_BNB, METHOD_SECTIONS, packed_row, perturbed, run_config
from tuneforge.errors import ConfigError
from tuneforge.kernels import flash_varlen, select
from tuneforge.kernels.packed_attention import NAME as PACKED_SDPA
from tuneforge.kernels.packed_attention import set_attention, uses_packed_attention
from tuneforge.kernels.rms_norm import fuse_rms_norm
from tuneforge.methods import apply_method, method_forward
from tuneforge.methods.loss import packed_example_loss_sums, packed_loss_sum

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
FAKE_FLASH = types.SimpleNamespace(__version__="2.7.4", flash_attn_varlen_func=lambda *a, **k: None)
FAKE_LIGER = types.SimpleNamespace(__version__="0.8.5")


def _present(monkeypatch, flash=None, liger=None, torch_varlen=False):
    monkeypatch.setattr(select, "flash_attn_status", lambda: (flash, "") if flash else (None, "not installed"))
    monkeypatch.setattr(select, "liger_status", lambda: (liger, "") if liger else (None, "not installed"))
    monkeypatch.setattr(flash_varlen, "torch_varlen_available", lambda: torch_varlen)


# ------------------------------------------------------------------------------------------ the choice


@pytest.mark.parametrize("device,flash,want,line", [
    (CUDA, FAKE_FLASH, flash_varlen.NAME, "packed attention: flash-attn 2.7.4 varlen on cuda"),
    (CUDA, None, PACKED_SDPA, "packed attention: SDPA per example (flash-attn not installed)"),
    (CPU, FAKE_FLASH, PACKED_SDPA, "packed attention: SDPA per example (flash-attn runs on CUDA only, this run is "
                                   "on cpu)"),
])
def test_packed_attention_is_flash_varlen_only_on_cuda_with_flash_attn(monkeypatch, device, flash, want, line):
    _present(monkeypatch, flash=flash)
    assert select.choose_attention("packed_sdpa", device) == (want, line)
    assert select.choose_attention("sdpa", device)[0] == "sdpa"      # transformers' own, whatever is installed
    assert select.choose_attention("eager", device)[0] == "eager"


@pytest.mark.parametrize("device,liger,key,want,reason", [
    (CUDA, FAKE_LIGER, "auto", "liger", "Liger 0.8.5 on cuda"),
    (CUDA, FAKE_LIGER, "liger", "liger", "Liger 0.8.5 on cuda"),
    (CUDA, FAKE_LIGER, "tuneforge", "tuneforge", "(kernels: tuneforge)"),
    (CUDA, None, "auto", "tuneforge", "(liger-kernel not installed)"),
    (CPU, FAKE_LIGER, "auto", "tuneforge", "(Liger runs on CUDA only, this run is on cpu)"),
])
def test_kernels_auto_is_liger_only_on_cuda_with_liger_kernel(monkeypatch, device, liger, key, want, reason):
    _present(monkeypatch, liger=liger)
    chosen, line = select.choose_kernels(key, device)
    assert chosen == want and line.startswith("kernels: ") and reason in line


@pytest.mark.parametrize("sections,device,flash,liger,words", [
    ({"attention": "flash_varlen"}, CPU, FAKE_FLASH, None, ["attention: flash_varlen", "CUDA only", "packed_sdpa"]),
    ({"attention": "flash_varlen"}, CUDA, None, None, ["attention: flash_varlen", "not installed", "tuneforge[flash]",
                                                        "packed_sdpa"]),
    ({"kernels": "liger"}, CPU, None, FAKE_LIGER, ["kernels: liger", "CUDA only", "kernels: auto"]),
    ({"kernels": "liger"}, CUDA, None, None, ["kernels: liger", "not installed", "tuneforge[gpu]", "kernels: auto"]),
])
def test_what_this_machine_cannot_run_is_refused_in_one_line(monkeypatch, sections, device, flash, liger, words):
    _present(monkeypatch, flash=flash, liger=liger)
    with pytest.raises(ConfigError) as e:
        select.check_kernels(run_config("lora", sections), device)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("attention", ["flash_varlen", "packed_sdpa"])
def test_without_flash_attn_cuda_takes_torchs_varlen_attention(monkeypatch, attention):
    """On CUDA without flash-attn, ``attention: flash_varlen`` and the default ``packed_sdpa`` alike take torch's own
    varlen attention (torch >= 2.10; 1.8x SDPA per example on an H200), named in the log line; without it the
    default falls back to SDPA per example, and on a CPU nothing changes."""
    _present(monkeypatch, torch_varlen=True)
    select.check_kernels(run_config("lora", {"attention": attention}), CUDA)
    name, line = select.choose_attention(attention, CUDA)
    assert name == flash_varlen.NAME and line.startswith(f"packed attention: torch {torch.__version__}'s varlen "
                                                         "attention (flash-attn not installed)"), line
    if attention == "packed_sdpa":
        assert select.choose_attention(attention, CPU)[0] == PACKED_SDPA
        _present(monkeypatch, torch_varlen=False)
        name, line = select.choose_attention(attention, CUDA)
        assert name == PACKED_SDPA and "SDPA per example (flash-attn not installed)" in line, line


def test_torch_varlen_speaks_flash_attns_convention(monkeypatch):
    """:func:`flash_varlen.torch_varlen` maps flash-attn's arguments onto torch's ``varlen_attn``: causal as window
    ``(-1, 0)``, a sliding window as ``(left, 0)``, grouped-query heads (``enable_gqa`` where torch has it, 2.12 on;
    torch 2.10-2.11's has none, so each key/value head is repeated for its group), the scale; dropout refused."""
    import torch.nn.attention.varlen as tv

    seen = {}

    def fake(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        seen.update(scale=scale, window_size=window_size, enable_gqa=enable_gqa, shapes=(q.shape, k.shape, v.shape),
                    max=(max_q, max_k), k=k)
        return q

    def fake_2_11(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        return fake(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size)

    monkeypatch.setattr(tv, "varlen_attn", fake)
    q, k = torch.zeros(10, 4, 8), torch.arange(10 * 2 * 8.0).reshape(10, 2, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    flash_varlen.torch_varlen(q, k, k, cu, cu, 6, 6, softmax_scale=0.5, causal=True)
    assert {key: v for key, v in seen.items() if key != "k"} == {
        "scale": 0.5, "window_size": (-1, 0), "enable_gqa": True, "shapes": (q.shape, k.shape, k.shape),
        "max": (6, 6)}
    flash_varlen.torch_varlen(q, q, q, cu, cu, 6, 6, causal=True, window_size=(3, 0))
    assert seen["window_size"] == (3, 0) and seen["enable_gqa"] is False
    monkeypatch.setattr(tv, "varlen_attn", fake_2_11)
    flash_varlen.torch_varlen(q, k, k, cu, cu, 6, 6, softmax_scale=0.5, causal=True)
    assert seen["shapes"] == (q.shape, q.shape, q.shape) and seen["enable_gqa"] is False
    # query heads 0, 1 read key/value head 0; heads 2, 3 head 1 (grouped-query attention's order)
    assert torch.equal(seen["k"], k[:, [0, 0, 1, 1]])
    with pytest.raises(ValueError, match="without dropout"):
        flash_varlen.torch_varlen(q, q, q, cu, cu, 6, 6, dropout_p=0.1)


def test_what_is_installed_on_cuda_is_accepted(monkeypatch):
    _present(monkeypatch, flash=FAKE_FLASH, liger=FAKE_LIGER)
    select.check_kernels(run_config("lora", {"attention": "flash_varlen", "kernels": "liger"}), CUDA)
    select.check_kernels(run_config("lora", {}), CPU)          # the defaults run anywhere


def test_the_refusal_exits_2_before_any_weights_load(monkeypatch, tmp_path, tiny_model_dir, capsys):
    from tuneforge.cli import main
    from tuneforge.training import trainer

    def must_not_load(*args, **kwargs):
        raise AssertionError("weights loaded before the kernels were checked")

    monkeypatch.setattr(trainer, "load_base_model", must_not_load)
    for key in ("attention=flash_varlen", "kernels=liger"):
        code = main(["train", "examples/quickstart.yaml", "--set", f"model={tiny_model_dir}", "--set", "device=cpu",
                     "--set", key, "--set", f"output_dir={tmp_path / key.split('=')[0]}"])
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and key.replace("=", ": ") in errors[0], errors


# ------------------------------------------------------------------------------------------ CPU: as before


def test_on_cpu_auto_applies_exactly_what_it_did_before(monkeypatch, tokenizer, caplog):
    """kernels: auto on CPU, even with both libraries importable: tuneforge's fused RMSNorm and packed SDPA, nothing
    of Liger's; the loss and every gradient bit for bit those of the previous sequence (set_attention +
    fuse_rms_norm)."""
    _present(monkeypatch, flash=FAKE_FLASH, liger=FAKE_LIGER)
    config = run_config("lora", METHOD_SECTIONS["lora"])
    ours = perturbed(apply_method(build("llama3", tokenizer), config, tokenizer))
    before = copy.deepcopy(ours)
    set_attention(before, PACKED_SDPA)
    fuse_rms_norm(before)
    with caplog.at_level(logging.INFO, logger="tuneforge.kernels.select"):
        assert select.apply_kernels(ours, config) == "tuneforge"
    assert "packed attention: SDPA per example (flash-attn runs on CUDA only, this run is on cpu)" in caplog.text
    assert "kernels: tuneforge's fused RMSNorm and chunked loss (Liger runs on CUDA only" in caplog.text
    norms = {type(m).__name__ for m in ours.modules() if type(m).__name__.endswith("RMSNorm")}
    assert norms == {"FusedLlamaRMSNorm"}
    assert not any("forward" in vars(m) for m in ours.modules())              # no instance-bound (Liger) forward
    assert not hasattr(ours.base_model.model.lm_head, "tuneforge_fused_loss")
    results = []
    for model in (before, ours):
        model.train()
        loss = packed_loss_sum(model, _row(), "lora")
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (ref, ref_grads), (got, grads) = results
    assert torch.equal(got, ref) and ref_grads.keys() == grads.keys() and grads
    assert all(torch.equal(grads[n], ref_grads[n]) for n in grads)


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
def test_qlora_logs_which_bitsandbytes_backend_computes(tokenizer, caplog):
    config = run_config("qlora", METHOD_SECTIONS["qlora"])
    model = apply_method(build("llama3", tokenizer), config, tokenizer)
    with caplog.at_level(logging.INFO, logger="tuneforge.kernels.select"):
        select.apply_kernels(model, config)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("bitsandbytes")]
    assert len(lines) == 1 and "4-bit layers on cpu (its CPU backend)" in lines[0], lines
    assert select.log_bitsandbytes_backend(build("llama3", tokenizer)) is None      # no quantized layer: no line


# ------------------------------------------------------------------------------------------ flash-attn varlen


def reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                     softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, **kwargs):
    """flash-attn 2's documented ``flash_attn_varlen_func`` in plain torch: ``q [total, H, D]``, ``k/v [total, H_kv,
    D]``, sequences at ``cu_seqlens``; causal; query ``i`` sees keys ``i - window_size[0] <= j``; soft cap
    ``softcap * tanh(s / softcap)``; H_kv heads shared by groups of query heads."""
    assert causal and dropout_p == 0.0 and torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q.dtype == torch.int32
    assert max_seqlen_q == max_seqlen_k == int(cu_seqlens_q.diff().max())
    calls.append({"window_size": window_size, "softcap": softcap, "heads": (q.shape[1], k.shape[1])})
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    outs = []
    bounds = cu_seqlens_q.tolist()
    for s, e in zip(bounds, bounds[1:], strict=False):
        qs, ks, vs = q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1)
        ks = ks.repeat_interleave(qs.shape[0] // ks.shape[0], 0)
        vs = vs.repeat_interleave(qs.shape[0] // vs.shape[0], 0)
        scores = qs @ ks.transpose(-1, -2) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        i = torch.arange(e - s)
        allowed = i[None, :] <= i[:, None]
        if window_size[0] >= 0:
            allowed &= i[None, :] >= i[:, None] - window_size[0]
        outs.append((scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(outs)


calls: list[dict] = []


@pytest.mark.parametrize("family", ["llama3", "mistral", "gemma2", "gemma3"])
@pytest.mark.parametrize("boundaries", ["cu_seqlens", "position_ids"])
def test_the_varlen_call_computes_what_packed_sdpa_computes(monkeypatch, tokenizer, family, boundaries):
    """The packed row through the varlen path (flash-attn's function replaced by its plain-torch statement) equals
    packed SDPA: layouts, boundaries, GQA, the sliding window (``window - 1`` to the left) and the soft cap."""
    monkeypatch.setattr(flash_varlen, "varlen_function", lambda: reference_varlen)
    monkeypatch.setattr(flash_varlen, "supports_softcap", lambda: True)
    monkeypatch.setattr(flash_varlen, "_fallback_reason", lambda query, softcap: None)
    calls.clear()
    model = perturbed(build(family, tokenizer))
    ids, pos, lengths = packed_row(lengths=(7, 3, 9), vocab=len(tokenizer))
    cu = torch.tensor([0, 7, 10, 19], dtype=torch.int64) if boundaries == "cu_seqlens" else None
    keep = torch.arange(ids.shape[1])
    with torch.no_grad():
        set_attention(model, PACKED_SDPA)
        reference = method_forward(model, "base", ids, pos, keep, lengths=list(lengths), cu_seqlens=cu)
        set_attention(model, flash_varlen.NAME)
        assert uses_packed_attention(model)                # so the trainer hands it the batch's cu_seqlens
        got = method_forward(model, "base", ids, pos, keep, lengths=list(lengths), cu_seqlens=cu)
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-5)
    assert len(calls) == model.config.num_hidden_layers
    window = getattr(model.config, "sliding_window", None)
    if window:
        assert {"window_size": (window - 1, 0)} in [{"window_size": c["window_size"]} for c in calls]
    if getattr(model.config, "attn_logit_softcapping", None):
        assert all(c["softcap"] == model.config.attn_logit_softcapping for c in calls)


def test_without_cuda_the_varlen_attention_falls_back_to_packed_sdpa_and_says_so(tokenizer, caplog):
    model = perturbed(build("mistral", tokenizer))
    ids, pos, lengths = packed_row(lengths=(7, 3, 9), vocab=len(tokenizer))
    keep = torch.arange(ids.shape[1])
    with torch.no_grad():
        set_attention(model, PACKED_SDPA)
        reference = method_forward(model, "base", ids, pos, keep)
        set_attention(model, flash_varlen.NAME)
        flash_varlen._told.clear()
        with caplog.at_level(logging.INFO, logger="tuneforge.kernels.flash_varlen"):
            got = method_forward(model, "base", ids, pos, keep)
    assert torch.equal(got, reference)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["packed attention: per-example SDPA for this call (tensors on cpu)"]   # once, not per layer


# ------------------------------------------------------------------------------------------ Liger's wiring


def _fake_liger(monkeypatch, loss_calls):
    """liger_kernel modules whose functions compute, in torch, what Liger's documented ones compute."""
    from transformers.activations import ACT2FN

    def rms_forward(self, x):
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        if self.casting_mode == "gemma":
            return (normed * (self.offset + self.weight.float())).to(x.dtype)
        return (self.offset + self.weight) * normed.to(x.dtype)

    def patch_rms_norm_module(module, offset=0.0, eps=1e-6, casting_mode="llama", in_place=True, row_mode=None):
        module.offset, module.casting_mode, module.in_place = offset, casting_mode, in_place
        module.variance_epsilon = getattr(module, "variance_epsilon", None) or getattr(module, "eps", None) or eps
        module.forward = types.MethodType(rms_forward, module)

    class SwiGLU(torch.nn.Module):
        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class GeGLU(torch.nn.Module):
        def forward(self, x):
            return self.down_proj(ACT2FN["gelu_pytorch_tanh"](self.gate_proj(x)) * self.up_proj(x))

    class FusedLinearCrossEntropyLoss(torch.nn.Module):
        def __init__(self, ignore_index=-100, reduction="mean", accum_dtype=None):
            super().__init__()
            self.reduction, self.accum_dtype = reduction, accum_dtype

        def forward(self, lin_weight, _input, target, bias=None):
            loss_calls.append((self.reduction, self.accum_dtype))
            return F.cross_entropy(F.linear(_input, lin_weight, bias).float(), target, reduction=self.reduction)

    mods = {"liger_kernel": types.ModuleType("liger_kernel"),
            "liger_kernel.transformers": types.ModuleType("liger_kernel.transformers"),
            "liger_kernel.transformers.monkey_patch": types.ModuleType("liger_kernel.transformers.monkey_patch"),
            "liger_kernel.transformers.swiglu": types.ModuleType("liger_kernel.transformers.swiglu"),
            "liger_kernel.transformers.geglu": types.ModuleType("liger_kernel.transformers.geglu")}
    mods["liger_kernel.transformers"].LigerFusedLinearCrossEntropyLoss = FusedLinearCrossEntropyLoss
    mods["liger_kernel.transformers.monkey_patch"]._patch_rms_norm_module = patch_rms_norm_module
    mods["liger_kernel.transformers.swiglu"].LigerSwiGLUMLP = SwiGLU
    mods["liger_kernel.transformers.geglu"].LigerGEGLUMLP = GeGLU
    for name, module in mods.items():
        monkeypatch.setitem(sys.modules, name, module)
    from tuneforge.kernels import liger

    liger._loss_module.cache_clear()
    monkeypatch.setattr(select, "liger_status", lambda: (FAKE_LIGER, ""))


def _row():
    from tuneforge.data.packing import pack
    from tuneforge.data.rendering import TokenizedExample

    g = torch.Generator().manual_seed(0)
    return pack([TokenizedExample(torch.randint(0, 49152, (n,), generator=g).tolist(), [i % 3 != 0 for i in range(n)])
                 for n in (9, 5, 12)])


@pytest.mark.parametrize("family,method", [("llama3", "lora"), ("qwen3", "full"), ("gemma3", "lora")])
def test_liger_wiring_patches_norms_mlps_and_the_loss_seam_with_sums(monkeypatch, tokenizer, family, method, caplog):
    """kernels: liger on "cuda" (the model stays on CPU; Liger's functions replaced by their torch statements):
    every known RMSNorm and gated MLP of the instance gets Liger's forward, the summed loss goes through the fused
    linear cross-entropy with reduction="sum" (fp32 accumulation), per-example sums keep tuneforge's loss, and loss
    and gradients equal tuneforge's kernels'."""
    loss_calls: list = []
    _fake_liger(monkeypatch, loss_calls)
    config = run_config(method, {**METHOD_SECTIONS[method], "kernels": "liger"})
    ref = perturbed(apply_method(build(family, tokenizer), config, tokenizer), max_numel=None)
    ours = copy.deepcopy(ref)
    select.apply_kernels(ref, run_config(method, {**METHOD_SECTIONS[method], "kernels": "tuneforge"}))
    with caplog.at_level(logging.INFO, logger="tuneforge.kernels.select"):
        assert select.apply_kernels(ours, config, device=CUDA) == "liger"
    norms = [m for m in ours.modules() if type(m).__name__.endswith("RMSNorm")]
    mlps = [m for m in ours.modules() if type(m).__name__.endswith("MLP")]
    assert norms and all(getattr(m.forward, "__func__", None).__name__ == "rms_forward" for m in norms)
    liger_mlp = ("GeGLU" if family == "gemma3" else "SwiGLU") + ".forward"
    assert mlps and all(m.forward.__func__.__qualname__.endswith(liger_mlp) for m in mlps)
    assert f"{len(norms)} RMSNorms, {len(mlps)} MLPs, LM-head loss fused" in caplog.text
    row = _row()
    for fn in (packed_loss_sum, packed_example_loss_sums):
        results = []
        for model in (ref, ours):
            model.train()
            model.zero_grad()
            loss = fn(model, row, method)
            loss.sum().backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                            if p.grad is not None}))
        (want, want_grads), (got, grads) = results
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
        assert grads.keys() == want_grads.keys() and grads
        for name in grads:
            torch.testing.assert_close(grads[name], want_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert loss_calls == [("sum", torch.float32)]         # the summed loss only; per-example sums stay tuneforge's


def test_chunked_loss_off_keeps_the_plain_loss_under_liger(monkeypatch, tokenizer):
    loss_calls: list = []
    _fake_liger(monkeypatch, loss_calls)
    config = run_config("lora", {**METHOD_SECTIONS["lora"], "kernels": "liger", "chunked_loss": "off"})
    model = apply_method(build("llama3", tokenizer), config, tokenizer)
    select.apply_kernels(model, config, device=CUDA)
    assert not hasattr(model.base_model.model.lm_head, "tuneforge_fused_loss")
    packed_loss_sum(model, _row(), "lora", chunked="off")
    assert loss_calls == []
