"""tuneforge's AdamW is torch's fused one where it can be, and updates like torch's default one."""

from __future__ import annotations

import torch

from tuneforge.kernels.optimizer import adamw


def test_fused_adamw_updates_like_the_for_loop_one():
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(3))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_ours = adamw(ours, lr=1e-2, weight_decay=0.1)
    opt_ref = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=False)
    assert opt_ours.defaults["fused"] is True
    for _step in range(5):
        grads = [torch.randn_like(p) for p in ours]
        for params, opt in ((ours, opt_ours), (ref, opt_ref)):
            for p, g in zip(params, grads, strict=False):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(ours, ref, strict=False):
        assert not torch.equal(a, torch.zeros_like(a))
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_adamw_falls_back_where_there_is_no_fused_kernel():
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.float64, device="meta"))
    assert adamw([p], lr=1e-3).defaults["fused"] is None
