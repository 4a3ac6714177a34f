"""Cross-entropy over the LM head in chunks of positions: the ``(K, V)`` logits never exist at once.

The plain loss keeps, for ``K`` trained positions and a vocabulary of ``V``, the fp32 logits, their
log-softmax and, in backward, their gradient: about ``12 * K * V`` bytes (1.2 GiB for SmolLM2's 49k
vocabulary at K = 2048; 9.7 GiB at K = 16k). :class:`ChunkedLMHeadLoss` computes
``sum_k (logsumexp(h_k W^T) - h_k . w_{t_k})`` chunk by chunk, saves only the hidden states and one
log-sum-exp per position, and recomputes each chunk's logits in backward (the idea of Liger-Kernel's
fused linear cross-entropy, in plain torch). Memory: ``~8 * chunk * V`` bytes; cost: one more LM-head
matmul over the K positions (about 6% of a SmolLM2 step when every token is trained). A chunk holds at most
1024 positions and at most ``budget`` bytes of fp32 logits (:func:`chunk_positions`): 1024 for SmolLM2's 49k
vocabulary, 256 for Gemma 3's 262k.

:func:`use_chunked_loss` decides per step: only when the logits would exceed ``budget`` bytes (so short
rows keep the faster plain path) and only for model types whose forward applies nothing to the logits
after the LM head (no soft-capping or scaling): Gemma 3 qualifies while its ``final_logit_softcapping`` is
unset (its released configs), Gemma 2 (soft-capped) does not; a model it does not apply to is told in one log
line, once per model type.
"""

from __future__ import annotations

import contextlib
import logging

import torch

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
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        total = torch.zeros(() if segment is None else (n,), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            logits = _logits(hidden[s:s + chunk], weight, bias)
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            losses = lse[s:s + chunk] - logits.gather(1, targets[s:s + chunk, None]).squeeze(1)
            if segment is None:
                total += losses.sum()
            else:
                total.index_add_(0, segment[s:s + chunk], losses)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, segment)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        hidden, weight, bias, targets, lse, segment = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[s:s + ctx.chunk]
            probs = (_logits(h, weight, bias) - lse[s:s + ctx.chunk, None]).exp_()     # softmax
            rows = torch.arange(h.shape[0], device=h.device)
            probs[rows, targets[s:s + ctx.chunk]] -= 1.0                                # d loss / d logits
            probs *= grad_total if segment is None else grad_total[segment[s:s + ctx.chunk]][:, None]
            g = probs.to(weight.dtype)          # as the plain path: the logits' gradient in the head's dtype
            if grad_h is not None:
                grad_h[s:s + ctx.chunk] = (g @ weight).to(hidden.dtype)
            if grad_w is not None and weight.dtype == torch.float32:   # in place: no (V, d) temporary a chunk
                grad_w.addmm_(g.t(), h.to(weight.dtype))
            elif grad_w is not None:             # bf16/fp16 head: its matmul's rounding, as the plain path
                grad_w += (g.t() @ h.to(weight.dtype)).float()
            if need_b:
                grad_b += g.sum(0, dtype=torch.float32)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)


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
