"""Cross-entropy over the LM head in chunks of positions: the ``(K, V)`` logits never exist at once.

The plain loss keeps, for ``K`` trained positions and a vocabulary of ``V``, the fp32 logits, their
log-softmax and, in backward, their gradient: about ``12 * K * V`` bytes (1.2 GiB for SmolLM2's 49k
vocabulary at K = 2048; 9.7 GiB at K = 16k). :class:`ChunkedLMHeadLoss` computes
``sum_k (logsumexp(h_k W^T) - h_k . w_{t_k})`` chunk by chunk and, when backward will need them, the
gradients too, while each chunk's logits exist (Liger-Kernel's fused linear cross-entropy, in plain torch):
backward then only scales them by the upstream gradient, and the LM head runs the same matmuls as the plain
loss. Memory: ``~8 * chunk * V`` bytes, plus the head's fp32 gradient when it trains. Per-example sums of a
trained head (whose gradient needs each example's upstream weight) keep the hidden states and one
log-sum-exp per position and recompute each chunk's logits in backward: one more LM-head matmul over the K
positions. A chunk holds at most
1024 positions and at most ``budget`` bytes of fp32 logits (:func:`chunk_positions`): 1024 for SmolLM2's 49k
vocabulary, 256 for Gemma 3's 262k.

:func:`use_chunked_loss` decides per step: only when the logits would exceed ``budget`` bytes (so short
rows keep the faster plain path) and only for model types whose forward applies nothing to the logits
after the LM head (no soft-capping or scaling): Gemma 3 qualifies while its ``final_logit_softcapping`` is
unset (its released configs), Gemma 2 (soft-capped) does not; a model it does not apply to is told in one log
line, once per model type. With ``kernels:`` choosing Liger (CUDA, :mod:`tuneforge.kernels.select`) the head is
marked and its summed loss goes through Liger's fused linear cross-entropy at every length instead
(:mod:`tuneforge.kernels.liger`); ``chunked_loss: off`` still keeps the plain loss.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from tuneforge.kernels.liger import liger_cross_entropy_sum, uses_liger_loss

log = logging.getLogger(__name__)

# model types whose causal-LM forward is ``logits = lm_head(hidden)`` with nothing applied afterwards
PLAIN_LM_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# model types whose forward soft-caps the logits only when ``config.final_logit_softcapping`` is set
SOFTCAP_WHEN_SET_TYPES = frozenset({"gemma3_text"})
_told: set[str] = set()
DEFAULT_BUDGET_BYTES = 256 * 2 ** 20
DEFAULT_CHUNK = 1024


class ChunkedLMHeadLoss(torch.autograd.Function):
    """``sum`` of cross-entropies of ``hidden [K, d] @ weight[V, d]^T (+ bias)`` against ``targets [K]``, in fp32."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                chunk: int, segment: torch.Tensor | None = None, n: int = 0) -> torch.Tensor:
        """The scalar sum, or with ``segment [K]`` (example of each position) the per-example sums ``[n]``."""
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        # The gradients in the forward, as Liger-Kernel's fused linear cross-entropy does: each chunk's d loss / d
        # logits is used while its logits exist, so backward only scales (no second LM-head matmul over the
        # targets). Not for per-example sums of a trained head: its gradient would need each example's weight.
        early = (need_h or need_w or need_b) and (segment is None or not (need_w or need_b))
        lse = None if early else torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        total = torch.zeros(() if segment is None else (n,), dtype=torch.float32, device=hidden.device)
        grads = _Grads(hidden, weight, bias, need_h, need_w, need_b) if early else None
        for s in range(0, hidden.shape[0], chunk):
            logits = _logits(hidden[s:s + chunk], weight, bias)
            chunk_lse = torch.logsumexp(logits, dim=-1)
            losses = chunk_lse - logits.gather(1, targets[s:s + chunk, None]).squeeze(1)
            if segment is None:
                total += losses.sum()
            else:
                total.index_add_(0, segment[s:s + chunk], losses)
            if grads is not None:
                grads.add(s, hidden[s:s + chunk], logits.sub_(chunk_lse[:, None]).exp_(), targets[s:s + chunk])
            elif lse is not None:
                lse[s:s + chunk] = chunk_lse
        ctx.chunk, ctx.early = chunk, grads is not None
        ctx.weight_dtype, ctx.bias_dtype = weight.dtype, None if bias is None else bias.dtype
        if grads is not None:
            ctx.save_for_backward(grads.h, grads.w, grads.b, segment)
        else:
            ctx.save_for_backward(hidden, weight, bias, targets, lse, segment)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        if ctx.early:
            grad_h, grad_w, grad_b, segment = ctx.saved_tensors
            if grad_h is not None:
                grad_h = grad_h * (grad_total if segment is None else grad_total[segment][:, None]).to(grad_h.dtype)
            scale = grad_total.float()          # in place below: no second (V, d) buffer (one backward per graph)
            return (grad_h, None if grad_w is None else grad_w.mul_(scale).to(ctx.weight_dtype),
                    None if grad_b is None else grad_b.mul_(scale).to(ctx.bias_dtype), None, None, None, None)
        hidden, weight, bias, targets, lse, segment = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grads = _Grads(hidden, weight, bias, need_h, need_w, need_b)
        for s in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[s:s + ctx.chunk]
            probs = (_logits(h, weight, bias) - lse[s:s + ctx.chunk, None]).exp_()     # softmax
            probs *= grad_total if segment is None else grad_total[segment[s:s + ctx.chunk]][:, None]
            grads.add(s, h, probs, targets[s:s + ctx.chunk], scale=grad_total if segment is None else
                      grad_total[segment[s:s + ctx.chunk]])
        return (grads.h, None if grads.w is None else grads.w.to(weight.dtype),
                None if grads.b is None else grads.b.to(bias.dtype), None, None, None, None)


