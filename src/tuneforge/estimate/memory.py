"""Peak training memory of one tuneforge training step, by component, before any model is loaded.

``estimate_memory(shape, method, seq, batch)`` returns a :class:`MemoryEstimate` in bytes. Notation: ``P``
parameters, ``d`` hidden size, ``I`` MLP width, ``L`` layers, ``H``/``KV`` query/key-value heads of size
``hd``, ``q = H*hd``, ``kv = KV*hd``, ``V`` vocabulary, ``r`` LoRA rank. A step packs ``batch`` examples of
``seq`` tokens into one padding-free row of ``T = batch*seq`` tokens (see :mod:`tuneforge.data.packing`);
``K = trained_fraction * T`` of them carry a loss. ``a`` is the bytes of an activation element (2 for
bf16, 4 for fp32), ``b = 4`` the bytes of a LoRA adapter element (peft keeps adapters in fp32).

Static memory
-------------
* weights: ``P*a`` (full, lora base); LoRA adds ``4 * r*(d_in+d_out)`` per target linear. QLoRA stores
  each decoder linear in NF4 (0.5 B/param) plus one absmax per block of 64 (4 B, or 1 B + 4 B per 256
  blocks with double quant); embeddings, norms and an untied ``lm_head`` stay unquantized and peft's
  ``prepare_model_for_kbit_training`` upcasts them to fp32.
* gradients: one per trainable parameter, in its dtype.
* optimizer: AdamW keeps ``m`` and ``v`` in the dtype of the tensor it updates (torch's behaviour), so 8 B
  per LoRA parameter and ``2*a`` per full-tuning parameter; with ``master_weights`` (classic mixed
  precision) the optimizer updates an fp32 copy: 4 + 8 = 12 B per parameter. ``adamw_8bit``: 2 B.

Activations saved for backward, per token and per decoder layer (derived op by op from the Llama block
in transformers with SDPA, counting tensors autograd saves; checked exactly against
``torch.autograd.graph.saved_tensors_hooks`` in ``tests/test_estimate.py``)::

    RMSNorm  y = w * (x * rsqrt(mean(x^2) + eps)), computed in fp32:
        tuneforge's one-function RMSNorm (the default, :mod:`tuneforge.kernels.rms_norm`) saves x (a*d)
        and rsqrt(.) (4): ``n = a*d + 4``; transformers' module saves x in fp32 (4d) and rsqrt(.) (4), and
        when w trains the normalized x (a*d): ``n = 4d + 4 (+ a*d full)``. Its output y (a*d) is saved by
        the projections that read it when their weights train.
    attention (q, k, v projections, RoPE, SDPA, o projection):
        RoPE saves only cos/sin (shared by all layers); SDPA (flash / memory-efficient kernels) saves its
        inputs q, k, v and its output (a*(2q + 2kv)) plus the fp32 log-sum-exp (4H). The output is the
        o projection's input. A packed row of several examples:
        - ``attention="packed_sdpa"`` (tuneforge's default, :mod:`tuneforge.kernels.packed_attention`):
          one causal SDPA per example, no mask, k/v not repeated; the per-example outputs are
          concatenated, so the o projection's input is a separate copy (a*q) when something saves it
          uncast (full tuning; LoRA in the adapters' dtype without a dropped copy);
        - ``attention="sdpa"`` (transformers' dense path): a block-causal mask; transformers repeats k
          and v to H heads (kv -> q) and SDPA saves a float copy of the T x T mask (a*T per token).
    SwiGLU MLP  down(silu(gate(x)) * up(x)):
        silu saves gate(x); the product saves silu(.) and up(.); down saves the product: 4*a*I.

    full : 2*(n + a*d) + a*(2q + 2kv) + 4H + 4a*I      [packed: + a*q (packed_sdpa) or a*T (sdpa)]
    lora : 2*n + a*(2q + 2kv) + 4H + 3a*I + 7*b*r     [packed: as full, a*q only when a = b]
           + what the 7 LoRA ``A`` projections save of their inputs (widths 5d + q + I in all; 2d + q + I
             over the 4 groups that read one input: q/k/v, o, gate/up, down):
             tuneforge's fused forward (the default, :mod:`tuneforge.methods.lora.layer`): one bool
               dropout mask per group (2d + q + I; 5d + q + I without ``shared_dropout_mask``) + the
               distinct inputs x: b*(2d + I) when a = b (the o input is counted above), else one fp32
               cast per group, b*(2d + q + I) (b*(5d + q + I) unshared);
             peft's forward with dropout: mask (m*w) + dropped copy (b*w) per projection =
               (m + b)*(5d + q + I) (m = b on CPU, a float mask; m = 1 on CUDA, a bool mask);
             peft's forward without dropout: b*(2d + I) when a = b, else b*(5d + q + I).

A frozen weight needs no saved input (autograd saves an input only for the gradient that needs it), so
LoRA drops the projection inputs and the product before ``down`` (and, with transformers' norms, their
normalized outputs); peft's dropout copies cost more than that saves (with dropout 0.05 LoRA on
SmolLM2-135M would store 74% more per token than full tuning in fp32 on CPU, 69,612 vs 39,980 B per
layer); the fused forward stores 1 byte per input element of each group instead (43,692 B). QLoRA is LoRA
with ``a = 4``: the fp32 embeddings make the residual stream fp32, and bitsandbytes' 4-bit matmul saves no
input.

For SmolLM2-135M in fp32 on CPU (``d = q = 576, kv = 192, I = 1536``, one example per row): full 39,980 B
(44,588 with transformers' norms), lora (fused forward, dropout 0.05) 43,692 B per token per layer, i.e.
1.20 MB / 1.31 MB per token for the 30 layers.

Gradient checkpointing (transformers, non-reentrant, per decoder layer) keeps only each layer's input
(``a*d`` per token per layer) and recomputes one layer at a time in backward, so activations are
``T*(L*a*d + one layer of the above) + the layer's backward working set`` (about ``a*(3I + 2d)``).

Logits: with ``logits_to_keep`` the LM head runs on the ``K`` target positions only. The loss
(:mod:`tuneforge.kernels.cross_entropy`) upcasts them to fp32 and keeps their fp32 log-probabilities,
which backward turns into the gradient in place; the most is held at the end of the forward, the logits
and their log-probabilities: ``8*K*V`` bytes in fp32, ``(a + 8)*K*V`` with ``a``-byte logits (their fp32
copy too). When the fp32 logits would pass 256 MiB the trainer's chunked loss
(:mod:`tuneforge.kernels.chunked_loss`) holds one chunk of 1024 positions at a time instead:
``12*1024*V + 4*K``.

Peak: gradients are allocated (``zero_grad(set_to_none=True)``) while backward frees activations, and the
optimizer's temporaries exist only in ``step()``, so::

    peak = weights + optimizer + overhead + max(activations + logits,  gradients + step temporaries)

Step temporaries: tuneforge trains with torch's fused AdamW (:mod:`tuneforge.kernels.optimizer`), which
holds none; torch's for-loop AdamW (its default on CPU) holds two copies of the largest tensor (``sqrt(v)``
and its quotient); the foreach AdamW (its default on CUDA) holds a list as large as all
optimizer-updated parameters (documented in ``torch.optim``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tuneforge.estimate.shapes import ModelShape, resolve_shape

GIB = 1024 ** 3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
METHODS = ("full", "lora", "qlora")
ATTENTIONS = ("packed_sdpa", "sdpa")
CHUNKED_LOSS_BUDGET, CHUNKED_LOSS_CHUNK = 256 * 2 ** 20, 1024   # as tuneforge.kernels.chunked_loss
# Fixed runtime memory not in any tensor: CUDA context + cuBLAS workspaces on a GPU. On CPU the
# validation subtracts the process's memory before the model loads, so the term is 0 there.
DEFAULT_OVERHEAD = {"cpu": 0, "cuda": int(0.75 * GIB)}


@dataclass
class MemoryEstimate:
    """Predicted memory of one training step, in bytes; ``peak`` is what to compare with a device's size."""
    model: str
    method: str
    seq: int
    batch: int
    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    logits: int
    step_temporaries: int
    overhead: int
    trainable_params: int
    total_params: int
    assumptions: list[str] = field(default_factory=list)

    @property
    def backward_peak(self) -> int:
        return self.activations + self.logits

    @property
    def step_peak(self) -> int:
        return self.gradients + self.step_temporaries

    @property
    def peak(self) -> int:
        return self.weights + self.optimizer_states + self.overhead + max(self.backward_peak, self.step_peak)

    @property
    def peak_phase(self) -> str:
        return "backward" if self.backward_peak >= self.step_peak else "optimizer step"

    def rows(self) -> list[tuple[str, int]]:
        return [("weights", self.weights), ("gradients", self.gradients), ("optimizer states", self.optimizer_states),
                ("activations", self.activations), ("logits", self.logits),
                ("optimizer step temporaries", self.step_temporaries), ("runtime overhead", self.overhead)]

    def table(self) -> str:
        """A plain-text table of the components and the peak, in GiB."""
        head = (f"{self.model}  method={self.method}  seq={self.seq}  batch={self.batch}  "
                f"trainable={self.trainable_params:,} of {self.total_params:,}")
        lines = [head, "-" * len(head)]
        lines += [f"  {name:<28}{_gib(value):>10}" for name, value in self.rows()]
        lines.append(f"  {'peak (' + self.peak_phase + ')':<28}{_gib(self.peak):>10}")
        lines.append("  peak = weights + optimizer + overhead "
                     "+ max(activations + logits, gradients + step temporaries)")
        lines += [f"  - {a}" for a in self.assumptions]
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def activation_bytes_per_token_layer(shape: ModelShape, method: str, act_bytes: int, packed: bool,
                                     lora_r: int = 16, lora_dropout: float = 0.05, device: str = "cpu",
                                     attention: str = "packed_sdpa", fused_forward: bool = True,
                                     shared_dropout_mask: bool = True, fused_rms_norm: bool = True) -> int:
    """Bytes one decoder layer saves for backward per token (without the ``a*T`` mask term of dense ``sdpa``)."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention {attention!r}: use one of {', '.join(ATTENTIONS)}")
    d, i, q, h = shape.hidden_size, shape.intermediate_size, shape.q_width, shape.num_heads
    dense = packed and attention == "sdpa"
    kv = q if (dense and shape.num_kv_heads != shape.num_heads) else shape.kv_width  # repeat_kv under a mask
    a = act_bytes
    b = 4  # adapters in fp32
    attention_bytes = a * (2 * q + 2 * kv) + 4 * h
    norm = a * d + 4 if fused_rms_norm else 4 * d + 4 + (a * d if method == "full" else 0)
    if method == "full":
        o_copy = a * q if (packed and not dense) else 0
        return 2 * (norm + a * d) + attention_bytes + 4 * a * i + o_copy
    widths = 5 * d + q + i
    group_widths = 2 * d + q + i if shared_dropout_mask else widths   # one mask / fp32 copy per group
    if fused_forward:
        masks = group_widths if lora_dropout > 0 else 0
        adapters = masks + (b * (2 * d + i) if a == b else b * group_widths)
    elif lora_dropout > 0:
        m = b if device == "cpu" else 1
        adapters = (m + b) * widths
    else:
        adapters = b * (2 * d + i) if a == b else b * widths
    saves_o_input = a == b and (lora_dropout == 0 or fused_forward)
    o_copy = a * q if (packed and not dense and saves_o_input) else 0
    return 2 * norm + attention_bytes + 3 * a * i + adapters + 7 * b * lora_r + o_copy


def estimate_memory(shape: ModelShape | str, method: str, seq: int, batch: int = 1, *,
                    gradient_checkpointing: bool = False, lora_r: int = 16, lora_dropout: float = 0.05,
                    fused_forward: bool = True, shared_dropout_mask: bool = True, attention: str = "packed_sdpa",
                    fused_rms_norm: bool = True, chunked_loss: str = "auto",
                    dtype: str = "bf16", trained_fraction: float = 1.0, master_weights: bool = False,
                    optimizer: str = "adamw", optimizer_impl: str | None = None, double_quant: bool = True,
                    device: str = "cuda", overhead: int | None = None) -> MemoryEstimate:
    """Predict the peak memory of one training step of ``method`` on ``shape`` (see the module docstring).

    ``seq``: tokens per example; ``batch``: examples packed into one row (``T = seq*batch`` tokens);
    ``trained_fraction``: share of the ``T`` tokens with a loss (1.0 for raw text; ~0.3 for chat SFT on
    the assistant turns). ``dtype``: weights and activations (``bf16`` on GPUs; tuneforge trains in fp32 on
    CPUs without native bf16). ``master_weights``: full tuning keeps an fp32 copy that AdamW updates
    (classic mixed precision; ``tuneforge train`` does not). ``optimizer_impl``: ``for-loop``,
    ``foreach`` or ``fused`` (default: ``fused``, as ``tuneforge train``).
    ``attention``: ``packed_sdpa`` (tuneforge's per-example attention) or ``sdpa`` (dense block mask);
    ``fused_forward``, ``shared_dropout_mask``: as the ``lora`` config keys (tuneforge's or peft's forward);
    ``fused_rms_norm``, ``chunked_loss``: as the run config's keys (``auto``: chunked when the fp32 logits
    would exceed 256 MiB).
    """
    shape = resolve_shape(shape)
    if method not in METHODS:
        raise ValueError(f"method {method!r}: the estimator knows {', '.join(METHODS)}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r}: use one of {', '.join(DTYPE_BYTES)}")
    if device not in DEFAULT_OVERHEAD:
        raise ValueError(f"device {device!r}: use cpu or cuda")
    if not 0 < trained_fraction <= 1:
        raise ValueError("trained_fraction must be in (0, 1]")
    if seq < 1 or batch < 1:
        raise ValueError("seq and batch must be >= 1")
    optimizer_impl = optimizer_impl or "fused"
    w = DTYPE_BYTES[dtype]
    a = 4 if method == "qlora" else w  # qlora: fp32 embeddings make the residual stream fp32
    d, V, L = shape.hidden_size, shape.vocab_size, shape.num_layers
    T = seq * batch
    K = max(1, round(trained_fraction * T))
    packed = batch > 1
    total = shape.num_parameters()
    notes: list[str] = []

    # --- weights, gradients, optimizer
    if method == "full":
        trainable = total
        weights = total * w
        grad_bytes = w
        state_bytes = 4 if master_weights else w
        largest = shape.vocab_size * d
        optimizer_params = trainable
        states = ", AdamW updates an fp32 master copy" if master_weights else ", AdamW states in the parameter dtype"
        notes.append(f"all {total:,} parameters train; weights and gradients in {dtype}" + states)
    else:
        trainable = shape.lora_parameters(lora_r)
        grad_bytes = state_bytes = 4
        largest = max(lora_r * max(d_in, d_out) for _, d_in, d_out in shape.linears())
        optimizer_params = trainable
        if method == "lora":
            weights = total * w + trainable * 4
            notes.append(f"LoRA r={lora_r} on all 7 decoder linears (fp32 adapters, dropout {lora_dropout}) "
                         f"over a frozen {dtype} base")
        else:
            linear = L * shape.linear_params_per_layer()
            blocks = math.ceil(linear / 64)
            stats = blocks * 1 + math.ceil(blocks / 256) * 4 + L * 7 * 256 * 4 if double_quant else blocks * 4
            weights = linear // 2 + stats + (total - linear) * 4 + trainable * 4
            notes.append(f"QLoRA: decoder linears NF4{' + double quant' if double_quant else ''}; embeddings and norms "
                         f"upcast to fp32 by peft; LoRA r={lora_r} all-linear in fp32; activations fp32")
    gradients = trainable * grad_bytes
    if optimizer == "adamw":
        optimizer_states = trainable * 2 * state_bytes + (trainable * 4 if (method == "full" and master_weights) else 0)
    elif optimizer == "adamw_8bit":
        optimizer_states = trainable * 2 + (trainable * 4 if (method == "full" and master_weights) else 0)
        notes.append("8-bit AdamW (bitsandbytes): 2 B/param of state")
    else:
        raise ValueError(f"optimizer {optimizer!r}: use adamw or adamw_8bit")
    notes.append(f"AdamW, {optimizer_impl} step")

    if optimizer_impl == "fused" or optimizer == "adamw_8bit":
        step_temporaries = 0
    elif optimizer_impl == "foreach":
        step_temporaries = optimizer_params * state_bytes
    else:
        step_temporaries = 2 * largest * state_bytes
    if method == "full" and shape.tie_word_embeddings:
        # the embedding backward builds a dense V x d gradient and autograd adds it to the tied lm_head's
        # out of place: two V x d temporaries beside the gradients at the end of backward (measured: a
        # tied 49152 x 576 fp32 weight peaks at 3 x 108 MiB in backward and keeps 1 x as its gradient)
        step_temporaries = max(step_temporaries, 2 * V * d * grad_bytes)

    # --- activations
    per_layer = activation_bytes_per_token_layer(shape, method, a, packed, lora_r, lora_dropout, device, attention,
                                                 fused_forward, shared_dropout_mask, fused_rms_norm)
    dense = packed and attention == "sdpa"
    mask_per_layer = a * T * T if dense else 0
    shared = T * T if dense else 0  # the bool block-causal mask transformers builds once
    shared += 2 * T * shape.hd * a + 8 * T  # RoPE cos/sin, token ids
    head = T * (4 * d + (a * d if method == "full" else 0)) + (K * d * a if method == "full" else 0)
    working = T * a * (3 * shape.intermediate_size + 2 * d)
    if gradient_checkpointing:
        activations = T * L * a * d + T * per_layer + mask_per_layer + working + shared + head
        notes.append("gradient checkpointing: layer inputs kept, one layer recomputed at a time")
    else:
        activations = T * L * per_layer + L * mask_per_layer + shared + head
    layout = ("packed row, dense sdpa: T x T mask per layer, k/v repeated" if dense else
              "packed row, per-example sdpa: no mask" if packed else "one example per row: no mask")
    notes.append(f"activations: {per_layer:,} B per token per layer saved for backward ({layout})")
    if chunked_loss == "on" or (chunked_loss == "auto" and 4 * K * V > CHUNKED_LOSS_BUDGET):
        chunk = min(K, CHUNKED_LOSS_CHUNK)
        logits = 12 * chunk * V + 4 * K  # one chunk's logits, probabilities and gradient; one lse a position
        if method == "full":
            logits += 4 * V * d           # the fp32 lm_head gradient accumulated over the chunks
        notes.append(f"chunked loss: logits of {chunk:,} positions at a time (K = {K:,} target positions)")
    else:
        per_logit = 8 if a == 4 else 8 + a      # logits (+ their fp32 copy) and fp32 log-probabilities
        logits = per_logit * K * V
        if method == "full":
            logits = max(logits, 4 * K * V + V * d * grad_bytes)  # lm_head's gradient arrives while 4KV is alive
        notes.append(f"logits at {K:,} target positions (trained_fraction {trained_fraction}): {per_logit} B x K x V")

    overhead = DEFAULT_OVERHEAD[device] if overhead is None else overhead
    if overhead:
        notes.append(f"runtime overhead {_gib(overhead)} ({device})")
    name = shape.name
    return MemoryEstimate(name, method, seq, batch, weights, gradients, optimizer_states, activations, logits,
                          step_temporaries, overhead, trainable, total, notes)


SEED_MODELS = ("7b", "13b", "70b")


def seeds_table(seq: int = 512, batch: int = 1, lora_r: int = 16) -> str:
    """The table people quote: Llama-2 7B/13B/70B x full/LoRA/QLoRA on a GPU, with its assumptions."""
    header = (f"{'model':<12}{'method':<7}{'weights':>10}{'grads':>9}{'optim':>9}{'activ':>9}{'logits':>9}"
              f"{'other':>9}{'peak':>10}")
    lines = [header, "-" * len(header)]
    for model in SEED_MODELS:
        for method in METHODS:
            e = estimate_memory(model, method, seq, batch, gradient_checkpointing=True, lora_r=lora_r, dtype="bf16",
                                master_weights=True, optimizer_impl="fused", device="cuda")
            other = e.overhead + (e.step_temporaries if e.peak_phase == "optimizer step" else 0)
            vals = [e.weights, e.gradients, e.optimizer_states, e.activations, e.logits, other]
            lines.append(f"{e.model:<12}{method:<7}{vals[0] / GIB:>10.1f}"
                         + "".join(f"{v / GIB:>9.1f}" for v in vals[1:]) + f"{e.peak / GIB:>10.1f}")
    lines.append("")
    lines.append("GiB. Assumptions: one GPU; bf16 weights (full, LoRA base); full tuning keeps bf16 gradients "
                 "and an fp32 master copy + AdamW m, v in fp32 (16 B/param); LoRA r=16 on all 7 linears per "
                 "layer, fp32 adapters, dropout 0.05; QLoRA NF4 + double quant, embeddings fp32, fp32 activations; "
                 f"AdamW fused (no step temporaries); seq {seq}, batch {batch}, every token trained, gradient "
                 "checkpointing on; 0.75 GiB CUDA context. peak = weights + optimizer + other + max(activations "
                 "+ logits, gradients).")
    return "\n".join(lines)
