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

DEFAULT_TARGETS = ["k_proj", "v_proj", "down_proj"]
DEFAULT_FEEDFORWARD = ["down_proj"]
# families whose linears are not named k_proj / v_proj: (attention and feed-forward targets, feed-forward ones)
FAMILY_TARGETS = {"phi3": (["qkv_proj", "down_proj"], ["down_proj"]),
                  "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"])}


def ia3_targets(targets: list[str] | None, feedforward: list[str] | None,
                model_type: str | None) -> tuple[list[str], list[str]]:
    """The target and feed-forward modules IA3 rescales: the section's, else ``model_type``'s family defaults."""
    default_targets, default_feedforward = FAMILY_TARGETS.get(model_type or "", (DEFAULT_TARGETS, DEFAULT_FEEDFORWARD))
    chosen = list(targets or default_targets)
    ff = list(feedforward) if feedforward is not None else [m for m in default_feedforward if m in chosen]
    return chosen, ff


def ia3_memory(inputs: MemoryInputs) -> MemoryTerms:
    cfg = inputs.settings["ia3"]
    shape = inputs.shape
    a = inputs.dtype_bytes
    targets, feedforward = ia3_targets(cfg.target_modules, cfg.feedforward_modules, shape.model_type)
    params = saved = largest = 0
    for layer in shape.layer_linears():        # an MoE layer: its attention's (the experts are no nn.Linear)
        for generic, d_in, d_out in layer:
            name = shape.module_name(generic)  # the family's own name, as target_modules lists it
            if name not in targets:
                continue
            width = d_in if name in feedforward else d_out
            params, largest = params + width, max(largest, width)
            saved += 4 * d_in if name in feedforward else a * d_out
    layers = shape.num_layers
    return MemoryTerms(  # the same under autocast: checked in tests/test_estimate_precision.py
        autocast_checked=True,
        trainable_params=params, weights=base_weight_bytes(inputs) + 4 * params,
        param_bytes=4, largest_trainable=largest, act_bytes=a, per_token_layer=inputs.block(a).frozen + saved // layers,
        per_layer=4 * params // layers,
        notes=(f"IA3 on {', '.join(targets)} (feed-forward: {', '.join(feedforward) or 'none'}), fp32 vectors over "
               f"a frozen {inputs.dtype} base",))