class _Grads:
    """The LM head's input, weight and bias gradients, accumulated chunk by chunk from each chunk's softmax."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, need_h: bool,
                 need_w: bool, need_b: bool) -> None:
        self.weight = weight
        self.h = torch.empty_like(hidden) if need_h else None
        self.w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        self.b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b and bias is not None \
            else None

    def add(self, s: int, h: torch.Tensor, probs: torch.Tensor, targets: torch.Tensor,
            scale: torch.Tensor | None = None) -> None:
        """Add the chunk starting at position ``s``: ``probs`` its softmax (times ``scale``, the upstream gradient,
        when given), turned in place into d loss / d logits."""
        rows = torch.arange(h.shape[0], device=h.device)
        probs[rows, targets] -= 1.0 if scale is None else scale
        g = probs.to(self.weight.dtype)          # as the plain path: the logits' gradient in the head's dtype
        if self.h is not None:
            self.h[s:s + h.shape[0]] = (g @ self.weight).to(self.h.dtype)
        if self.w is not None and self.weight.dtype == torch.float32:   # in place: no (V, d) temporary a chunk
            self.w.addmm_(g.t(), h.to(self.weight.dtype))
        elif self.w is not None:             # bf16/fp16 head: its matmul's rounding, as the plain path
            self.w += (g.t() @ h.to(self.weight.dtype)).float()
        if self.b is not None:
            self.b += g.sum(0, dtype=torch.float32)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = hidden @ weight.t()
    if bias is not None:
        out = out + bias
    return out.float()


def chunk_positions(vocab: int, budget: int = DEFAULT_BUDGET_BYTES) -> int:
    """Positions per chunk: :data:`DEFAULT_CHUNK`, fewer where their fp32 logits would pass ``budget`` (at least 64)."""
    return max(64, min(DEFAULT_CHUNK, budget // (4 * vocab)))


def chunked_cross_entropy_sum(hidden: torch.Tensor, lm_head: torch.nn.Linear, targets: torch.Tensor,
                              chunk: int | None = None, segment: torch.Tensor | None = None,
                              n: int = 0) -> torch.Tensor:
    """Summed fp32 cross-entropy of ``lm_head(hidden)`` against ``targets``, without the full logits; with
    ``segment [K]`` (the example of each position) the per-example sums ``[n]`` instead. ``chunk``: positions
    per chunk (default :func:`chunk_positions` of the head's vocabulary)."""
    if segment is None and uses_liger_loss(lm_head):     # kernels: liger on CUDA (kernels/select.py)
        return liger_cross_entropy_sum(hidden, lm_head, targets)
    chunk = chunk or chunk_positions(lm_head.out_features)
    return ChunkedLMHeadLoss.apply(hidden, lm_head.weight, lm_head.bias, targets, chunk, segment, n)


def output_head(model: torch.nn.Module) -> tuple[torch.nn.Module, str] | None:
    """``(module holding the LM head, attribute name)`` when the chunked loss applies to ``model``, else None."""
    from transformers import PreTrainedModel

    base = next((m for m in model.modules() if isinstance(m, PreTrainedModel) and hasattr(m, "lm_head")), None)
    if base is None or not _plain_lm_head(base.config):
        return None
    head = base.lm_head
    if type(head) is not torch.nn.Linear:      # an adapter or quantized layer on the head: keep the plain path
        return None
    return base, "lm_head"


def _plain_lm_head(config) -> bool:
    """Whether ``config``'s causal-LM forward is ``logits = lm_head(hidden)`` (logged once per type when not)."""
    model_type = str(getattr(config, "model_type", None))
    if model_type in PLAIN_LM_HEAD_TYPES:
        return True
    if model_type in SOFTCAP_WHEN_SET_TYPES and getattr(config, "final_logit_softcapping", None) is None:
        return True
    if model_type not in _told:
        _told.add(model_type)
        log.info("chunked loss: not applied to model type %s (its forward transforms the logits after the LM head, "
                 "or is not known to leave them alone); the plain loss is used", model_type)
    return False


def use_chunked_loss(model: torch.nn.Module, num_targets: int, mode: str = "auto",
                     budget: int = DEFAULT_BUDGET_BYTES) -> bool:
    """Whether this step's loss should be chunked: ``mode`` on/off, or auto (logits over ``budget`` bytes)."""
    head = None if mode == "off" else output_head(model)
    if head is None:
        return False
    owner, name = head
    if uses_liger_loss(getattr(owner, name)):    # Liger's fused linear cross-entropy: at every length
        return True
    return mode == "on" or 4 * num_targets * getattr(owner, name).out_features > budget


class _HiddenStates(torch.nn.Module):
    """Stands in for the LM head during a forward, so the model returns hidden states as its "logits"."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


@contextlib.contextmanager
def lm_head_bypassed(model: torch.nn.Module):
    """Within the block, ``model``'s forward returns the final hidden states in place of logits; yields the head."""
    found = output_head(model)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no plain linear LM head to bypass (see output_head)")
    owner, name = found
    head = getattr(owner, name)
    setattr(owner, name, _HiddenStates())
    try:
        yield head
    finally:
        setattr(owner, name, head)
