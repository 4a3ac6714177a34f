"""Peak training memory of one tuneforge training step, by component, before any model is loaded.

``estimate_memory(shape, method, seq, batch)`` returns a :class:`MemoryEstimate` in bytes. Notation: ``P``
parameters, ``d`` hidden size, ``I`` MLP width, ``L`` layers, ``H``/``KV`` query/key-value heads of size
``hd``, ``q = H*hd``, ``kv = KV*hd``, ``V`` vocabulary, ``r`` LoRA rank. A step packs ``batch`` examples of
``seq`` tokens into one padding-free row of ``T = batch*seq`` tokens (see :mod:`tuneforge.data.packing`);
``K = trained_fraction * T`` of them carry a loss. ``a`` is the bytes of an activation element (2 for
bf16, 4 for fp32), ``b = 4`` the bytes of a LoRA adapter element (peft keeps adapters in fp32).

What a method adds is its own: each :class:`~tuneforge.methods.registry.Method` record has a ``memory`` hook,
``MemoryInputs -> MemoryTerms`` (:mod:`tuneforge.methods.memory`), whose formulas and derivation live in the
method's folder (``methods/<method>/memory.py``): trained parameters and their dtype, weights, what its layers
save per token on top of the block below, tokens or masks it adds. This module keeps what every method shares:
the shape, the Llama block's activations (:func:`llama_block`), the logits, the optimizer and the peak. A method
registered with a ``memory`` hook is estimated like the built-in ones.

Static memory
-------------
* weights: ``P*a`` (full, lora base); LoRA adds ``4 * r*(d_in+d_out)`` per target linear. QLoRA stores
  each decoder linear in NF4 (0.5 B/param) plus one absmax per block of 64 (4 B, or 1 B + 4 B per 256
  blocks with double quant); embeddings, norms and an untied ``lm_head`` stay unquantized and peft's
  ``prepare_model_for_kbit_training`` upcasts them to fp32.
* gradients: one per trainable parameter, in its dtype.
* optimizer: AdamW keeps ``m`` and ``v`` in the dtype of the tensor it updates (torch's behaviour): 8 B per
  fp32 trained parameter. ``adamw_8bit``: 2 B.

Precision (``precision``, :mod:`tuneforge.estimate.precision`): the mode says which dtype each term is in.
Trained parameters, their gradients and AdamW's moments are fp32 in every mode (16 B per trained parameter with
its weight), except full fine-tuning under ``bf16-true``: bf16 weights and gradients, fp32 moments and a bf16
compensation buffer (Kahan-compensated AdamW, a for-loop step holding six fp32 copies of the largest tensor):
2 + 2 + 8 + 2 = 14 B. Under ``bf16-mixed`` / ``fp16-mixed`` full fine-tuning loads the model in fp32 (the master
weights: no separate copy) and autocast's ``c``-byte copies of every weight (saved for backward and cached until
the forward ends) count with the activations; adapter methods keep the frozen base in the compute dtype. What
autocast saves per token is the method's (checked exactly in ``tests/test_estimate_precision.py`` for full, LoRA's
fused forward, adapter, IA3, prefix and prompt; QLoRA, DoRA and peft's LoRA forward use the no-autocast formula
in the base's dtype, and the estimate says so).

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

    frozen : 2*n + a*(2q + 2kv) + 4H + 3a*I     (weights frozen, the gradient flowing through)
    full   : 2*(n + a*d) + a*(2q + 2kv) + 4H + 4a*I      [packed: + a*q (packed_sdpa) or a*T (sdpa)]

and per method (``methods/<method>/memory.py``; ``P`` virtual tokens, ``c`` an adapter's bottleneck):

    lora   : frozen + 7*b*r + what the 7 ``A`` projections save of their inputs (fused forward, peft's,
             dropout; see :mod:`tuneforge.methods.lora.memory`)        [packed: + a*q when a = b]
    qlora  : lora with a = 4
    adapter: frozen + per adapter 4d + 8c (gelu; + dropout's mask)
    ia3    : frozen + a*kv per rescaled output + 4*I per rescaled input; + its vectors (4 B each) per layer
    prompt : frozen, over the T + batch*P tokens of the row
    prefix : frozen with kv = q (its explicit mask repeats k, v), + 2*a*P*q per layer and the a*T*(P+T) mask

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
(:mod:`tuneforge.kernels.chunked_loss`) holds one chunk at a time instead: ``12*c*V + 4*K`` with ``c`` its
``chunk_positions(V)`` (1024 positions, fewer where their fp32 logits pass 256 MiB: 256 for Gemma 3's 262k
vocabulary), only for the model types it applies to (Llama, Mistral, Qwen2/3, Gemma 3 without final
soft-capping); Gemma 2, Phi-3, Qwen3-MoE and GPT-NeoX keep the plain loss.

Families (:data:`tuneforge.estimate.shapes.FAMILIES`): the block above plus ``extra`` per token per layer:
Gemma 2/3's two more norms (``2n``), Qwen3's and Gemma 3's query/key norms (``a*(q + kv) + 4*(H + KV)``;
exact against ``saved_tensors_hooks`` for Gemma 3 in ``tests/test_estimate_families.py``); biases and fused
projections save nothing more; a non-gated MLP (GPT-NeoX) saves ``a*I`` (``2a*I`` trained); an MoE layer
holds every expert's weights but saves activations of the ``k`` active experts only:
``k*3a*I_moe + 4E + k*(a*d + 4) + 32k`` (four int64 index vectors; ``+ k*(a*d + a*I_moe)`` trained; LoRA on the
experts saves peft's ``W + BA`` copies of every expert's weights once per layer). Phi-3 and Qwen3-MoE keep
transformers' RMSNorm, GPT-NeoX a LayerNorm (``a*d + 8``; its parallel residual saves one input for both); a fused
q/k/v keeps its whole output for ``v`` (``+ a*(q + kv)``); Gemma 2's eager attention saves ``3a*q`` and ``a*H*T``
per score tensor (softmax's, tanh's); where the attention copies the o projection's input (fused q/k/v, eager) a
trained o or its LoRA saves it (``a*q``). Exact for full, LoRA and IA3 on every tiny family but Mistral (its window's
mask, -1.6%) in ``tests/test_estimate_families.py``.

Peak: gradients are allocated (``zero_grad(set_to_none=True)``) while backward frees activations, and the
optimizer's temporaries exist only in ``step()``, so::

    peak = weights + optimizer + overhead + max(activations + logits,  gradients + step temporaries)

Step temporaries: tuneforge trains with torch's fused AdamW (:mod:`tuneforge.kernels.optimizer`), which
holds none; torch's for-loop AdamW (its default on CPU) holds two copies of the largest tensor (``sqrt(v)``
and its quotient); the foreach AdamW (its default on CUDA) holds a list as large as all
optimizer-updated parameters (documented in ``torch.optim``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from tuneforge.estimate.precision import PrecisionBytes, mode_for, precision_bytes
from tuneforge.estimate.shapes import ModelShape, resolve_shape
from tuneforge.methods.memory import BlockActivations, MemoryInputs, MemoryTerms, moe_block
from tuneforge.methods.registry import get_method, methods, settings_sections

GIB = 1024 ** 3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ATTENTIONS = ("packed_sdpa", "sdpa")
CHUNKED_LOSS_BUDGET, CHUNKED_LOSS_CHUNK = 256 * 2 ** 20, 1024   # as tuneforge.kernels.chunked_loss
# model types the trainer's chunked loss applies to (chunked_loss.PLAIN_LM_HEAD_TYPES and Gemma 3 while its
# final_logit_softcapping is unset, as in its released configs); the others keep the plain loss
# model types whose RMSNorm tuneforge fuses (kernels.rms_norm's PLAIN and GEMMA classes); the others keep
# transformers' module (its fp32 input and rstd; the normalized input too when the weight trains)
FUSED_NORM_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"})
CHUNKED_LOSS_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma3_text"})
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
    load_peak: int = 0      # the most while loading the base (QLoRA on CPU: above ``weights``); 0: ``weights``
    precision: str = "fp32"
    dtypes: dict[str, str] = field(default_factory=dict)   # row -> which dtype it is in and why

    def __post_init__(self) -> None:
        self.load_peak = max(self.load_peak, self.weights)

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
        head = (f"{self.model}  method={self.method}  precision={self.precision}  seq={self.seq}  batch={self.batch}  "
                f"trainable={self.trainable_params:,} of {self.total_params:,}")
        lines = [head, "-" * len(head)]
        lines += [f"  {name:<28}{_gib(value):>10}" + (f"  {self.dtypes[name]}" if self.dtypes.get(name) else "")
                  for name, value in self.rows()]
        lines.append(f"  {'peak (' + self.peak_phase + ')':<28}{_gib(self.peak):>10}")
        lines.append("  peak = weights + optimizer + overhead "
                     "+ max(activations + logits, gradients + step temporaries)")
        lines += [f"  - {a}" for a in self.assumptions]
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def estimable_methods() -> list[str]:
    """The registered methods that declare their memory terms (``Method.memory``), in registration order."""
    return [m.name for m in methods() if m.memory is not None]


def llama_block(shape: ModelShape, act_bytes: int, packed: bool, attention: str = "packed_sdpa",
                fused_rms_norm: bool = True, explicit_mask: bool = False, seq: int = 1) -> BlockActivations:
    """What one Llama decoder block saves for backward per token, by part (the module docstring's derivation, with
    the families' differences); ``explicit_mask``: attention under a mask the caller passes (transformers repeats k
    and v to every head); ``seq``: tokens an example attends over (eager attention's ``T x T`` terms)."""
    if attention == "flash_varlen":      # flash-attn varlen saves what per-example SDPA saves (q, k, v, out, lse)
        attention = "packed_sdpa"
    if attention not in ATTENTIONS:
        raise ValueError(f"attention {attention!r}: use one of {', '.join(ATTENTIONS)}")
    d, i, q, h = shape.hidden_size, shape.intermediate_size, shape.q_width, shape.num_heads
    a = act_bytes
    masked = explicit_mask or (packed and attention == "sdpa")
    kv = q if (masked and shape.num_kv_heads != shape.num_heads) else shape.kv_width   # repeat_kv under a mask
    fused_rms_norm = fused_rms_norm and shape.model_type in FUSED_NORM_TYPES   # the others keep transformers'
    if shape.norm_bias:      # LayerNorm saves x, its mean and rstd; under a parallel residual both norms read one x
        norm, norm_weight = (a * d // 2 if shape.parallel_residual else a * d) + 8, 0
    else:
        norm, norm_weight = (a * d + 4, 0) if fused_rms_norm else (4 * d + 4, a * d)
    extra = (shape.norms_per_layer - 2) * norm
    trained_extra = 0
    if shape.qk_norm:     # each head's q and k normalized before RoPE: the norm saves its input and rstd
        width, rows = shape.q_width + shape.kv_width, shape.num_heads + shape.num_kv_heads
        extra += (a if fused_rms_norm else 4) * width + 4 * rows
        trained_extra += 0 if fused_rms_norm else a * width    # transformers' norm: the normalized input too
    attn, o_input = a * (2 * q + 2 * kv) + 4 * h, 0
    if shape.eager_attention:   # q and k, v repeated to H heads, softmax's output (and tanh's under soft-capping)
        attn = 3 * a * q + a * h * seq * (2 if shape.attn_softcapping else 1) + seq   # + the bool mask row
        o_input = a * q
    elif shape.fused_qkv:   # v is a view of the fused projection's output: SDPA keeps all of it (q + 2kv wide)
        attn += a * (q + kv)
        o_input = a * q             # the o projection's input is a copy
    mlp, mlp_trained = (3 * a * i if shape.gated_mlp else a * i), a * i
    if shape.num_experts:   # per-layer average over dense and MoE layers (every layer of the released configs)
        moe, moe_trained = moe_block(shape, a)
        L = shape.num_layers
        mlp = (shape.moe_layers * moe + shape.dense_layers * mlp) // L
        mlp_trained = (shape.moe_layers * moe_trained + shape.dense_layers * mlp_trained) // L
    return BlockActivations(
        norm=norm, norm_weight=norm_weight,
        attention=attn, o_copy=a * q if (packed and not masked) else 0, mlp=mlp,
        act_bytes=a, extra=extra, mlp_trained=mlp_trained, trained_extra=trained_extra, o_input=o_input)


def method_settings(settings: Mapping[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """Every registered method section as its pydantic model: ``settings[key]`` (a model or a dict) over the
    section's defaults, then ``overrides`` as ``{"lora": {"r": 8}}``-style dicts (None values dropped)."""
    out: dict[str, Any] = {}
    settings = settings or {}
    for key, model in settings_sections().items():
        value = settings.get(key)
        data = value.model_dump() if isinstance(value, BaseModel) else dict(value or {})
        data.update({k: v for k, v in (overrides.get(key) or {}).items() if v is not None})
        out[key] = model.model_validate(data)
    return out


def memory_inputs(shape: ModelShape, settings: Mapping[str, Any], dtype: str, seq: int, batch: int,
                  attention: str = "packed_sdpa", device: str = "cpu", fused_rms_norm: bool = True,
                  dtype_bytes: int | None = None, precision: str = "fp32",
                  autocast_bytes: int | None = None) -> MemoryInputs:
    """What a method's ``memory`` hook is asked with: this shape and row, ``settings`` from :func:`method_settings`
    (``dtype_bytes``: default ``DTYPE_BYTES[dtype]``; ``dtype``: the base's under ``precision``;
    ``autocast_bytes``: the compute dtype's under autocast)."""
    def block(act_bytes: int, explicit_mask: bool = False) -> BlockActivations:
        return llama_block(shape, act_bytes, batch > 1, attention, fused_rms_norm, explicit_mask,
                           seq * batch if batch > 1 else seq)

    return MemoryInputs(shape, settings, dtype, DTYPE_BYTES[dtype] if dtype_bytes is None else dtype_bytes, seq, batch,
                        attention, device, block, precision, autocast_bytes)


def precision_of(method: str, precision: str) -> PrecisionBytes:
    """``precision``'s dtypes for ``method`` (a full fine-tune when its record's ``is_full_model``)."""
    return precision_bytes(precision, get_method(method).is_full_model)


def method_terms(method: str, inputs: MemoryInputs) -> MemoryTerms:
    """``method``'s memory terms (its record's ``memory`` hook); one line when it declares none."""
    record = get_method(method)
    if record.memory is None:
        raise ValueError(f"method {method!r} declares no memory terms (its Method record's `memory`); the estimator "
                         f"knows {', '.join(estimable_methods())}")
    return record.memory(inputs)


def activation_bytes_per_token_layer(shape: ModelShape, method: str, act_bytes: int, packed: bool,
                                     lora_r: int = 16, lora_dropout: float = 0.05, device: str = "cpu",
                                     attention: str = "packed_sdpa", fused_forward: bool = True,
                                     shared_dropout_mask: bool = True, fused_rms_norm: bool = True,
                                     settings: Mapping[str, Any] | None = None, precision: str | None = None,
                                     seq: int = 1) -> int:
    """Bytes one decoder layer of ``method`` saves for backward per token (without the ``a*T`` mask term of dense
    ``sdpa``), for a base loaded with ``act_bytes`` per element; ``packed``: several examples in the row.
    ``precision``: a mode (its base dtype replaces ``act_bytes``; the mixed modes compute under autocast);
    ``seq``: tokens per example (eager attention saves ``seq``-long rows of scores per token; 1: none)."""
    sections = method_settings(settings, lora={"r": lora_r, "dropout": lora_dropout, "fused_forward": fused_forward,
                                               "shared_dropout_mask": shared_dropout_mask})
    mode, autocast = "fp32", None
    if precision is not None:
        pb = precision_of(method, precision)
        mode, act_bytes, autocast = pb.mode, pb.base_bytes, pb.autocast_bytes
    dtype = {4: "fp32", 2: "bf16"}.get(act_bytes, f"{act_bytes}-byte")
    inputs = memory_inputs(shape, sections, dtype, seq, 2 if packed else 1, attention, device, fused_rms_norm,
                           dtype_bytes=act_bytes, precision=mode, autocast_bytes=autocast)
    return method_terms(method, inputs).per_token_layer


def estimate_memory(shape: ModelShape | str, method: str, seq: int, batch: int = 1, *,
                    gradient_checkpointing: bool = False, lora_r: int | None = None,
                    lora_dropout: float | None = None, fused_forward: bool | None = None,
                    shared_dropout_mask: bool | None = None, attention: str = "packed_sdpa",
                    fused_rms_norm: bool = True, chunked_loss: str = "auto",
                    dtype: str | None = None, trained_fraction: float = 1.0, master_weights: bool = False,
                    optimizer: str = "adamw", optimizer_impl: str | None = None, double_quant: bool | None = None,
                    device: str = "cuda", overhead: int | None = None,
                    settings: Mapping[str, Any] | None = None, precision: str | None = None) -> MemoryEstimate:
    """Predict the peak memory of one training step of ``method`` on ``shape`` (see the module docstring).

    ``seq``: tokens per example; ``batch``: examples packed into one row (``T = seq*batch`` tokens);
    ``trained_fraction``: share of the ``T`` tokens with a loss (1.0 for raw text; ~0.3 for chat SFT on
    the assistant turns). ``precision``: the ``precision:`` mode (``fp32``, ``bf16-mixed``, ``bf16-true``,
    ``fp16-mixed``, or ``auto``: by ``dtype``, as ``precision: auto`` with ``dtype:`` set trains: fp32 -> fp32,
    bf16 -> bf16-true, fp16 -> fp16-mixed); without it ``dtype`` (the base's storage, default bf16) picks as
    ``auto`` does. ``dtype`` with an explicit mode must be the base dtype the mode stores. ``master_weights``
    (deprecated: use ``precision="bf16-mixed"``): the mixed mode of ``dtype``. ``optimizer_impl``: ``for-loop``,
    ``foreach`` or ``fused`` (default: ``fused``, as ``tuneforge train``).
    ``attention``: ``packed_sdpa`` (tuneforge's per-example attention) or ``sdpa`` (dense block mask);
    ``fused_rms_norm``, ``chunked_loss``: as the run config's keys (``auto``: chunked when the fp32 logits
    would exceed 256 MiB). ``settings``: the method sections (``{"adapter": {"bottleneck": 32}}`` or a run
    config's section models), defaults for the rest; ``lora_r``, ``lora_dropout``, ``fused_forward``,
    ``shared_dropout_mask`` (the ``lora`` keys) and ``double_quant`` (``qlora``'s) override them.
    The method's own terms come from its record's ``memory`` hook (``methods/<method>/memory.py``).
    """
    shape = resolve_shape(shape)
    get_method(method)
    if dtype is not None and dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r}: use one of {', '.join(DTYPE_BYTES)}")
    explicit = precision not in (None, "auto")
    mode = mode_for(dtype if (dtype or precision is not None) else "bf16", precision, master_weights, device)
    pb = precision_of(method, mode)
    if explicit and dtype is not None and dtype != pb.base:
        raise ValueError(f"dtype {dtype} with precision {mode}: {mode} stores {method}'s base weights in {pb.base} "
                         "(leave dtype unset)")
    if device not in DEFAULT_OVERHEAD:
        raise ValueError(f"device {device!r}: use cpu or cuda")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention {attention!r}: use one of {', '.join(ATTENTIONS)}")
    if not 0 < trained_fraction <= 1:
        raise ValueError("trained_fraction must be in (0, 1]")
    if seq < 1 or batch < 1:
        raise ValueError("seq and batch must be >= 1")
    if optimizer not in ("adamw", "adamw_8bit"):
        raise ValueError(f"optimizer {optimizer!r}: use adamw or adamw_8bit")
    optimizer_impl = optimizer_impl or "fused"
    sections = method_settings(settings, lora={"r": lora_r, "dropout": lora_dropout, "fused_forward": fused_forward,
                                               "shared_dropout_mask": shared_dropout_mask},
                               qlora={"double_quant": double_quant})
    terms = method_terms(method, memory_inputs(shape, sections, pb.base, seq, batch, attention, device, fused_rms_norm,
                                               precision=mode, autocast_bytes=pb.autocast_bytes))
    a = terms.act_bytes
    c = pb.autocast_bytes           # autocast's compute dtype (None: none)
    compute = pb.autocast or pb.base
    d, V, L = shape.hidden_size, shape.vocab_size, shape.num_layers
    T = seq * batch
    tokens = T + terms.extra_tokens     # what the decoder layers see
    K = max(1, round(trained_fraction * T))
    notes: list[str] = list(terms.notes)

    # --- weights, gradients, optimizer
    trainable = terms.trainable_params
    grad_bytes = terms.param_bytes
    # torch's AdamW keeps m and v in the trained tensor's dtype (fp32 in every mode); bf16-true full fine-tuning's
    # Kahan-compensated AdamW keeps them in fp32 beside bf16 weights, plus a compensation buffer in their dtype
    state_bytes = 4 if pb.compensated else terms.param_bytes
    compensation = trainable * terms.param_bytes if pb.compensated else 0
    gradients = trainable * grad_bytes
    trained = pb.trained if terms.param_bytes == pb.trained_bytes else _dtype_name(terms.param_bytes)
    if optimizer == "adamw":
        optimizer_states = trainable * 2 * state_bytes + compensation
        states = f"AdamW m, v {_dtype_name(state_bytes)}"
    else:
        optimizer_states = trainable * 2 + compensation
        states = "8-bit AdamW m, v"
        notes.append("8-bit AdamW (bitsandbytes): 2 B/param of state")
    if pb.compensated:
        states += f" + compensation {trained} ({mode}: Kahan-compensated AdamW, no fp32 copy)"
        notes.append("Kahan-compensated AdamW (bf16-true full fine-tuning): a for-loop step, six fp32 copies of the "
                     "largest tensor at once")
    else:
        notes.append(f"AdamW, {optimizer_impl} step")
    full = get_method(method).is_full_model
    if full and mode.endswith("-mixed"):
        weights_dtype = f"fp32: the master weights ({mode}; autocast computes in {pb.autocast})"
    elif full:
        weights_dtype = pb.base if mode == "fp32" else f"{pb.base} ({mode})"
    else:
        weights_dtype = f"base {pb.base}{'' if mode == 'fp32' else f' ({mode})'} + trained {trained}"
    if terms.weights_dtype:
        weights_dtype = f"{terms.weights_dtype} ({mode})"
    grads_dtype = trained if mode == "fp32" else f"{trained} ({mode}: as the trained parameters)"

    if pb.compensated:
        step_temporaries = 6 * 4 * terms.largest_trainable   # grad, denom, weight, update, p.float(), their difference
    elif optimizer_impl == "fused" or optimizer == "adamw_8bit":
        step_temporaries = 0
    elif optimizer_impl == "foreach":
        step_temporaries = trainable * state_bytes
    else:
        step_temporaries = 2 * terms.largest_trainable * state_bytes
    step_temporaries = max(step_temporaries, terms.step_floor)

    # --- activations
    per_layer = terms.per_token_layer
    dense = batch > 1 and attention == "sdpa" and not terms.explicit_mask
    mask_per_layer = (c or a) * tokens * tokens if dense else 0     # SDPA's float mask, cast by autocast too
    shared = tokens * tokens if dense else 0  # the bool block-causal mask transformers builds once
    shared += 2 * tokens * shape.hd * a + 8 * T + terms.shared  # RoPE cos/sin, token ids, the method's own
    head = tokens * 4 * d + ((T * a * d + K * d * (c or a)) if terms.trains_head else 0)
    working = tokens * a * (3 * shape.intermediate_size + 2 * d)
    if gradient_checkpointing:
        activations = (tokens * L * a * d + tokens * per_layer + terms.per_layer + mask_per_layer + working
                       + shared + head)
        notes.append("gradient checkpointing: layer inputs kept, one layer recomputed at a time")
    else:
        activations = L * (tokens * per_layer + terms.per_layer + mask_per_layer) + shared + head
    activations += terms.weight_casts
    if terms.weight_casts:
        notes.append(f"autocast's {pb.autocast} weight copies: {_gib(terms.weight_casts)} (saved for backward and "
                     "held by autocast's cast cache until the forward ends, with checkpointing too)")
    if c is None:
        where = "" if mode == "fp32" else f"{mode}, "
        acts_dtype = f"{pb.base if a == pb.base_bytes else _dtype_name(a)} ({where}no autocast)"
    elif terms.autocast_checked:
        acts_dtype = (f"{pb.autocast} under autocast ({mode}; norm inputs{' and the residual stream' if a == 4 else ''}"
                      ", softmax statistics fp32)" + (f", + {pb.autocast} weight copies" if terms.weight_casts else ""))
    else:
        acts_dtype = f"{_dtype_name(a)}: the no-autocast formula ({mode}; not checked under autocast for {method})"
        notes.append(f"activations under autocast not checked for {method}: the {_dtype_name(a)} formula without "
                     "autocast")
    layout = ("attention under the method's own mask" if terms.explicit_mask else
              "packed row, dense sdpa: T x T mask per layer, k/v repeated" if dense else
              "packed row, per-example sdpa: no mask" if batch > 1 else "one example per row: no mask")
    notes.append(f"activations: {per_layer:,} B per token per layer saved for backward ({layout})")
    chunkable = shape.model_type in CHUNKED_LOSS_TYPES
    if chunkable and (chunked_loss == "on" or (chunked_loss == "auto" and 4 * K * V > CHUNKED_LOSS_BUDGET)):
        chunk = min(K, CHUNKED_LOSS_CHUNK, max(64, CHUNKED_LOSS_BUDGET // (4 * V)))   # chunk_positions
        logits = 12 * chunk * V + 4 * K  # one chunk's logits, probabilities and gradient; one lse a position
        if terms.trains_head:
            logits += 4 * V * d           # the fp32 lm_head gradient accumulated over the chunks
        notes.append(f"chunked loss: logits of {chunk:,} positions at a time (K = {K:,} target positions)")
    else:
        la = c or a                              # the logits' bytes: autocast's matmul output, else the stream's
        per_logit = 8 if la == 4 else 8 + la    # logits (+ their fp32 copy) and fp32 log-probabilities
        logits = per_logit * K * V
        if terms.trains_head:
            logits = max(logits, 4 * K * V + V * d * grad_bytes)  # lm_head's gradient arrives while 4KV is alive
        notes.append(f"logits at {K:,} target positions (trained_fraction {trained_fraction}): {per_logit} B x K x V")

    overhead = DEFAULT_OVERHEAD[device] if overhead is None else overhead
    if overhead:
        notes.append(f"runtime overhead {_gib(overhead)} ({device})")
    logits_dtype = (f"{compute} logits + fp32 copy and log-probabilities" if (c or a) != 4 else
                    "fp32 logits and log-probabilities")
    dtypes = {"weights": weights_dtype, "gradients": grads_dtype, "optimizer states": f"{states}",
              "activations": acts_dtype, "logits": logits_dtype}
    notes.insert(0, f"precision {mode}: base weights {pb.base}, trained parameters {trained}, "
                    + (f"autocast to {pb.autocast}" if c else "no autocast"))
    return MemoryEstimate(shape.name, method, seq, batch, terms.weights, gradients, optimizer_states, activations,
                          logits, step_temporaries, overhead, trainable, shape.num_parameters(), notes,
                          load_peak=terms.load_peak or 0, precision=mode, dtypes=dtypes)


def _dtype_name(nbytes: int) -> str:
    return {4: "fp32", 2: "bf16", 1: "8-bit"}.get(nbytes, f"{nbytes}-byte")


SEED_MODELS = ("7b", "13b", "70b")


def seeds_table(seq: int = 512, batch: int = 1, lora_r: int = 16, names: list[str] | None = None) -> str:
    """The table people quote: Llama-2 7B/13B/70B x every method with memory terms (``names``: these) on a GPU,
    with its assumptions."""
    header = (f"{'model':<12}{'method':<9}{'weights':>10}{'grads':>9}{'optim':>9}{'activ':>9}{'logits':>9}"
              f"{'other':>9}{'peak':>10}")
    lines = [header, "-" * len(header)]
    for model in SEED_MODELS:
        for method in names or estimable_methods():
            e = estimate_memory(model, method, seq, batch, gradient_checkpointing=True, lora_r=lora_r,
                                precision="bf16-mixed", optimizer_impl="fused", device="cuda")
            other = e.overhead + (e.step_temporaries if e.peak_phase == "optimizer step" else 0)
            vals = [e.weights, e.gradients, e.optimizer_states, e.activations, e.logits, other]
            lines.append(f"{e.model:<12}{method:<9}{vals[0] / GIB:>10.1f}"
                         + "".join(f"{v / GIB:>9.1f}" for v in vals[1:]) + f"{e.peak / GIB:>10.1f}")
    lines.append("")
    lines.append("GiB. Assumptions: one GPU, precision bf16-mixed (tuneforge's default there); full tuning loads "
                 "fp32 master weights with fp32 gradients and AdamW m, v (16 B/param) and autocast's bf16 copies of "
                 "the weights (2 B/param, with the activations); the other methods keep a frozen bf16 base (QLoRA: "
                 "NF4 + double quant, embeddings fp32, fp32 activations) and train fp32 parameters with fp32 "
                 f"gradients and states, each with its section's defaults (LoRA r={lora_r} on all 7 linears, "
                 "dropout 0.05); "
                 f"AdamW fused (no step temporaries); seq {seq}, batch {batch}, every token trained, gradient "
                 "checkpointing on; 0.75 GiB CUDA context. peak = weights + optimizer + other + max(activations "
                 "+ logits, gradients).")
    return "\n".join(lines)
