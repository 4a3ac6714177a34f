"""Full fine-tuning's part of the memory estimate (the shared arithmetic and its derivation:
:mod:`tuneforge.estimate.memory`).

Every parameter trains in the dtype it was loaded in (``w`` bytes): weights ``P*w``, gradients ``P*w``, AdamW's
``m`` and ``v`` ``2*P*w`` (with ``master_weights``: an fp32 copy and fp32 states). A trained block saves, per
token, what a frozen one does plus the inputs of its projections and norms (their weights need them)::

    2*(n + n_w + a*d) + a*(2q + 2kv) + 4H + 4a*I  [+ a*q, the concatenated attention output, packed rows]

(``n_w``: what transformers' RMSNorm adds when its weight trains). The final norm and the LM head train too,
and a tied embedding's gradient costs two ``V x d`` temporaries at the end of backward.
``full.freeze_embeddings`` / ``freeze_layers`` are not modelled (the estimate is for everything training).
"""

from __future__ import annotations

from tuneforge.methods.memory import MemoryInputs, MemoryTerms, base_weight_bytes


def full_memory(inputs: MemoryInputs) -> MemoryTerms:
    shape, w = inputs.shape, inputs.dtype_bytes
    d = shape.hidden_size
    block = inputs.block(w)
    per_token = (2 * (block.norm + block.norm_weight + w * d) + block.attention + block.mlp + block.mlp_trained
                 + block.o_copy + block.extra)
    total = shape.num_parameters()
    # the embedding backward builds a dense V x d gradient and autograd adds it to the tied lm_head's out of
    # place: two V x d temporaries beside the gradients at the end of backward (measured: a tied 49152 x 576
    # fp32 weight peaks at 3 x 108 MiB in backward and keeps 1 x as its gradient)
    floor = 2 * shape.vocab_size * d * w if shape.tie_word_embeddings else 0
    return MemoryTerms(
        trainable_params=total, weights=base_weight_bytes(inputs), param_bytes=w,
        largest_trainable=shape.vocab_size * d, act_bytes=w, per_token_layer=per_token, trains_head=True,
        master_copy=True, step_floor=floor,
        notes=(f"all {total:,} parameters train; weights and gradients in {inputs.dtype}",))
