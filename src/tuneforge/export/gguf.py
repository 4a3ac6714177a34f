"""Write a merged model as one GGUF file for llama.cpp / Ollama, and check it round-trips.

The file is written with the ``gguf`` package's :class:`gguf.GGUFWriter` (llama.cpp's own converter is a
script, not a library), following llama.cpp's conventions (its ``convert_hf_to_gguf.py``) for the two
architectures tuneforge writes, each described once in :data:`ARCHITECTURES` (metadata keys, tensor names,
weight transforms, what it refuses):

* ``general.architecture = llama`` (transformers ``model_type`` ``llama``): metadata ``llama.context_length``,
  ``embedding_length``, ``block_count``, ``feed_forward_length``, ``rope.dimension_count`` (the head dim),
  ``rope.freq_base``, ``attention.head_count`` / ``head_count_kv``, ``attention.layer_norm_rms_epsilon``;
  ``q_proj`` and ``k_proj`` rows are permuted as llama.cpp expects (its RoPE pairs dims ``(i, i + d/2)`` of
  each head as adjacent ``(2i, 2i+1)``): ``W.reshape(heads, 2, d / 2, in).swapaxes(1, 2).reshape(out, in)``,
  with the KV head count for ``k_proj``; transformers undoes exactly this when it loads a GGUF.
* ``general.architecture = gemma3`` (``model_type`` ``gemma3_text``, ``Gemma3ForCausalLM``): the same sizes
  plus ``attention.key_length`` / ``value_length`` (the head dim), ``rope.freq_base`` (global layers) and
  ``rope.freq_base_swa`` (sliding layers), ``attention.sliding_window`` and
  ``attention.sliding_window_pattern`` (one bool per layer: llama.cpp otherwise assumes 5 sliding layers in
  6), ``final_logit_softcapping`` when set. No Q/K permutation (llama.cpp runs Gemma 3 with NeoX-style RoPE,
  as transformers does); every ``*norm.weight`` is written as ``1 + w`` (transformers' Gemma RMSNorm scales
  by ``1 + w``, llama.cpp's by ``w``); llama.cpp scales the embeddings by ``sqrt(hidden)`` itself. Refused:
  ``query_pre_attn_scalar`` other than the head dim (llama.cpp scales queries by ``1 / sqrt(head_dim)``),
  attention soft-capping, RoPE scaling, an activation other than ``gelu_pytorch_tanh``, bidirectional
  attention.
* both: ``vocab_size``, ``general.file_type`` and the quantization version; tensors renamed to llama.cpp's
  names (``blk.N.attn_q.weight`` ...). Tied embeddings are written once as ``token_embd.weight`` and no
  ``output.weight`` (llama.cpp then uses the embedding as output).
* the tokenizer, by the kind of ``tokenizer.json``: a byte-level BPE (``tokenizer.ggml.model = gpt2``):
  tokens by id, token types (control for special added tokens, user-defined for other added tokens, unused
  for ids the tokenizer does not fill), merges, the pre-tokenizer name; or a SentencePiece-style BPE (byte
  fallback, no byte-level pre-tokenizer: Gemma's; ``tokenizer.ggml.model = llama``): tokens, token types
  (byte for ``<0xNN>``), scores (``-id`` for normal tokens: SentencePiece merges in vocabulary order, as in
  Gemma's own GGUF; ``-1000`` for added tokens, 0 for bytes, as there) and ``add_space_prefix``. Both with
  the bos/eos/unk/pad ids, ``add_bos_token`` and the chat template used in training.
* weight types: 1-D tensors (norms) stay F32; 2-D tensors are F16, or Q8_0 / Q4_0 blocks of 32 quantized
  by ``gguf.quants.quantize`` (numpy). With ``q4_0`` the token embedding (also the output layer when tied)
  is Q8_0, as llama.cpp keeps its output layer at a higher precision. A tensor whose row length is not a
  multiple of 32 falls back to F16.

:func:`export_gguf` merges a run (reusing :mod:`tuneforge.export.merge`, which checks the merge itself),
writes the file, and then checks the round trip: transformers loads the GGUF (de-permuting Q/K, subtracting
Gemma's norm shift and de-quantizing; for gemma3 with the merged folder's config, as transformers does not
read Gemma 3's sliding-window pattern or local RoPE base from a GGUF, and the sizes it does read must equal
that config's), and (1) its logits must equal those of the merged model whose weights were rounded the same
way in numpy, within ``1e-4 * max(1, max|logit|)`` (the file holds exactly those weights, in the right
places), (2) its logits differ from the merged model's by the quantization's own effect, reported, and its
greedy tokens agree wherever the merged model's top-2 margin exceeds twice that difference, and (3) its
tokenizer encodes the chat-formatted prompts to the same ids as the run's tokenizer.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

QUANTS = ("f16", "q8_0", "q4_0")
BLOCK = 32
FLOOR = 1e-4          # relative to max(1, max |logit|): "equal" in fp32
# llama.cpp's ``tokenizer.ggml.pre`` by vocabulary (:func:`vocabulary_sha256`); SmolLM2's as in its shipped GGUF
KNOWN_PRE = {"e86e5bd807a389e104ea676661ca970d502d7d97301f42c57685dad1eb423aac": "smollm"}


class ExportCheckError(RuntimeError):
    """The GGUF file does not reproduce the merged model; the message holds the report."""


class UnsupportedModelError(ValueError):
    """The model's architecture or features cannot be written as GGUF by tuneforge."""


