"""tuneforge's fused LoRA training forward: the drop rate, the fused A against dropout-then-linear with the
same mask, and the same training as peft's LoRA whose dropout modules draw those masks (shared by q/k/v
and by gate/up, or one per projection), with and without activation checkpointing."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from _method_helpers import HAS_BNB, run_config
from tuneforge.methods import apply_method
from tuneforge.methods.lora.layer import FusedLoraForward, _LoraAFunction, drop_mask, fuse_lora_forward


def test_drop_mask_drops_each_element_with_probability_p():
    torch.manual_seed(0)
    p, n = 0.05, 4_000_000
    dropped = drop_mask((n,), p).sum().item() / n
    expected = round(p * 65536) / 65536
    assert abs(dropped - expected) < 5 * math.sqrt(expected * (1 - expected) / n)
    assert not drop_mask((7, 3), 0.0).any() and drop_mask((5, 4), 0.5).shape == (5, 4)
    a = drop_mask((1000,), 0.5)
    assert 0.4 < a.float().mean() < 0.6 and not torch.equal(a, drop_mask((1000,), 0.5))   # independent draws


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fused_a_matches_dropout_then_linear_with_the_same_mask(p):
    torch.manual_seed(1)
    x = torch.randn(3, 11, 16, requires_grad=True)
    weights = [torch.randn(r, 16, requires_grad=True) for r in (4, 2, 4)]
    probe = torch.randn(3, 11, 10)
    torch.manual_seed(7)
    h = _LoraAFunction.apply(x, p, *weights)
    (h * probe).sum().backward()
    ours = [h.detach(), x.grad.clone(), *(w.grad.clone() for w in weights)]

    x.grad = None
    for w in weights:
        w.grad = None
    torch.manual_seed(7)
    drop = drop_mask(x.shape, p)
    assert (0 < drop.sum() < drop.numel()) == (p > 0)
    ref = torch.cat([F.linear(x * ~drop / (1 - p), w) for w in weights], dim=-1)
    (ref * probe).sum().backward()
    for a, b in zip(ours, [ref.detach(), x.grad, *(w.grad for w in weights)], strict=False):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


class _ReferenceDropout(torch.nn.Module):
    """peft's dropout slot drawing the masks the fused forward draws (same generator, same order); with
    ``shared``, the slots of one group reuse the mask drawn for the same input tensor."""

    def __init__(self, p: float, shared: dict | None = None):
        super().__init__()
        self.p, self.shared = p, shared

    def forward(self, x):
        if not self.training:
            return x
        if self.shared is not None and self.shared.get("x") is x:
            drop = self.shared["drop"]
        else:
            drop = drop_mask(x.shape, self.p)
            if self.shared is not None:
                self.shared.update(x=x, drop=drop)
        return x * ~drop / (1 - self.p)


def _reference_and_fused(tiny_model, p: float, shared: bool, checkpointing: bool = False):
    config = run_config("lora", {"lora": {"r": 4, "dropout": p, "fused_forward": False}})
    reference = apply_method(tiny_model, config)
    fused = copy.deepcopy(reference)
    assert fuse_lora_forward(fused, shared_dropout_mask=shared) == 7 * tiny_model.config.num_hidden_layers
    for layer in reference.base_model.model.model.layers:
        groups = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp", "up_proj": "mlp"}
        state: dict = {"attn": {}, "mlp": {}}
        for parent in (layer.self_attn, layer.mlp):
            for name, module in parent.named_children():
                if hasattr(module, "lora_dropout"):
                    group = state[groups[name]] if shared and name in groups else None
                    module.lora_dropout["default"] = _ReferenceDropout(p, group)
    assert fused.state_dict().keys() == reference.state_dict().keys()
    with torch.no_grad():                     # B = 0 at init would hide A's gradient
        for model in (reference, fused):
            torch.manual_seed(3)
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1)
    if checkpointing:
        for model in (reference, fused):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    return reference, fused


def _loss_and_grads(model, ids):
    model.train()
    torch.manual_seed(11)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("p,shared,checkpointing", [(0.25, True, False), (0.25, False, False), (0.0, True, False),
                                                    (0.25, True, True)])
def test_fused_lora_trains_like_peft_lora_with_the_same_masks(tiny_model, p, shared, checkpointing):
    reference, fused = _reference_and_fused(tiny_model, p, shared, checkpointing)
    ids = torch.randint(0, 1000, (2, 9))
    ref_loss, ref_grads = _loss_and_grads(reference, ids)
    loss, grads = _loss_and_grads(fused, ids)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert ref_grads.keys() == grads.keys() and len(grads) == 2 * 7 * tiny_model.config.num_hidden_layers
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    reference.eval(), fused.eval()
    torch.testing.assert_close(fused(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_shared_masks_differ_from_independent_ones(tiny_model):
    """The test above would pass for ``shared`` with independent masks if the grouping did nothing."""
    pristine = copy.deepcopy(tiny_model)
    _, shared = _reference_and_fused(tiny_model, 0.25, True)
    _, independent = _reference_and_fused(pristine, 0.25, False)
    ids = torch.randint(0, 1000, (2, 9))
    assert not torch.allclose(_loss_and_grads(shared, ids)[0], _loss_and_grads(independent, ids)[0])


def test_group_stops_sharing_when_members_read_different_inputs(tiny_model):
    reference, fused = _reference_and_fused(tiny_model, 0.0, True)
    attn_ref = reference.base_model.model.model.layers[0].self_attn
    attn = fused.base_model.model.model.layers[0].self_attn
    group = attn.q_proj._shared_input
    assert group is attn.k_proj._shared_input is attn.v_proj._shared_input and group.active
    fused.train(), reference.train()
    x, y = torch.randn(1, 5, 64), torch.randn(1, 5, 64)
    torch.testing.assert_close(attn.q_proj(x), attn_ref.q_proj(x))
    torch.testing.assert_close(attn.k_proj(y), attn_ref.k_proj(y))       # not q's input: computed on its own
    assert not group.active
    for proj in ("q_proj", "k_proj", "v_proj"):
        torch.testing.assert_close(getattr(attn, proj)(x), getattr(attn_ref, proj)(x))


@pytest.mark.parametrize("sections", [{"lora": {"r": 4, "dropout": 0.1}},
                                      pytest.param({}, marks=pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes"))])
def test_lora_and_qlora_default_to_the_fused_forward(tiny_model, sections):
    method = "lora" if sections else "qlora"
    model = apply_method(tiny_model, run_config(method, sections or {"lora": {"r": 4}}))
    fused = [m for m in model.modules() if isinstance(m, FusedLoraForward)]
    assert len(fused) == 7 * tiny_model.config.num_hidden_layers
    assert sum(m._shared_input is not None for m in fused) == 5 * tiny_model.config.num_hidden_layers
    model.train()
    ids = torch.randint(0, 1000, (1, 7))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_dora_and_peft_forward_keep_peft_layers(tiny_model):
    pristine = copy.deepcopy(tiny_model)
    dora = apply_method(tiny_model, run_config("lora", {"lora": {"r": 4, "use_dora": True}}))
    ids = torch.randint(0, 1000, (1, 7))
    dora.train()
    assert torch.isfinite(dora(input_ids=ids, labels=ids).loss)       # DoRA is a variant: peft's forward
    plain = apply_method(pristine, run_config("lora", {"lora": {"r": 4, "fused_forward": False}}))
    assert not any(isinstance(m, FusedLoraForward) for m in plain.modules())


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes")
def test_fused_qlora_matches_peft_qlora(tiny_model):
    reference = apply_method(tiny_model,
                             run_config("qlora", {"lora": {"r": 4, "dropout": 0.0, "fused_forward": False}}))
    fused = copy.deepcopy(reference)
    assert fuse_lora_forward(fused) == 7 * tiny_model.config.num_hidden_layers
    assert all(type(m).__name__ == "FusedLoraLinear4bit" for m in fused.modules() if isinstance(m, FusedLoraForward))
    with torch.no_grad():
        for model in (reference, fused):
            torch.manual_seed(3)
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1)
    ids = torch.randint(0, 1000, (2, 9))
    (ref_loss, ref_grads), (loss, grads) = _loss_and_grads(reference, ids), _loss_and_grads(fused, ids)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes")
def test_fused_qlora_over_biased_linears_matches_peft_qlora(tokenizer):
    """bitsandbytes' 4-bit matmul with a bias returns a view (F.linear's flattened addmm), which autograd forbids
    changing in place: the fused forward adds LoRA's term apart there, and trains as peft's QLoRA does (Qwen 2.5's
    q/k/v biases)."""
    from _architectures import build

    sections = {"lora": {"r": 4, "dropout": 0.0, "fused_forward": False}}
    reference = apply_method(build("qwen2.5", tokenizer), run_config("qlora", sections))
    fused = copy.deepcopy(reference)
    fuse_lora_forward(fused)
    biased = [m for m in fused.modules() if isinstance(m, FusedLoraForward) and m.base_layer.bias is not None]
    assert len(biased) == 3 * 2         # q, k, v in each of the 2 layers
    with torch.no_grad():
        for model in (reference, fused):
            torch.manual_seed(3)
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1)
    ids = torch.randint(0, 1000, (2, 9))
    (ref_loss, ref_grads), (loss, grads) = _loss_and_grads(reference, ids), _loss_and_grads(fused, ids)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
