"""The fused LoRA dropout: the drop rate, the same outputs and gradients as dropout-then-linear with the
same mask, and the same training as peft's LoRA with its dropout modules drawing those masks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from _method_helpers import run_config
from tuneforge.methods import apply_method
from tuneforge.methods.lora_dropout import DropoutLinear, fuse_lora_dropout, keep_mask


def test_keep_mask_drops_each_element_with_probability_p():
    torch.manual_seed(0)
    p, n = 0.05, 4_000_000
    dropped = (~keep_mask((n,), p)).sum().item() / n
    expected = round(p * 65536) / 65536
    assert abs(dropped - expected) < 5 * math.sqrt(expected * (1 - expected) / n)
    assert keep_mask((7, 3), 0.0).all() and keep_mask((5, 4), 0.5).shape == (5, 4)
    a = keep_mask((1000,), 0.5)
    assert 0.4 < a.float().mean() < 0.6 and not torch.equal(a, keep_mask((1000,), 0.5))   # independent draws


def test_dropout_linear_matches_dropout_then_linear_with_the_same_mask():
    torch.manual_seed(1)
    x = torch.randn(3, 11, 16, requires_grad=True)
    layer = DropoutLinear(16, 4, bias=False)
    layer.p = 0.3
    torch.manual_seed(7)
    y = layer(x)
    (y * torch.arange(4.0)).sum().backward()
    ours = (y.detach(), x.grad.clone(), layer.weight.grad.clone())

    x.grad, layer.weight.grad = None, None
    torch.manual_seed(7)
    keep = keep_mask(x.shape, 0.3)
    assert 0 < (~keep).sum() < keep.numel()
    ref = F.linear(x * keep / 0.7, layer.weight)
    (ref * torch.arange(4.0)).sum().backward()
    for a, b in zip(ours, (ref.detach(), x.grad, layer.weight.grad)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    layer.eval()
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight))


class _ReferenceDropout(torch.nn.Module):
    """peft's dropout slot, drawing the masks the fused layer draws (same generator, same order)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        return x * keep_mask(x.shape, self.p) / (1 - self.p) if self.training else x


def test_fused_lora_trains_like_peft_lora_with_the_same_masks(tiny_model):
    import copy

    config = run_config("lora", {"lora": {"r": 4, "dropout": 0.25, "fused_dropout": False}})
    reference = apply_method(tiny_model, config)
    fused = copy.deepcopy(reference)
    assert fuse_lora_dropout(fused) == 7 * tiny_model.config.num_hidden_layers
    for module in reference.modules():
        if isinstance(getattr(module, "lora_dropout", None), torch.nn.ModuleDict):
            module.lora_dropout["default"] = _ReferenceDropout(0.25)
    assert fused.state_dict().keys() == reference.state_dict().keys()
    with torch.no_grad():                     # B = 0 at init would hide A's gradient
        for model in (reference, fused):
            torch.manual_seed(3)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    ids = torch.randint(0, 1000, (2, 9))
    results = []
    for model in (reference, fused):
        model.train()
        torch.manual_seed(11)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert ref_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    reference.eval(), fused.eval()
    torch.testing.assert_close(fused(input_ids=ids).logits, reference(input_ids=ids).logits)


@pytest.mark.parametrize("sections", [{"lora": {"r": 4, "dropout": 0.0}}, {"lora": {"r": 4, "use_dora": True}}])
def test_nothing_is_fused_without_dropout_or_with_dora(tiny_model, sections):
    model = apply_method(tiny_model, run_config("lora", sections))
    assert not any(isinstance(m, DropoutLinear) for m in model.modules())


def test_lora_default_fuses_dropout(tiny_model):
    model = apply_method(tiny_model, run_config("lora", {"lora": {"r": 4}}))
    n = sum(isinstance(m, DropoutLinear) for m in model.modules())
    assert n == 7 * tiny_model.config.num_hidden_layers
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
