"""Prefix tuning's part of the memory estimate (the shared arithmetic and its derivation:
:mod:`tuneforge.estimate.memory`).

``P = num_virtual_tokens`` trained keys and values per layer, of the key/value width: ``L*2*P*kv`` fp32
parameters (with ``reparameterize``, peft's ``prefix_projection``: an embedding ``P x kv`` and an MLP
``kv -> e -> L*2*kv`` that make them, ``e = encoder_hidden_size``). Attention runs under the explicit
``T x (P + T)`` mask :func:`~tuneforge.methods.prefix_tuning.model.forward_for_loss` builds (in the base's
dtype, saved once by every layer's SDPA: one copy), so transformers repeats k and v to every head: per token a
frozen block with ``kv = q``, and per layer the prefix's repeated keys and values, ``2*a*P*q``.
Checked exactly against the tensors autograd saves (``tests/test_estimate_methods.py``).
"""

from __future__ import annotations

from tuneforge.methods.memory import MemoryInputs, MemoryTerms, base_weight_bytes


def prefix_memory(inputs: MemoryInputs) -> MemoryTerms:
    cfg = inputs.settings["prefix"]
    shape = inputs.shape
    P, kv, L = cfg.num_virtual_tokens, shape.kv_width, shape.num_layers
    a, T = inputs.dtype_bytes, inputs.tokens
    prefix = L * 2 * P * kv
    if cfg.reparameterize:
        e = cfg.encoder_hidden_size
        trainable = P * kv + (kv * e + e) + (e * L * 2 * kv + L * 2 * kv)
        largest = e * L * 2 * kv
        encoder = 4 * P * (kv + e)            # the MLP's inputs: the embeddings and tanh's output
    else:
        trainable, largest, encoder = prefix, prefix, 0
    return MemoryTerms(  # the same under autocast: checked in tests/test_estimate_precision.py
        autocast_checked=True,
        trainable_params=trainable, weights=base_weight_bytes(inputs) + 4 * trainable, param_bytes=4,
        largest_trainable=largest, act_bytes=a, per_token_layer=inputs.block(a, explicit_mask=True).frozen,
        per_layer=2 * a * P * shape.q_width, shared=a * T * (P + T) + encoder, explicit_mask=True,
        notes=(f"prefix of {P} keys and values per layer (fp32{', reparameterized' if cfg.reparameterize else ''}) "
               f"over a frozen {inputs.dtype} base, attention under a {T} x {P + T} mask",))
