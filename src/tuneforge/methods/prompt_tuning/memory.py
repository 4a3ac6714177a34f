"""Prompt tuning's part of the memory estimate (the shared arithmetic and its derivation:
:mod:`tuneforge.estimate.memory`).

A soft prompt of ``P = num_virtual_tokens`` fp32 embeddings (``P*d`` parameters) over a frozen base.
:func:`~tuneforge.methods.prompt_tuning.model.forward_for_loss` puts it in front of every example of the row,
so the layers see ``T + batch*P`` tokens, each saving what a frozen block saves (the gradient flows through every
layer down to the prompt); the logits stay those of the ``K`` target positions.
Checked exactly against the tensors autograd saves (``tests/test_estimate_methods.py``).
"""

from __future__ import annotations

from tuneforge.methods.memory import MemoryInputs, MemoryTerms, base_weight_bytes


def prompt_memory(inputs: MemoryInputs) -> MemoryTerms:
    P = inputs.settings["prompt"].num_virtual_tokens
    d = inputs.shape.hidden_size
    a = inputs.dtype_bytes
    return MemoryTerms(  # the same under autocast: checked in tests/test_estimate_precision.py
        autocast_checked=True,
        trainable_params=P * d, weights=base_weight_bytes(inputs) + 4 * P * d, param_bytes=4, largest_trainable=P * d,
        act_bytes=a, per_token_layer=inputs.block(a).frozen, extra_tokens=inputs.batch * P,
        notes=(f"soft prompt of {P} fp32 embeddings before each of the {inputs.batch} examples of the row, "
               f"over a frozen {inputs.dtype} base",))