# ------------------------------------------------------------------------------------------------ tensors

def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for ``q_proj`` (``n_head`` heads) or ``k_proj`` (KV heads): ``[out, in]`` -> same shape."""
    out = weight.shape[0]
    return weight.reshape(n_head, 2, out // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


_LLAMA_LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                "mlp.down_proj.weight": "ffn_down.weight"}
# Gemma 3: four norms per block (llama.cpp's ffn_norm is the pre-feed-forward one) and query/key norms
_GEMMA3_LAYER = {**_LLAMA_LAYER, "post_attention_layernorm.weight": "post_attention_norm.weight",
                 "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                 "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
                 "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}


@dataclass(frozen=True)
class GGUFArchitecture:
    """How one transformers architecture is written as llama.cpp's ``general.architecture = name``."""

    name: str                                   # general.architecture, also the prefix of its metadata keys
    model_types: tuple[str, ...]                # transformers config.model_type values written this way
    layer_tensors: dict[str, str]               # "<rest>" of model.layers.N.<rest> -> llama.cpp's name in blk.N
    metadata: Callable[[Any, dict[str, Any]], None]     # (writer, config): the {name}.* keys
    problems: Callable[[dict[str, Any]], list[str]]     # config -> what this writer cannot express
    permute_qk: bool = False                    # llama.cpp's interleaved RoPE row order for q_proj / k_proj
    norm_shift: float = 0.0                     # added to every *norm.weight (Gemma's (1 + w) RMSNorm)


def _head_dims(config: dict[str, Any]) -> tuple[int, int, int]:
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    return n_head, n_kv, config.get("head_dim") or config["hidden_size"] // n_head


