"""Summed cross-entropy of ``(K, V)`` logits whose backward reuses the forward's buffer.

``F.cross_entropy(logits, targets, reduction="sum")`` saves the ``(K, V)`` log-softmax and, in backward,
allocates a zero-filled ``(K, V)`` gradient for the NLL, scatters into it, then allocates another
``(K, V)`` tensor for the log-softmax gradient: three vocabulary-sized buffers alive at the start of
backward (3 x 95 MiB for 483 targets and SmolLM2's 49k vocabulary) and four passes over them.
:class:`CrossEntropySum` saves the log-softmax and turns it into the gradient in place
(``softmax - one_hot``, scaled): one buffer and two passes. The values are those of ``F.cross_entropy``.
"""

from __future__ import annotations

import torch


def _softmax_minus_one_hot_(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d(-log p_target)/d logits = softmax - one_hot, computed in the saved log-softmax buffer ``logp [K, V]``."""
    grad = logp.exp_()
    grad[torch.arange(grad.shape[0], device=grad.device), targets] -= 1.0
    return grad


class CrossEntropySum(torch.autograd.Function):
    """``sum_k -log_softmax(logits)[k, targets[k]]`` for fp32 ``logits [K, V]``; backward in place."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits, dim=-1)
        loss = -logp.gather(1, targets[:, None]).sum()
        ctx.save_for_backward(logp, targets)
        ctx.used = False
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        if ctx.used:
            raise RuntimeError("CrossEntropySum reuses its saved log-softmax in backward; it cannot run backward twice "
                               "(retain_graph=True): use F.cross_entropy for that")
        ctx.used = True
        logp, targets = ctx.saved_tensors
        return _softmax_minus_one_hot_(logp, targets).mul_(grad_loss), None


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed fp32 cross-entropy of ``logits [K, V]`` against ``targets [K]`` (``F.cross_entropy(..., "sum")``)."""
    logits = logits.float()
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    return CrossEntropySum.apply(logits, targets)


class CrossEntropySegmentSum(torch.autograd.Function):
    """Per-example sums ``out[e] = sum_{k: segment[k] = e} -log_softmax(logits)[k, targets[k]]`` (fp32
    ``logits [K, V]``, ``segment [K]`` in ``0..n-1``) -> ``[n]``; backward in place as :class:`CrossEntropySum`."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, segment: torch.Tensor, n: int) -> torch.Tensor:
        logp = torch.log_softmax(logits, dim=-1)
        nll = -logp.gather(1, targets[:, None]).squeeze(1)
        out = torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add_(0, segment, nll)
        ctx.save_for_backward(logp, targets, segment)
        ctx.used = False
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.used:
            raise RuntimeError("CrossEntropySegmentSum reuses its saved log-softmax in backward; it cannot run "
                               "backward twice")
        ctx.used = True
        logp, targets, segment = ctx.saved_tensors
        return _softmax_minus_one_hot_(logp, targets).mul_(grad_out[segment][:, None]), None, None, None


def cross_entropy_segment_sums(logits: torch.Tensor, targets: torch.Tensor, segment: torch.Tensor,
                               n: int) -> torch.Tensor:
    """Per-example summed fp32 cross-entropies ``[n]`` of ``logits [K, V]`` (``segment [K]``: example of each row)."""
    logits = logits.float()
    if not (torch.is_grad_enabled() and logits.requires_grad):
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        return torch.zeros(n, dtype=nll.dtype, device=nll.device).index_add_(0, segment, nll)
    return CrossEntropySegmentSum.apply(logits, targets, segment, n)
