"""IA3's part of the memory estimate (the shared arithmetic and its derivation: :mod:`tuneforge.estimate.memory`).

One fp32 vector ``l`` per target linear over a frozen base: ``d_out`` elements for a rescaled output
(``k_proj``, ``v_proj`` by default), ``d_in`` for a rescaled input (``feedforward_modules``: ``down_proj``). Per
token, on top of a frozen block, peft's forward saves for ``l``'s gradient:

* an output target, ``W x`` before the rescaling: ``a*d_out``;
* a feed-forward target, its input cast to ``l``'s fp32: ``4*d_in`` (the input itself in fp32);

and, per layer whatever the row's length, the vectors ``1 * l`` it multiplies by (``4`` bytes an element).
Checked exactly against the tensors autograd saves (``tests/test_estimate_methods.py``).
"""

from __future__ import annotations

from tuneforge.methods.memory import MemoryInputs, MemoryTerms, base_weight_bytes

DEFAULT_TARGETS = ("k_proj", "v_proj", "down_proj")     # as methods/ia3/model.py
DEFAULT_FEEDFORWARD = ("down_proj",)


def ia3_memory(inputs: MemoryInputs) -> MemoryTerms:
    cfg = inputs.settings["ia3"]
    shape = inputs.shape
    a = inputs.dtype_bytes
    targets = list(cfg.target_modules or DEFAULT_TARGETS)
    feedforward = (list(cfg.feedforward_modules) if cfg.feedforward_modules is not None
                   else [m for m in DEFAULT_FEEDFORWARD if m in targets])
    params = saved = 0
    for name, d_in, d_out in shape.linears():
        if name not in targets:
            continue
        if name in feedforward:
            params, saved = params + d_in, saved + 4 * d_in
        else:
            params, saved = params + d_out, saved + a * d_out
    largest = max((d_in if name in feedforward else d_out) for name, d_in, d_out in shape.linears()
                  if name in targets) if params else 0
    return MemoryTerms(  # the same under autocast: checked in tests/test_estimate_precision.py
        autocast_checked=True,
        trainable_params=shape.num_layers * params, weights=base_weight_bytes(inputs) + 4 * shape.num_layers * params,
        param_bytes=4, largest_trainable=largest, act_bytes=a, per_token_layer=inputs.block(a).frozen + saved,
        per_layer=4 * params,
        notes=(f"IA3 on {', '.join(targets)} (feed-forward: {', '.join(feedforward) or 'none'}), fp32 vectors over "
               f"a frozen {inputs.dtype} base",))