def _rope(config: dict[str, Any], layer_type: str | None = None) -> dict[str, Any]:
    """The RoPE parameters (of one layer type where the config has them per type: Gemma 3)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if layer_type is not None and layer_type in rope:
        return rope[layer_type] or {}
    return rope


def _rope_type(rope: dict[str, Any]) -> str:
    return rope.get("rope_type") or rope.get("type") or "default"


def _llama_problems(config: dict[str, Any]) -> list[str]:
    problems = []
    rope = _rope(config)
    if _rope_type(rope) != "default":
        problems.append(f"rope scaling {_rope_type(rope)!r} is not written to GGUF by tuneforge yet")
    if config.get("attention_bias") or config.get("mlp_bias"):
        problems.append("attention or MLP biases are not written to GGUF by tuneforge yet")
    return problems


def _llama_metadata(writer: Any, config: dict[str, Any]) -> None:
    n_head, n_kv, head_dim = _head_dims(config)
    hidden = config["hidden_size"]
    theta = _rope(config).get("rope_theta", config.get("rope_theta", 10000.0))
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(theta))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    if head_dim != hidden // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))


def gemma3_layer_types(config: dict[str, Any]) -> list[str]:
    """``sliding_attention`` / ``full_attention`` per layer (older configs: every ``sliding_window_pattern``-th
    layer full, 6 by default)."""
    if config.get("layer_types"):
        return list(config["layer_types"])
    pattern = config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or 6
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(config["num_hidden_layers"])]


def _gemma3_rope_bases(config: dict[str, Any]) -> tuple[float, float]:
    """RoPE base of the global (full-attention) and of the sliding layers."""
    full = _rope(config, "full_attention").get("rope_theta", config.get("rope_theta", 1_000_000.0))
    local = _rope(config, "sliding_attention").get("rope_theta", config.get("rope_local_base_freq", 10_000.0))
    return float(full), float(local)


def _gemma3_problems(config: dict[str, Any]) -> list[str]:
    _, _, head_dim = _head_dims(config)
    problems = []
    for kind in ("full_attention", "sliding_attention"):
        if _rope_type(_rope(config, kind)) != "default":
            problems.append(f"rope scaling {_rope_type(_rope(config, kind))!r} ({kind}) is not written to GGUF by "
                            "tuneforge yet")
    if config.get("attention_bias"):
        problems.append("attention biases are not written to GGUF by tuneforge yet")
    if config.get("attn_logit_softcapping"):
        problems.append("attention soft-capping: llama.cpp's gemma3 has none")
    scalar = config.get("query_pre_attn_scalar", head_dim)
    if scalar != head_dim:
        problems.append(f"query_pre_attn_scalar {scalar} != head_dim {head_dim}: llama.cpp's gemma3 scales queries "
                        "by 1 / sqrt(head_dim)")
    activation = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
    if activation != "gelu_pytorch_tanh":
        problems.append(f"activation {activation!r}: llama.cpp's gemma3 uses tanh-approximated GELU")
    if config.get("use_bidirectional_attention"):
        problems.append("bidirectional attention (an embedding model): not a gemma3 causal LM")
    return problems


def _gemma3_metadata(writer: Any, config: dict[str, Any]) -> None:
    n_head, n_kv, head_dim = _head_dims(config)
    full_base, local_base = _gemma3_rope_bases(config)
    writer.add_context_length(config.get("max_position_embeddings", 131072))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(full_base)
    layer_types = gemma3_layer_types(config)
    if config.get("sliding_window") and "sliding_attention" in layer_types:
        writer.add_sliding_window(int(config["sliding_window"]))
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
        writer.add_rope_freq_base_swa(local_base)
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))


LLAMA = GGUFArchitecture("llama", ("llama",), _LLAMA_LAYER, _llama_metadata, _llama_problems, permute_qk=True)
GEMMA3 = GGUFArchitecture("gemma3", ("gemma3_text",), _GEMMA3_LAYER, _gemma3_metadata, _gemma3_problems,
                          norm_shift=1.0)
ARCHITECTURES = {t: arch for arch in (LLAMA, GEMMA3) for t in arch.model_types}


def gguf_architecture(config: dict[str, Any]) -> GGUFArchitecture:
    """The architecture ``config`` (a transformers ``config.json``) is written as; refuses (one message naming
    every problem) what tuneforge cannot write."""
    model_type = config.get("model_type")
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise UnsupportedModelError(f"model_type {model_type!r}: tuneforge writes GGUF for "
                                    f"{', '.join(sorted(ARCHITECTURES))} only")
    problems = arch.problems(config)
    if problems:
        raise UnsupportedModelError(f"model_type {model_type!r} cannot be written to GGUF: {'; '.join(problems)}")
    return arch


def gguf_tensor_name(hf_name: str, arch: GGUFArchitecture = LLAMA) -> str | None:
    """llama.cpp's name for a transformers tensor of ``arch`` (None for ``lm_head.weight``, handled by the
    caller)."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": None}
    if hf_name in fixed:
        return fixed[hf_name]
    parts = hf_name.split(".")
    if len(parts) < 5 or parts[:2] != ["model", "layers"]:
        raise UnsupportedModelError(f"tensor {hf_name!r} has no {arch.name} GGUF name")
    layer, rest = parts[2], ".".join(parts[3:])
    if rest not in arch.layer_tensors:
        raise UnsupportedModelError(f"tensor {hf_name!r} has no {arch.name} GGUF name")
    return f"blk.{layer}.{arch.layer_tensors[rest]}"


