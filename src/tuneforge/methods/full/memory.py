"""Full fine-tuning's part of the memory estimate (the shared arithmetic and its derivation:
:mod:`tuneforge.estimate.memory`).

Every parameter trains in the dtype it was loaded in (``w`` bytes; ``precision:`` decides it: fp32 under ``fp32``
and the mixed modes, whose fp32 model is the master copy, bf16 under ``bf16-true``): weights ``P*w``, gradients
``P*w``; the optimizer is the estimator's (fp32 moments, + a compensation buffer under ``bf16-true``). Without
autocast a trained block saves, per token, what a frozen one does plus the inputs of its projections and norms
(their weights need them)::

    2*(n + n_w + a*d) + a*(2q + 2kv) + 4H + 4a*I  [+ a*q, the concatenated attention output, packed rows]

(``n_w``: what transformers' RMSNorm adds when its weight trains). Under autocast (``bf16-mixed``,
``fp16-mixed``; ``c`` the compute dtype's bytes) the residual stream stays fp32: each norm saves its fp32 input
(``4d + 4``), and every projection reading a norm's output casts it to ``c`` itself (the cast of a non-leaf tensor
is not cached), so q, k, v, gate and up save ``c*d`` each; SDPA's inputs and output, the MLP's products and the
attention output are in ``c``::

    2*(4d + 4) + m*c*d + c*(2q + 2kv) + 4H + 4c*I  [+ c*q packed]   (m: projections reading a norm, 5 for Llama)

and every weight's ``c`` copy (autocast's cast, saved for the input's gradient and kept in autocast's cache until
the forward ends: with checkpointing too) costs ``c`` bytes per linear weight and the LM head's.
Checked exactly against ``saved_tensors_hooks`` under ``torch.autocast`` (``tests/test_estimate_precision.py``).
The final norm and the LM head train too, and a tied embedding's gradient costs two ``V x d`` temporaries at the
end of backward.
``full.freeze_embeddings`` / ``freeze_layers`` are not modelled (the estimate is for everything training).
"""

from __future__ import annotations

from tuneforge.methods.memory import MemoryInputs, MemoryTerms, base_weight_bytes


def full_memory(inputs: MemoryInputs) -> MemoryTerms:
    shape, w = inputs.shape, inputs.dtype_bytes
    d = shape.hidden_size
    c = inputs.autocast_bytes
    casts = 0
    if c is None:
        block = inputs.block(w)
        per_token = (2 * (block.norm + block.norm_weight + w * d) + block.attention + block.mlp + block.mlp_trained
                     + block.o_copy + block.extra + block.trained_extra + block.o_input)
    else:
        block, stream = inputs.block(c), inputs.block(w)
        readers = sum(1 for name, _, _ in shape.linears() if name not in ("o_proj", "down_proj"))
        per_token = (2 * (stream.norm + stream.norm_weight) + readers * c * d + block.attention + block.mlp
                     + block.mlp_trained + block.o_copy + block.extra + block.trained_extra + block.o_input)
        casts = c * (sum(d_in * d_out for layer in shape.layer_linears() for _, d_in, d_out in layer)
                     + shape.vocab_size * d)
    total = shape.num_parameters()
    # the embedding backward builds a dense V x d gradient and autograd adds it to the tied lm_head's out of
    # place: two V x d temporaries beside the gradients at the end of backward (measured: a tied 49152 x 576
    # fp32 weight peaks at 3 x 108 MiB in backward and keeps 1 x as its gradient)
    floor = 2 * shape.vocab_size * d * w if shape.tie_word_embeddings else 0
    return MemoryTerms(
        trainable_params=total, weights=base_weight_bytes(inputs), param_bytes=w,
        largest_trainable=shape.vocab_size * d, act_bytes=w, per_token_layer=per_token, trains_head=True,
        master_copy=True, step_floor=floor, weight_casts=casts, autocast_checked=True,
        notes=(f"all {total:,} parameters train; weights and gradients in {inputs.dtype}",))
