"""The bottleneck adapter's part of the memory estimate (the shared arithmetic and its derivation:
:mod:`tuneforge.estimate.memory`).

Each adapted sub-layer (``adapter.placement``: attention, MLP) gets ``W_down: (b, d)`` with its bias and
``W_up: (d, b)`` with its bias: ``2*d*b + b + d`` fp32 parameters, over a frozen base. Per token, on top of a
frozen block, each adapter saves (``y`` the sub-layer's output, computed in fp32 as the layer does):

* ``y`` in fp32 for ``W_down``'s gradient: ``4d`` (a cast copy in 16 bits, ``y`` itself in fp32);
* ``W_up``'s input: ``4b``;
* what the nonlinearity keeps when it is not ``W_up``'s input: ``z = W_down y`` for gelu and silu (``4b``);
  relu and tanh keep their output, which is ``W_up``'s input unless dropout comes between (then ``4b``);
* with ``dropout > 0``, dropout's mask: ``m*b`` (``m = 4`` on CPU, a float mask; 1 on CUDA).

So ``4d + 4b + 4b [gelu, silu or dropout] + m*b [dropout]`` per adapter, checked exactly against the tensors
autograd saves (``tests/test_estimate_methods.py``).

Under autocast (``bf16-mixed`` / ``fp16-mixed``, ``c`` the compute dtype's bytes) ``W_down`` gets ``y`` cast back
to ``c`` and both products come out in ``c``: ``c*d + c*b + c*b [gelu, silu or dropout] + m*b [dropout]`` per
adapter (``m = c`` on CPU: the float mask is in the activation's dtype), and each adapter's two weights are copied to
``c`` (saved for backward; their biases' copies only cached): ``c*(2*d*b + b + d)`` per adapter. Checked exactly
against ``saved_tensors_hooks`` under ``torch.autocast`` (``tests/test_estimate_precision.py``).
"""

from __future__ import annotations

from tuneforge.methods.memory import MemoryInputs, MemoryTerms, base_weight_bytes

SAVES_INPUT = ("gelu", "silu")      # the nonlinearities whose backward reads their input, not their output


def adapter_memory(inputs: MemoryInputs) -> MemoryTerms:
    cfg = inputs.settings["adapter"]
    shape = inputs.shape
    d, b = shape.hidden_size, cfg.bottleneck
    per_layer = len(cfg.placement)
    trainable = shape.num_layers * per_layer * (2 * d * b + b + d)
    c = inputs.autocast_bytes
    e = c or 4          # the adapter's activations: fp32 without autocast, the compute dtype under it
    mask = (e if inputs.device == "cpu" else 1) * b if cfg.dropout > 0 else 0
    second = e * b if (cfg.nonlinearity in SAVES_INPUT or cfg.dropout > 0) else 0
    adapters = per_layer * (e * d + e * b + second + mask)
    casts = 0 if c is None else c * trainable
    a = inputs.dtype_bytes
    return MemoryTerms(
        trainable_params=trainable, weights=base_weight_bytes(inputs) + 4 * trainable, param_bytes=4,
        largest_trainable=d * b, act_bytes=a, per_token_layer=inputs.block(a).frozen + adapters,
        weight_casts=casts, autocast_checked=True,
        notes=(f"bottleneck adapters b={b} ({cfg.nonlinearity}) after {' and '.join(cfg.placement)} in every layer "
               f"(fp32) over a frozen {inputs.dtype} base",))