def to_gguf_layout(hf_name: str, weight: np.ndarray, config: dict[str, Any], arch: GGUFArchitecture) -> np.ndarray:
    """``weight`` as llama.cpp expects it in the file: Q/K rows permuted (llama), norms shifted (Gemma)."""
    if arch.permute_qk:
        n_head, n_kv, _ = _head_dims(config)
        if hf_name.endswith("q_proj.weight"):
            return permute_qk(weight, n_head)
        if hf_name.endswith("k_proj.weight"):
            return permute_qk(weight, n_kv)
    if arch.norm_shift and hf_name.endswith("norm.weight"):
        return (weight + np.float32(arch.norm_shift)).astype(np.float32)
    return weight


def tensor_type(hf_name: str, shape: tuple[int, ...], quant: str) -> Any:
    """The GGML type of one tensor under ``quant`` (see the module docstring)."""
    from gguf import GGMLQuantizationType as T

    if len(shape) == 1:
        return T.F32
    if quant == "f16" or shape[-1] % BLOCK:
        return T.F16
    if quant == "q4_0" and hf_name in ("model.embed_tokens.weight", "lm_head.weight"):
        return T.Q8_0
    return {"q8_0": T.Q8_0, "q4_0": T.Q4_0}[quant]


def round_trip(weight: np.ndarray, qtype: Any) -> np.ndarray:
    """``weight`` (fp32) as the file will hold it: quantized to ``qtype`` and de-quantized again, fp32."""
    from gguf.quants import dequantize, quantize

    return dequantize(quantize(np.ascontiguousarray(weight, dtype=np.float32), qtype), qtype).reshape(weight.shape)


def _file_type(quant: str) -> int:
    from gguf import LlamaFileType

    return {"f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0,
            "q4_0": LlamaFileType.MOSTLY_Q4_0}[quant]


def _weights(model_dir: Path) -> dict[str, np.ndarray]:
    """The tensors of the ``*.safetensors`` files in ``model_dir`` as fp32 numpy arrays (read through torch:
    numpy has no bf16)."""
    from safetensors import safe_open

    tensors: dict[str, np.ndarray] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                tensors[k] = st.get_tensor(k).float().numpy()
    if not tensors:
        raise FileNotFoundError(f"{model_dir} holds no *.safetensors weights")
    return tensors


# ---------------------------------------------------------------------------------------------- tokenizer

def vocabulary_sha256(tokens: list[str], merges: list[str]) -> str:
    """sha256 of a BPE vocabulary (tokens by id, then merges): the key of :data:`KNOWN_PRE`."""
    return hashlib.sha256(("\n".join(tokens) + "\0" + "\n".join(merges)).encode()).hexdigest()


def _token_pre(tokens: list[str], merges: list[str]) -> str:
    """llama.cpp's pre-tokenizer name for a known vocabulary (:data:`KNOWN_PRE`), else ``default``."""
    pre = KNOWN_PRE.get(vocabulary_sha256(tokens, merges))
    if pre is None:
        log.warning("tokenizer not recognised: writing tokenizer.ggml.pre = 'default' (llama.cpp's default "
                    "pre-tokenizer regex); check that llama.cpp tokenizes like transformers")
        return "default"
    return pre


