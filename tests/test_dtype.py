import torch

from tuneforge.models import dtype as dtype_mod


def test_bf16_request_on_cpu_without_native_bf16_trains_in_fp32(monkeypatch):
    monkeypatch.setattr(dtype_mod, "cpu_has_native_bf16", lambda: False)
    chosen, reason = dtype_mod.pick_dtype("bf16", torch.device("cpu"))
    assert chosen == torch.float32 and "no native bf16" in reason


def test_bf16_kept_on_cpu_with_native_bf16(monkeypatch):
    monkeypatch.setattr(dtype_mod, "cpu_has_native_bf16", lambda: True)
    assert dtype_mod.pick_dtype("bf16", torch.device("cpu"))[0] == torch.bfloat16


def test_explicit_fp32():
    assert dtype_mod.pick_dtype("fp32", torch.device("cpu"))[0] == torch.float32
