"""Model shapes for the memory estimator: named Llama shapes (no download) or a model's ``config.json``.

A :class:`ModelShape` holds the numbers that decide memory: hidden size ``d``, MLP width ``I``, layers
``L``, query heads ``H``, key/value heads ``KV``, head size ``hd`` and vocabulary ``V``. Parameter counts
follow the Llama block (no biases unless the config says so):

* per layer: ``q: d*H*hd``, ``k, v: d*KV*hd`` each, ``o: H*hd*d``, ``gate, up: d*I`` each, ``down: I*d``,
  two RMSNorm weights of ``d``;
* embeddings ``V*d``, final norm ``d``, and ``lm_head`` ``d*V`` unless tied to the embeddings.

Llama-2-7B: 6,738,415,616; SmolLM2-135M: 134,515,008 (tied embeddings counted once).
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
    attention_bias: bool = False
    mlp_bias: bool = False

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

    def linears(self) -> list[tuple[str, int, int]]:
        """``(name, d_in, d_out)`` of the seven linear layers of one decoder block."""
        d, i = self.hidden_size, self.intermediate_size
        return [("q_proj", d, self.q_width), ("k_proj", d, self.kv_width), ("v_proj", d, self.kv_width),
                ("o_proj", self.q_width, d), ("gate_proj", d, i), ("up_proj", d, i), ("down_proj", i, d)]

    def linear_params_per_layer(self) -> int:
        """Weights (and biases) of the seven linear layers of one block."""
        total = sum(d_in * d_out for _, d_in, d_out in self.linears())
        if self.attention_bias:
            total += 2 * self.q_width + 2 * self.kv_width
        if self.mlp_bias:
            total += 2 * self.intermediate_size + self.hidden_size
        return total

    def params_per_layer(self) -> int:
        return self.linear_params_per_layer() + 2 * self.hidden_size

    def embedding_params(self) -> int:
        """Input embeddings plus the ``lm_head`` when it is not tied to them."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def num_parameters(self) -> int:
        """All parameters, tied embeddings counted once."""
        return self.num_layers * self.params_per_layer() + self.embedding_params() + self.hidden_size

    def lora_parameters(self, r: int) -> int:
        """LoRA ``all-linear`` (every decoder linear, not ``lm_head``): ``r * (d_in + d_out)`` each."""
        return self.num_layers * sum(r * (d_in + d_out) for _, d_in, d_out in self.linears())


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


def shape_from_config(config, name: str = "model") -> ModelShape:
    """The shape of a transformers config of a Llama-like decoder (Llama, Mistral, Qwen2, SmolLM2, ...)."""
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
               if getattr(config, k, None) is None]
    if missing:
        raise ValueError(f"{name}: config.json lacks {', '.join(missing)}: the estimator needs a Llama-like decoder "
                         f"(model_type {getattr(config, 'model_type', '?')!r})")
    heads = config.num_attention_heads
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
        attention_bias=bool(getattr(config, "attention_bias", False)),
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
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