def _is_sentencepiece_bpe(data: dict[str, Any]) -> bool:
    """A BPE ``tokenizer.json`` converted from SentencePiece (Gemma's, Llama 2's): byte fallback and no
    byte-level pre-tokenizer; llama.cpp reads such a vocabulary as ``tokenizer.ggml.model = llama``."""
    model = data.get("model") or {}
    return bool(model.get("byte_fallback")) and "ByteLevel" not in json.dumps(data.get("pre_tokenizer"))


def _is_byte_piece(token: str) -> bool:
    return len(token) == 6 and token.startswith("<0x") and token.endswith(">")


def _adds_special(tok: Any, token_id: int | None, first: bool) -> bool:
    """Whether encoding a text adds ``token_id`` at its start (``first``) or end: a tokenizer whose BOS comes
    from its ``tokenizer.json`` post-processor (Gemma's, as transformers saves it) says so nowhere else."""
    if token_id is None:
        return False
    ids = tok("a")["input_ids"]
    plain = tok("a", add_special_tokens=False)["input_ids"]
    if not ids or len(ids) == len(plain):
        return False
    return (ids[0] if first else ids[-1]) == token_id


def tokenizer_metadata(model_dir: Path, vocab_size: int) -> dict[str, Any]:
    """Tokens, token types, merges or scores, special ids, add_bos and chat template of the BPE tokenizer in
    ``model_dir`` (``model``: ``gpt2`` for a byte-level BPE, ``llama`` for a SentencePiece-style one)."""
    from transformers import AutoTokenizer

    data = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedModelError(f"{model_dir / 'tokenizer.json'}: tokenizer type {model.get('type')!r}; "
                                    "tuneforge writes BPE tokenizers to GGUF only")
    spm = _is_sentencepiece_bpe(data)
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in data.get("added_tokens") or []}
    tokens, types, scores = [], [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(3 if added[i].get("special") else 4)       # CONTROL, USER_DEFINED
            scores.append(-1000.0)
        elif i in by_id:
            tokens.append(by_id[i])
            byte = spm and _is_byte_piece(by_id[i])
            types.append(6 if byte else 1)                           # BYTE, NORMAL
            scores.append(0.0 if byte else -float(i))                # SentencePiece merges in vocabulary order
        else:
            tokens.append(f"[PAD{i}]")
            types.append(5)                                          # UNUSED
            scores.append(-1000.0)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    template = tok.chat_template
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text()
    add_bos = bool(getattr(tok, "add_bos_token", False)) or _adds_special(tok, tok.bos_token_id, first=True)
    out = {"tokens": tokens, "types": types,
           "bos": tok.bos_token_id, "eos": tok.eos_token_id, "unk": tok.unk_token_id,
           "pad": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
           "add_bos": add_bos, "chat_template": template}
    if spm:
        normalizer = json.dumps(data.get("normalizer"))
        add_eos = bool(getattr(tok, "add_eos_token", False)) or _adds_special(tok, tok.eos_token_id, first=False)
        return {**out, "model": "llama", "pre": "default", "scores": scores, "merges": [], "add_eos": add_eos,
                "add_space_prefix": '"Prepend"' in normalizer}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return {**out, "model": "gpt2", "merges": merges, "pre": _token_pre(tokens, merges)}


# ------------------------------------------------------------------------------------------------ writing

def write_gguf(model_dir: str | Path, out_file: str | Path, quant: str = "f16", name: str | None = None,
               ) -> dict[str, str]:
    """Write the transformers folder ``model_dir`` (an architecture of :data:`ARCHITECTURES`) as the GGUF file
    ``out_file``; return tensor -> type.

    ``quant``: ``f16``, ``q8_0`` or ``q4_0`` (2-D tensors; norms stay F32). The file is written to
    ``<out_file>.partial`` and renamed when complete.
    """
    import gguf

    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {', '.join(QUANTS)} (got {quant!r})")
    model_dir, out_file = Path(model_dir), Path(out_file)
    config = json.loads((model_dir / "config.json").read_text())
    arch = gguf_architecture(config)
    tensors = _weights(model_dir)
    tied = config.get("tie_word_embeddings", False) or "lm_head.weight" not in tensors
    vocab = config["vocab_size"]
    tok = tokenizer_metadata(model_dir, vocab)

    partial = out_file.with_name(out_file.name + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(partial), arch.name)
    writer.add_name(name or model_dir.name)
    writer.add_type(gguf.GGUFType.MODEL)
    arch.metadata(writer, config)
    writer.add_vocab_size(vocab)
    writer.add_file_type(_file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model(tok["model"])
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    if tok["model"] == "gpt2":
        writer.add_token_types(tok["types"])
        writer.add_token_merges(tok["merges"])
    else:
        writer.add_token_scores(tok["scores"])
        writer.add_token_types(tok["types"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if tok[key] is not None:
            add(int(tok[key]))
    writer.add_add_bos_token(tok["add_bos"])
    if tok["model"] == "llama":
        writer.add_add_eos_token(tok["add_eos"])
        writer.add_add_space_prefix(tok["add_space_prefix"])
    if tok["chat_template"]:
        writer.add_chat_template(tok["chat_template"])

    types: dict[str, str] = {}
    for hf_name in sorted(tensors, key=_tensor_order):
        target = gguf_tensor_name(hf_name, arch)
        if target is None:                       # lm_head
            if tied:
                continue
            target = "output.weight"
        data = to_gguf_layout(hf_name, tensors[hf_name], config, arch)
        qtype = tensor_type(hf_name, data.shape, quant)
        raw = gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)
        writer.add_tensor(target, raw, raw_dtype=qtype if qtype not in (gguf.GGMLQuantizationType.F32,
                                                                         gguf.GGMLQuantizationType.F16) else None)
        types[target] = qtype.name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    partial.replace(out_file)
    return types


def _tensor_order(name: str) -> tuple[int, int, str]:
    """token_embd first, then the blocks in numeric order, then the output norm and output."""
    if name == "model.embed_tokens.weight":
        return (0, 0, name)
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "layers":
        return (1, int(parts[2]), name)
    return (2, 0, name)


# ----------------------------------------------------------------------------------------- round trip check

@dataclass
class ExportReport:
    """Where the GGUF went, its size and types, and how closely it reproduces the merged model."""

    out_file: str
    quant: str
    size_bytes: int = 0
    tensor_types: dict[str, int] = field(default_factory=dict)
    checked: bool = False
    format_diff: float = 0.0        # GGUF vs merged-with-the-same-rounding: must be ~0
    quant_diff: float = 0.0         # GGUF vs merged (fp32): the quantization's own effect
    scale: float = 1.0
    greedy_agreement: list[tuple[int, int]] = field(default_factory=list)   # (agreeing tokens, generated)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.tensor_types.items()))
        lines = [f"export gguf -> {self.out_file} ({self.quant}, {self.size_bytes / 2**20:.1f} MiB; tensors: {types})"]
        if self.checked:
            agree = ", ".join(f"{a}/{n}" for a, n in self.greedy_agreement)
            lines.append(f"  round trip (transformers): max |logit diff| vs same-rounded weights "
                         f"{self.format_diff:.3g} (must be <= {FLOOR * self.scale:.3g}); vs merged fp32 "
                         f"{self.quant_diff:.3g}; greedy agreement {agree} tokens "
                         f"{'OK' if self.passed else 'FAILED'}")
        lines += [f"  problem: {p}" for p in self.problems]
        return "\n".join(lines)


def _rounded_state_dict(model_dir: Path, quant: str) -> dict[str, Any]:
    """The weights of ``model_dir`` as a GGUF reader gets them back: rounded to the file's types (Gemma's norms
    rounded as ``1 + w`` in fp32, then shifted back). Q/K row permutations need no undoing: quantization blocks
    lie within rows."""
    import torch

    arch = gguf_architecture(json.loads((Path(model_dir) / "config.json").read_text()))
    out = {}
    for name, w in _weights(model_dir).items():
        shift = np.float32(arch.norm_shift if name.endswith("norm.weight") else 0.0)
        rounded = round_trip(w + shift, tensor_type(name, w.shape, quant)) - shift if shift else \
            round_trip(w, tensor_type(name, w.shape, quant))
        out[name] = torch.from_numpy(rounded.copy())
    return out


def _load_gguf_model(gguf_file: Path, merged_dir: Path, arch: GGUFArchitecture, report: ExportReport,
                     trust_remote_code: bool = False) -> Any:
    """transformers' model from ``gguf_file``. For llama its config comes from the file; for gemma3 from
    ``merged_dir`` (transformers reads neither its sliding-window pattern nor its local RoPE base from a GGUF),
    and every size transformers does read from the file must equal that config's."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs: dict[str, Any] = {"gguf_file": gguf_file.name, "dtype": torch.float32}
    if arch is not LLAMA:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = AutoConfig.from_pretrained(str(merged_dir), trust_remote_code=trust_remote_code)
        read = load_gguf_checkpoint(str(gguf_file), return_tensors=False)["config"]
        for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "rms_norm_eps", "sliding_window", "vocab_size",
                    "max_position_embeddings"):
            want = getattr(config, key, None)
            if key in read and want is not None and not np.isclose(float(read[key]), float(want), rtol=1e-6):
                report.problems.append(f"the GGUF's {key} is {read[key]}, the model's {want}")
        kwargs["config"] = config
    return AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), **kwargs).eval()


def check_gguf(gguf_file: str | Path, merged_dir: str | Path, quant: str, prompts: list[str],
               max_new_tokens: int = 8, trust_remote_code: bool = False) -> ExportReport:
    """Load ``gguf_file`` with transformers and compare it with the merged folder (see the module docstring);
    ``trust_remote_code``: the run's own setting, for a merged folder whose model ships its own code."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.export.merge import _encode

    gguf_file, merged_dir = Path(gguf_file), Path(merged_dir)
    report = ExportReport(str(gguf_file), quant, checked=True)
    arch = gguf_architecture(json.loads((merged_dir / "config.json").read_text()))
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir), trust_remote_code=trust_remote_code)
    loaded_tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    loaded = _load_gguf_model(gguf_file, merged_dir, arch, report, trust_remote_code)
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32,
                                                  trust_remote_code=trust_remote_code).eval()
    rounded = copy.deepcopy(merged)
    missing, unexpected = rounded.load_state_dict(_rounded_state_dict(merged_dir, quant), strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        report.problems.append(f"weights do not fit the model: missing {missing[:3]} unexpected {unexpected[:3]}")
    if (loaded_tok.chat_template or "") != (tokenizer.chat_template or ""):
        report.problems.append("the chat template in the GGUF differs from the run's")
    with torch.no_grad():
        for prompt in prompts:
            ids = _encode(tokenizer, prompt)
            gguf_ids = _encode(loaded_tok, prompt)
            if gguf_ids.tolist() != ids.tolist():
                report.problems.append(f"{prompt[:40]!r}: the GGUF tokenizer gives other token ids")
            out = merged.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
            seq = out                                          # prompt + the merged model's greedy tokens
            ref = merged(input_ids=seq, use_cache=False).logits[0]
            got = loaded(input_ids=seq, use_cache=False).logits[0]
            same = rounded(input_ids=seq, use_cache=False).logits[0]
            report.scale = max(report.scale, ref.abs().max().item())
            report.format_diff = max(report.format_diff, (got - same).abs().max().item())
            diff = (got - ref).abs().max().item()
            report.quant_diff = max(report.quant_diff, diff)
            # teacher-forced greedy agreement on the merged model's own continuation
            start, n = ids.shape[1] - 1, seq.shape[1] - ids.shape[1]
            top2 = ref[start:start + n].topk(2, dim=-1).values
            margins = top2[:, 0] - top2[:, 1]
            agree_steps = got[start:start + n].argmax(-1) == seq[0, start + 1:start + 1 + n]
            agree = int(agree_steps.long().cumprod(0).sum().item())
            report.greedy_agreement.append((agree, n))
            for step in range(n):
                if not agree_steps[step] and margins[step] > 2 * diff:
                    report.problems.append(f"{prompt[:40]!r}: greedy token {step} differs although the merged "
                                           f"model's margin {margins[step].item():.3g} > 2 x {diff:.3g}")
                    break
    if report.format_diff > FLOOR * report.scale:
        report.problems.append(f"logits differ from the same-rounded merged model by {report.format_diff:.3g} "
                               f"> {FLOOR * report.scale:.3g}: a tensor is misplaced, mis-permuted or mis-shifted")
    return report


# ------------------------------------------------------------------------------------------------- export

def export_gguf(run_dir: str | Path, out_file: str | Path | None = None, quant: str = "f16", check: bool = True,
                check_prompts: list[str] | None = None, max_new_tokens: int = 8,
                allow_regressed: bool = False) -> ExportReport:
    """Merge the run (or package) ``run_dir`` and write it as a GGUF file; check the round trip.

    Full fine-tunes are written as they are; LoRA / DoRA / IA3 / QLoRA adapters are merged first (in fp32,
    with :func:`tuneforge.export.merge.merge_adapter`'s own check); other methods are refused with
    :class:`~tuneforge.methods.errors.NotMergeableError`. ``out_file`` defaults to
    ``<run_dir>/export/<run name>-<quant>.gguf``. Raises :class:`ExportCheckError` when the check fails
    (the file is left in place for inspection).
    """
    from tuneforge.export.merge import DEFAULT_PROMPTS, _refuse, merge_adapter, refuse_reward_model
    from tuneforge.export.package import _run_files
    from tuneforge.models.remote_code import check_remote_code
    from tuneforge.runs import RunDir, run_trusts_remote_code, verify_base_model

    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {', '.join(QUANTS)} (got {quant!r})")
    run_dir = Path(run_dir)
    refuse_reward_model(run_dir, "a GGUF export")
    config, method, _ = _run_files(run_dir, allow_regressed)
    trust = run_trusts_remote_code(run_dir, config.trust_remote_code)
    check_remote_code(str(run_dir), run_dir, trust)        # a full fine-tune of a model with its own code
    out = Path(out_file) if out_file else RunDir(run_dir).export_dir / f"{run_dir.resolve().name}-{quant}.gguf"
    prompts = list(check_prompts or DEFAULT_PROMPTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".merge-", dir=out.parent) as tmp:
        if method.is_full_model:
            merged_dir = run_dir
        else:
            _refuse(config.method)
            verify_base_model(run_dir, config.model)
            merged_dir = Path(tmp) / "merged"
            log.info("merging %s (fp32) before writing GGUF", run_dir)
            merge_adapter(config.model, run_dir, merged_dir, dtype="fp32", method=config.method,
                          check_prompts=prompts[:1], tokenizer_dir=run_dir, trust_remote_code=trust)
        types = write_gguf(merged_dir, out, quant, name=run_dir.resolve().name)
        report = check_gguf(out, merged_dir, quant, prompts, max_new_tokens, trust) if check else \
            ExportReport(str(out), quant)
        if not method.is_full_model:
            shutil.rmtree(merged_dir, ignore_errors=True)
    report.size_bytes = out.stat().st_size
    report.tensor_types = {}
    for t in types.values():
        report.tensor_types[t] = report.tensor_types.get(t, 0) + 1
    log.info("%s", report)
    if not report.passed:
        raise ExportCheckError(str(report))
    return report
