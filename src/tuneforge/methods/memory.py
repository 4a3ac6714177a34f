"""What a method tells the memory estimator: the types of the :class:`~tuneforge.methods.registry.Method` record's
``memory`` hook, ``memory(inputs: MemoryInputs) -> MemoryTerms``.

The estimator (:mod:`tuneforge.estimate.memory`, whose docstring is the derivation) owns the arithmetic every
method shares: the model's shape, the bytes one frozen or trained Llama block saves for backward
(:class:`BlockActivations`), the logits, the optimizer and the peak. A method's hook adds what only it knows:
how many parameters train and in which dtype, what its weights take, and what its layers save per token on top
of the block's. The hook is a pure function of plain numbers (no torch, nothing above ``methods/``), so each
method keeps its formulas in its own folder (``methods/<method>/memory.py``) and a new method is estimated
as soon as it is registered.

Notation as the estimator's: ``d`` hidden size, ``I`` MLP width, ``L`` layers, ``H``/``KV`` query/key-value
heads of ``hd``, ``q = H*hd``, ``kv = KV*hd``, ``V`` vocabulary, ``a`` bytes of an activation element, ``T``
tokens of the packed row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


class Shape(Protocol):
    """A Llama-like decoder's shape, as :class:`tuneforge.estimate.shapes.ModelShape` holds it (read-only)."""

    @property
    def name(self) -> str: ...

    @property
    def hidden_size(self) -> int: ...

    @property
    def intermediate_size(self) -> int: ...

    @property
    def num_layers(self) -> int: ...

    @property
    def num_heads(self) -> int: ...

    @property
    def num_kv_heads(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def tie_word_embeddings(self) -> bool: ...

    @property
    def hd(self) -> int: ...

    @property
    def q_width(self) -> int: ...

    @property
    def kv_width(self) -> int: ...

    def linears(self) -> list[tuple[str, int, int]]: ...

    def attention_linears(self) -> list[tuple[str, int, int]]: ...

    @property
    def experts_per_tok(self) -> int: ...

    @property
    def moe_intermediate_size(self) -> int: ...

    @property
    def dense_layers(self) -> int: ...

    def linear_params_per_layer(self) -> int: ...

    def layer_linears(self) -> list[list[tuple[str, int, int]]]: ...

    def quantizable_params(self) -> int: ...

    def num_parameters(self) -> int: ...

    @property
    def model_type(self) -> str: ...

    @property
    def num_experts(self) -> int: ...

    @property
    def moe_layers(self) -> int: ...

    def module_name(self, generic: str) -> str: ...

    def moe_lora_targets(self) -> list[tuple[str, int, int, int, int]]: ...


def moe_block(shape: Shape, a: int) -> tuple[int, int]:
    """Bytes an MoE block (``E`` experts, ``k`` per token, width ``I_moe``) saves per token: frozen, and on top when
    its experts' weights train (or carry LoRA: peft's ``ParamWrapper`` multiplies by ``W + BA``, so autograd saves
    what it saves for a trained weight). Frozen: each active expert's ``gate_up`` output (``2a*I_moe``) and
    ``act(gate)`` (``a*I_moe``), the router's fp32 probabilities (``4E``), each expert's output and routing weight
    (``k*(a*d + 4)``), and four int64 index vectors of ``k`` per token (the router's top-k, the sort by expert and
    its inverse, the scatter back). Trained: each active expert's gathered input and ``down``'s input
    (``k*(a*d + a*I_moe)``). Exact against ``saved_tensors_hooks`` on the tiny Qwen3-MoE."""
    d, k, im, e = shape.hidden_size, shape.experts_per_tok, shape.moe_intermediate_size, shape.num_experts
    return 3 * a * im * k + 4 * e + k * (a * d + 4) + 4 * 8 * k, k * (a * d + a * im)


@dataclass(frozen=True)
class BlockActivations:
    """Bytes one Llama decoder block saves for backward per token, by part, for activations of ``a`` bytes
    (the estimator's derivation; checked against ``torch.autograd.graph.saved_tensors_hooks``).

    Attributes:
        norm: one RMSNorm with a frozen weight (``a*d + 4`` fused, ``4d + 4`` transformers' module).
        norm_weight: what a norm saves on top when its weight trains (transformers' module: its normalized
            ``x``, ``a*d``; 0 fused).
        attention: SDPA's inputs q, k, v and output, and the fp32 log-sum-exp: ``a*(2q + 2kv) + 4H`` (``kv``
            is ``q`` where k and v are repeated to every head: a dense mask, an explicit one).
        o_copy: the o projection's input when tuneforge's per-example attention concatenated it (``a*q``,
            packed rows) and something keeps it uncast; 0 otherwise.
        mlp: SwiGLU with frozen weights: ``gate(x)``, ``silu(.)`` and ``up(.)``: ``3a*I`` (non-gated MLP:
            the activation's input, ``a*I``; MoE: ``k`` active experts' ``3a*I_moe`` + router probabilities
            ``4E`` + each expert's output and routing weight ``k*(a*d + 4)``).
        act_bytes: ``a``.
        extra: what the family adds to a frozen block: norms beyond two (Gemma 2/3: ``2n``) and query/key norms
            (``a*(q + kv) + 4*(H + KV)``).
        mlp_trained: what the MLP saves on top when its weights train (the input of ``down``, ``a*I``; MoE:
            ``k*(a*d + a*I_moe)``, the gathered input and the product of each active expert).
        trained_extra: what else the block saves when its weights train: transformers' query/key norms' normalized
            inputs (``a*(q + kv)``).
        o_input: the o projection's input where the family's attention copies it (fused q/k/v, eager attention:
            ``a*q``), saved when o's weight trains or its LoRA ``A`` reads it.
    """

    norm: int
    norm_weight: int
    attention: int
    o_copy: int
    mlp: int
    act_bytes: int
    extra: int = 0
    mlp_trained: int = 0
    trained_extra: int = 0
    o_input: int = 0

    @property
    def frozen(self) -> int:
        """A block whose weights are all frozen and through which the gradient still flows."""
        return 2 * self.norm + self.attention + self.mlp + self.extra


@dataclass(frozen=True)
class MemoryInputs:
    """What the estimator knows of a run when it asks a method's ``memory`` hook.

    Attributes:
        shape: the model's :class:`Shape`.
        settings: the run config's method sections (``settings["lora"]`` is a ``LoraConfig``); every registered
            section is there, with its defaults where the run did not set it.
        dtype: the base's dtype as loaded (``bf16``, ``fp16``, ``fp32``); ``dtype_bytes``: ``w``, its bytes.
        seq, batch: tokens per example and examples packed into the row (``T = seq * batch``).
        attention: ``packed_sdpa`` (per-example attention) or ``sdpa`` (transformers' dense block mask).
        device: ``cpu`` or ``cuda``.
        block: ``(a, explicit_mask=False) -> BlockActivations`` of this shape and row for activations of ``a``
            bytes; ``explicit_mask``: attention under a mask passed in (k, v repeated to every head, no
            per-example split), as a prefix's.
        precision: the run's ``precision:`` mode (``fp32``, ``bf16-mixed``, ``bf16-true``, ``fp16-mixed``;
            :mod:`tuneforge.estimate.precision`); ``dtype`` is already the base's dtype under it (fp32 for a full
            fine-tune in a mixed mode: the master weights).
        autocast_bytes: ``c``, the bytes of the dtype ``torch.autocast`` computes matrix products in (2 under
            ``bf16-mixed`` / ``fp16-mixed``); None without autocast.
    """

    shape: Shape
    settings: Mapping[str, Any]
    dtype: str
    dtype_bytes: int
    seq: int
    batch: int
    attention: str
    device: str
    block: Callable[..., BlockActivations]
    precision: str = "fp32"
    autocast_bytes: int | None = None

    @property
    def tokens(self) -> int:
        """``T``: tokens of the packed row."""
        return self.seq * self.batch

    @property
    def packed(self) -> bool:
        """Whether the row holds several examples."""
        return self.batch > 1


@dataclass(frozen=True)
class MemoryTerms:
    """A method's part of the estimate of one training step (bytes, and element counts where named so).

    Attributes:
        trainable_params: parameters that train (elements).
        weights: every weight in memory: the base as the method stores it plus what the method adds.
        param_bytes: bytes of a trained element; its gradient and AdamW's ``m`` and ``v`` take as many.
        largest_trainable: elements of the largest trained tensor (torch's for-loop AdamW holds two of them).
        act_bytes: ``a``, bytes of the residual stream's activations.
        per_token_layer: bytes one decoder layer saves for backward per token of the row.
        per_layer: bytes one decoder layer saves whatever the row's length (a prefix's keys and values).
        extra_tokens: tokens the method adds to the row the layers see (a soft prompt per example).
        shared: bytes saved once for the whole step outside the layers (a prefix's mask, its key/value cache).
        explicit_mask: the method passes attention a mask of its own (counted in ``shared``): neither
            tuneforge's per-example attention nor transformers' block mask runs.
        trains_head: the final norm and the LM head train (their inputs are saved, the head's gradient arrives
            while the logits are alive).
        master_copy: the method trains the base's own weights (full tuning): under a mixed ``precision:`` they
            load in fp32 (the master weights), under ``bf16-true`` a Kahan-compensated AdamW updates them
            (informational: the estimator reads the method record's ``is_full_model``).
        step_floor: the least memory beside the gradients at the end of backward (a tied embedding's two
            ``V x d`` gradient temporaries).
        load_peak: the most memory while loading the base, where it exceeds ``weights`` (QLoRA quantizing on
            CPU); None: ``weights``.
        weight_casts: bytes of the copies ``torch.autocast`` makes of fp32 weights that require a gradient (in
            the compute dtype), whole model: each is saved for the input's gradient and kept by autocast's cast
            cache until the forward ends (with gradient checkpointing too); 0 without autocast.
        autocast_checked: the activation terms were checked under autocast (else the no-autocast formula is used
            with the base's dtype, and the estimate says so).
        weights_dtype: how the method stores the base, in words, where the precision mode does not say it (QLoRA's
            NF4 base); None: the mode's dtypes.
        notes: the assumptions, one line each.
    """

    trainable_params: int
    weights: int
    param_bytes: int
    largest_trainable: int
    act_bytes: int
    per_token_layer: int
    per_layer: int = 0
    extra_tokens: int = 0
    shared: int = 0
    explicit_mask: bool = False
    trains_head: bool = False
    master_copy: bool = False
    step_floor: int = 0
    load_peak: int | None = None
    weight_casts: int = 0
    autocast_checked: bool = False
    weights_dtype: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


MemoryHook = Callable[[MemoryInputs], MemoryTerms]
"""The ``memory`` field of a :class:`~tuneforge.methods.registry.Method`."""


def base_weight_bytes(inputs: MemoryInputs) -> int:
    """Every base parameter in the dtype it was loaded in: ``P * w``."""
    return inputs.shape.num_parameters() * inputs.dtype_bytes
