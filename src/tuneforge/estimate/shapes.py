"""Model shapes for the memory estimator: named Llama shapes (no download) or a model's ``config.json``.

A :class:`ModelShape` holds the numbers that decide memory: hidden size ``d``, MLP width ``I``, layers
``L``, query heads ``H``, key/value heads ``KV``, head size ``hd`` and vocabulary ``V``. Parameter counts
follow the Llama block (no biases unless the config says so):

* per layer: ``q: d*H*hd``, ``k, v: d*KV*hd`` each, ``o: H*hd*d``, ``gate, up: d*I`` each, ``down: I*d``,
  two RMSNorm weights of ``d``;
* embeddings ``V*d``, final norm ``d``, and ``lm_head`` ``d*V`` unless tied to the embeddings.

Llama-2-7B: 6,738,415,616; SmolLM2-135M: 134,515,008 (tied embeddings counted once).

Other families (:data:`FAMILIES`, read from ``model_type`` by :func:`shape_from_config`), each counted exactly
(``tests/test_estimate_families.py`` against the tiny model of every family and Gemma 3 270M's checkpoint):

* Gemma 2/3: four RMSNorms per block (``norms_per_layer = 4``), Gemma 3 adds query/key norms (``2*hd``);
  GELU-tanh gated MLP (same shapes as SwiGLU), ``head_dim`` apart from ``d/H``, tied embeddings.
  Gemma 3 270M: 268,098,176 (262,144 x 640 tied embeddings are 63% of it).
* Qwen2: biases on q, k, v; Qwen3: query/key norms.
* Phi-3: fused ``qkv_proj`` (``d x (q + 2kv)``) and ``gate_up_proj`` (``d x 2I``): same counts, fewer linears.
* Qwen3-MoE: per MoE layer ``E`` experts of ``3*d*I_moe`` (all in memory) and a router ``E*d``; attention as
  Qwen3. The experts are stacked 3-D parameters (``gate_up_proj: E x 2I_moe x d``, ``down_proj: E x d x I_moe``),
  not ``nn.Linear``; peft's ``all-linear`` still adapts them (:meth:`ModelShape.lora_targets`).
* GPT-NeoX: LayerNorm with bias (``2d`` per norm), fused ``query_key_value`` with bias, biased ``dense``,
  non-gated MLP ``d x I``, ``I x d`` with biases.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    head_dim: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False      # biases on q, k, v
    mlp_bias: bool = False
    model_type: str = "llama"
    o_bias: bool = False              # bias on the attention's output projection
    norms_per_layer: int = 2
    norm_bias: bool = False           # LayerNorm (GPT-NeoX) rather than RMSNorm
    qk_norm: bool = False             # RMSNorm over each head's query and key (Qwen3, Gemma 3)
    gated_mlp: bool = True            # down(act(gate(x)) * up(x)); False: down(act(up(x)))
    fused_qkv: bool = False
    fused_gate_up: bool = False
    num_experts: int = 0              # MoE: experts per MoE layer (0: dense)
    experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    moe_layers: int = 0               # layers whose MLP is the MoE block
    parallel_residual: bool = False   # GPT-NeoX: attention and MLP read the same input (its two norms, one x)
    eager_attention: bool = False     # transformers' eager attention (Gemma 2: no SDPA path with soft-capping)
    attn_softcapping: bool = False    # tanh soft-capping of the attention scores (Gemma 2)

    @property
    def dense_layers(self) -> int:
        return self.num_layers - self.moe_layers

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def q_width(self) -> int:
        """``H * hd``: width of the query projection (and of the attention output)."""
        return self.num_heads * self.hd

    @property
    def kv_width(self) -> int:
        """``KV * hd``: width of the key and of the value projection."""
        return self.num_kv_heads * self.hd

    def attention_linears(self) -> list[tuple[str, int, int]]:
        d, q, kv = self.hidden_size, self.q_width, self.kv_width
        qkv = [("qkv_proj", d, q + 2 * kv)] if self.fused_qkv else [("q_proj", d, q), ("k_proj", d, kv),
                                                                     ("v_proj", d, kv)]
        return qkv + [("o_proj", q, d)]

    def mlp_linears(self) -> list[tuple[str, int, int]]:
        d, i = self.hidden_size, self.intermediate_size
        if not self.gated_mlp:
            return [("up_proj", d, i), ("down_proj", i, d)]
        gate_up = [("gate_up_proj", d, 2 * i)] if self.fused_gate_up else [("gate_proj", d, i), ("up_proj", d, i)]
        return gate_up + [("down_proj", i, d)]

    def linears(self) -> list[tuple[str, int, int]]:
        """``(name, d_in, d_out)`` of the ``nn.Linear`` layers of one dense decoder block (an MoE block's experts
        are parameters, not linears: :meth:`layer_linears`)."""
        return self.attention_linears() + self.mlp_linears()

    def layer_linears(self) -> list[list[tuple[str, int, int]]]:
        """The linears of each layer (MoE layers: the attention's only)."""
        return ([self.linears()] * self.dense_layers) + ([self.attention_linears()] * self.moe_layers)

    def module_name(self, generic: str) -> str:
        """The family's own name of the linear :meth:`linears` calls ``generic`` (GPT-NeoX: ``query_key_value``,
        ``dense``, ``dense_h_to_4h``, ``dense_4h_to_h``), as a ``target_modules`` entry names it."""
        return MODULE_NAMES.get(self.model_type, {}).get(generic, generic)

    def moe_lora_targets(self) -> list[tuple[str, int, int, int, int]]:
        """What peft's LoRA ``all-linear`` adapts in one MoE layer besides the attention, as
        ``(name, d_in, d_out, copies, rank_factor)``: ``rank_factor * r * copies * (d_in + d_out)`` parameters each.

        peft (0.21, ``utils/transformers_weight_conversion.py``) turns ``all-linear`` on an MoE into
        ``target_parameters`` for the router's weight (``d -> E``, one ``r``) and the experts' stacked weights,
        wrapped by ``lora.ParamWrapper`` with ``r * E`` rows (one rank-``r`` pair per expert): ``down_proj``
        (``I_moe -> d``) at rank ``r`` and the fused ``gate_up_proj`` (``d -> 2 I_moe``) at rank ``2r`` (its
        ``rank_pattern``: the gate's and the up projection's ``r`` side by side)."""
        d, e, im = self.hidden_size, self.num_experts, self.moe_intermediate_size
        return [("gate", d, e, 1, 1), ("experts.gate_up_proj", d, 2 * im, e, 2), ("experts.down_proj", im, d, e, 1)]

    def _biases(self, mlp: bool) -> int:
        d, i = self.hidden_size, self.intermediate_size
        total = (self.q_width + 2 * self.kv_width if self.attention_bias else 0) + (d if self.o_bias else 0)
        if mlp and self.mlp_bias:
            total += (2 * i if self.gated_mlp else i) + d
        return total

    def linear_params_per_layer(self) -> int:
        """Weights (and biases) of the linear layers of one dense block."""
        return sum(d_in * d_out for _, d_in, d_out in self.linears()) + self._biases(mlp=True)

    def norm_params_per_layer(self) -> int:
        """The block's norms (``2d`` each with LayerNorm's bias) and query/key norms."""
        return self.norms_per_layer * self.hidden_size * (2 if self.norm_bias else 1) + (
            2 * self.hd if self.qk_norm else 0)

    def moe_params_per_layer(self) -> int:
        """An MoE layer's experts (all of them: every expert's weights are in memory) and router."""
        e, d = self.num_experts, self.hidden_size
        return e * 3 * d * self.moe_intermediate_size + e * d

    def params_per_layer(self) -> int:
        """One dense layer."""
        return self.linear_params_per_layer() + self.norm_params_per_layer()

    def decoder_params(self) -> int:
        moe = (sum(a * b for _, a, b in self.attention_linears()) + self._biases(mlp=False)
               + self.norm_params_per_layer() + self.moe_params_per_layer())
        return self.dense_layers * self.params_per_layer() + self.moe_layers * moe

    def quantizable_params(self) -> int:
        """The decoder linears' weights and biases (what QLoRA stores in 4 bits)."""
        moe = sum(a * b for _, a, b in self.attention_linears()) + self._biases(mlp=False)
        return self.dense_layers * self.linear_params_per_layer() + self.moe_layers * moe

    def embedding_params(self) -> int:
        """Input embeddings plus the ``lm_head`` when it is not tied to them."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def num_parameters(self) -> int:
        """All parameters, tied embeddings counted once."""
        final_norm = self.hidden_size * (2 if self.norm_bias else 1)
        return self.decoder_params() + self.embedding_params() + final_norm

    def lora_parameters(self, r: int) -> int:
        """LoRA ``all-linear`` (every decoder linear, not ``lm_head``): ``r * (d_in + d_out)`` each; an MoE layer's
        router and experts as :meth:`moe_lora_targets`."""
        dense = sum(r * (d_in + d_out) for layer in self.layer_linears() for _, d_in, d_out in layer)
        moe = sum(f * r * n * (d_in + d_out) for _, d_in, d_out, n, f in self.moe_lora_targets())
        return dense + (self.moe_layers * moe if self.num_experts else 0)


# Llama-2 (7B/13B/70B), Llama-3.x and SmolLM2 shapes from their published config.json files.
NAMED_SHAPES: dict[str, ModelShape] = {
    "7b": ModelShape("llama-2-7b", 4096, 11008, 32, 32, 32, 32000),
    "13b": ModelShape("llama-2-13b", 5120, 13824, 40, 40, 40, 32000),
    "70b": ModelShape("llama-2-70b", 8192, 28672, 80, 64, 8, 32000),
    "llama-3.2-1b": ModelShape("llama-3.2-1b", 2048, 8192, 16, 32, 8, 128256, head_dim=64, tie_word_embeddings=True),
    "llama-3.1-8b": ModelShape("llama-3.1-8b", 4096, 14336, 32, 32, 8, 128256),
    "smollm2-135m": ModelShape("smollm2-135m", 576, 1536, 30, 9, 3, 49152, head_dim=64, tie_word_embeddings=True),
}
ALIASES = {"llama-2-7b": "7b", "llama-2-13b": "13b", "llama-2-70b": "70b", "llama2-7b": "7b", "llama2-13b": "13b",
           "llama2-70b": "70b"}


# model_type -> the family's own names of the linears ModelShape.linears() names Llama's way
MODULE_NAMES: dict[str, dict[str, str]] = {
    "gpt_neox": {"qkv_proj": "query_key_value", "o_proj": "dense", "up_proj": "dense_h_to_4h",
                 "down_proj": "dense_4h_to_h"},
}

# model_type -> what sets its block apart from Llama's (the fields of ModelShape)
FAMILIES: dict[str, dict] = {
    "llama": {}, "mistral": {}, "qwen2": {"attention_bias": True}, "qwen3": {"qk_norm": True},
    "gemma": {}, "gemma2": {"norms_per_layer": 4, "eager_attention": True},
    "gemma3_text": {"norms_per_layer": 4, "qk_norm": True},
    "phi3": {"fused_qkv": True, "fused_gate_up": True}, "qwen3_moe": {"qk_norm": True},
    "gpt_neox": {"attention_bias": True, "o_bias": True, "mlp_bias": True, "norm_bias": True, "gated_mlp": False,
                 "fused_qkv": True},
}


def _moe_fields(config) -> dict:
    experts = getattr(config, "num_experts", 0) or 0
    if not experts:
        return {}
    step = getattr(config, "decoder_sparse_step", 1) or 1
    dense = set(getattr(config, "mlp_only_layers", None) or [])
    moe = sum(1 for i in range(config.num_hidden_layers) if i not in dense and (i + 1) % step == 0)
    return {"num_experts": experts, "experts_per_tok": config.num_experts_per_tok,
            "moe_intermediate_size": config.moe_intermediate_size, "moe_layers": moe}


def shape_from_config(config, name: str = "model") -> ModelShape:
    """The shape of a transformers config of a decoder of a supported family (:data:`FAMILIES`: Llama, Mistral,
    Qwen2/3, Qwen3-MoE, Gemma 1/2/3, Phi-3, GPT-NeoX); ``ValueError`` naming ``model_type`` for any other."""
    model_type = str(getattr(config, "model_type", None))
    if model_type not in FAMILIES:
        raise ValueError(f"{name}: model_type {model_type!r} is not one the estimator knows the block of; supported: "
                         f"{', '.join(FAMILIES)}")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
               if getattr(config, k, None) is None]
    if missing:
        raise ValueError(f"{name}: config.json lacks {', '.join(missing)} (model_type {model_type!r})")
    heads = config.num_attention_heads
    family = dict(FAMILIES[model_type])
    if model_type not in ("qwen2", "gpt_neox"):
        family["attention_bias"] = bool(getattr(config, "attention_bias", False))
        family["o_bias"] = family["attention_bias"] and model_type != "phi3"
    return ModelShape(
        name=name,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        vocab_size=config.vocab_size,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        **{"mlp_bias": bool(getattr(config, "mlp_bias", False)), **family, "model_type": model_type},
        **_moe_fields(config),
        **({"parallel_residual": bool(getattr(config, "use_parallel_residual", False))}
           if model_type == "gpt_neox" else {}),
        **({"attn_softcapping": getattr(config, "attn_logit_softcapping", None) is not None}
           if model_type == "gemma2" else {}),
    )


def resolve_shape(spec: str | ModelShape, trust_remote_code: bool = False) -> ModelShape:
    """``7b``/``13b``/``70b``/``llama-3.2-1b``/``llama-3.1-8b``/``smollm2-135m`` without any download, else a model
    spec of :func:`tuneforge.models.registry.resolve_model` whose ``config.json`` is read (weights are never loaded).
    A model whose config names its own code is refused in one line unless ``trust_remote_code`` (the run's key,
    ``tuneforge estimate --trust-remote-code``)."""
    if isinstance(spec, ModelShape):
        return spec
    key = spec.strip().lower()
    key = ALIASES.get(key, key)
    if key in NAMED_SHAPES:
        return NAMED_SHAPES[key]
    from transformers import AutoConfig

    from tuneforge.models.registry import resolve_model
    from tuneforge.models.remote_code import check_remote_code

    path = resolve_model(spec)
    check_remote_code(spec, path, trust_remote_code)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return replace(shape_from_config(config, name=spec))
