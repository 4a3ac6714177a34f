"""The in-place cross-entropy equals ``F.cross_entropy`` (value and gradient) and refuses a second backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tuneforge.kernels.cross_entropy import cross_entropy_sum


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_sum_equals_torch(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(37, 101) * 4).to(dtype).requires_grad_()
    targets = torch.randint(0, 101, (37,))
    targets[:3] = targets[3]                           # repeated targets
    ours = cross_entropy_sum(logits * 1.0, targets)    # a non-leaf, as the LM head's output is
    (ours * 0.37).backward()
    got = logits.grad.clone()
    logits.grad = None
    ref = F.cross_entropy(logits.float(), targets, reduction="sum")
    (ref * 0.37).backward()
    assert got.dtype == dtype
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(got, logits.grad, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=1e-5)


def test_cross_entropy_sum_refuses_a_second_backward():
    logits = torch.randn(5, 11, requires_grad=True)
    loss = cross_entropy_sum(logits * 2.0, torch.arange(5))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot run backward twice"):
        loss.backward()


def test_cross_entropy_sum_without_grad_is_torch():
    logits = torch.randn(5, 11)
    torch.testing.assert_close(cross_entropy_sum(logits, torch.arange(5)),
                               F.cross_entropy(logits, torch.arange(5), reduction="sum"))
