"""Write a LoRA adapter as a GGUF LoRA file for llama.cpp (``llama-cli -m base.gguf --lora adapter.gguf``).

llama.cpp's adapter format (what its ``convert_lora_to_gguf.py`` writes): ``general.type = adapter``,
``general.architecture`` equal to the base model's (``llama`` or ``gemma3``, as
:func:`tuneforge.export.gguf.gguf_architecture` writes it), ``adapter.type = lora`` and
``adapter.lora.alpha``; for every adapted weight ``W`` named ``blk.N.<name>.weight`` in the base GGUF two
tensors ``blk.N.<name>.weight.lora_a`` (peft's ``A``, ``[r, in]``) and ``.lora_b`` (peft's ``B``,
``[out, r]``). llama.cpp computes ``W x + (alpha / r) * B (A x)`` with ``r`` read from ``A``'s shape.

* ``q_proj`` / ``k_proj`` (llama): the base GGUF holds ``W`` with its rows permuted for llama.cpp's RoPE
  (:func:`tuneforge.export.gguf.permute_qk`), so ``B``'s rows are permuted the same way; ``A`` is unchanged.
  gemma3 has no such permutation (and LoRA on a norm, which Gemma's GGUF shifts by 1, is not a LoRA
  target), so its ``A`` and ``B`` are written as they are.
* rsLoRA scales by ``alpha / sqrt(r)``: the file stores ``alpha * sqrt(r)`` so that llama.cpp's
  ``alpha / r`` gives the same scale.
* Refused (one line): DoRA (its magnitude vector has no place in the format), ``modules_to_save``, LoRA
  biases, per-module ranks or alphas (``rank_pattern`` / ``alpha_pattern``: the file holds one alpha), and
  every non-LoRA method: the record of the adapter's method says what keeps an adapter out
  (``Method.runtimes.gguf_lora``, LoRA's in ``methods/lora/export.py``). Tensors are written in F32 (an adapter is
  small).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from tuneforge.export.gguf import UnsupportedModelError, gguf_architecture, gguf_tensor_name, permute_qk


def lora_alpha_for_gguf(adapter_config: dict[str, Any]) -> float:
    """``adapter.lora.alpha`` such that llama.cpp's ``alpha / r`` equals peft's scaling of this adapter."""
    r, alpha = int(adapter_config["r"]), float(adapter_config["lora_alpha"])
    return alpha * math.sqrt(r) if adapter_config.get("use_rslora") else alpha


def _refuse_unless_plain_lora(adapter_config: dict[str, Any], where: Path) -> None:
    """One line naming every problem, unless the saved adapter's method writes a llama.cpp LoRA GGUF
    (``Method.runtimes.gguf_lora``) and finds none in this adapter."""
    from tuneforge.methods.registry import method_for_saved_type

    kind = adapter_config.get("adapter_type") or adapter_config.get("peft_type")
    method = method_for_saved_type(str(kind))
    write = method.runtimes.gguf_lora if method is not None else None
    problems = [f"it is not a LoRA adapter ({kind})"] if write is None else write(adapter_config)
    if problems:
        raise UnsupportedModelError(f"{where}: cannot write a GGUF LoRA file: {'; '.join(problems)}")


def write_gguf_lora(adapter_dir: str | Path, base_config: dict[str, Any], out_file: str | Path,
                    name: str | None = None) -> dict[str, tuple[int, ...]]:
    """Write the peft LoRA adapter in ``adapter_dir`` (for a llama or gemma3 base with ``base_config``) to
    ``out_file``.

    Returns the GGUF tensor names with their numpy shapes. Written to ``<out_file>.partial``, then renamed.
    """
    import gguf
    from safetensors import safe_open

    adapter_dir, out_file = Path(adapter_dir), Path(out_file)
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    _refuse_unless_plain_lora(adapter_config, adapter_dir)
    arch = gguf_architecture(base_config)
    n_head = base_config["num_attention_heads"]
    n_kv = base_config.get("num_key_value_heads") or n_head

    pairs: dict[str, dict[str, np.ndarray]] = {}
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as st:
        for key in st.keys():
            for part in ("lora_A", "lora_B"):
                marker = f".{part}.weight"
                if key.endswith(marker):
                    base_name = key.removeprefix("base_model.model.").removesuffix(marker) + ".weight"
                    pairs.setdefault(base_name, {})[part] = st.get_tensor(key).float().numpy()
                    break
            else:
                raise UnsupportedModelError(f"{adapter_dir}: tensor {key!r} is not a LoRA A/B matrix")
    if not pairs:
        raise UnsupportedModelError(f"{adapter_dir}: no LoRA tensors in adapter_model.safetensors")

    partial = out_file.with_name(out_file.name + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(partial), arch.name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name or adapter_dir.resolve().name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora_alpha_for_gguf(adapter_config))
    shapes: dict[str, tuple[int, ...]] = {}
    for base_name in sorted(pairs):
        ab = pairs[base_name]
        if set(ab) != {"lora_A", "lora_B"}:
            raise UnsupportedModelError(f"{adapter_dir}: {base_name} has only {sorted(ab)}")
        target = gguf_tensor_name(base_name, arch)
        if target is None or base_name.endswith("norm.weight"):
            raise UnsupportedModelError(f"{adapter_dir}: LoRA on {base_name} is not supported in GGUF")
        a, b = ab["lora_A"], ab["lora_B"]
        if arch.permute_qk and base_name.endswith("q_proj.weight"):
            b = permute_qk(b, n_head)
        elif arch.permute_qk and base_name.endswith("k_proj.weight"):
            b = permute_qk(b, n_kv)
        for suffix, tensor in ((".lora_a", a), (".lora_b", b)):
            writer.add_tensor(target + suffix, np.ascontiguousarray(tensor, dtype=np.float32))
            shapes[target + suffix] = tuple(tensor.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    partial.replace(out_file)
    return shapes


def export_gguf_lora(run_dir: str | Path, out_file: str | Path | None = None, allow_regressed: bool = False) -> Path:
    """Write the LoRA adapter of a run or package as ``<run_dir>/export/<name>-lora.gguf`` (or ``out_file``)."""
    from tuneforge.export.merge import refuse_reward_model
    from tuneforge.export.package import _run_files
    from tuneforge.models.registry import resolve_model
    from tuneforge.runs import NotARunError, RunDir, verify_base_model

    run_dir = Path(run_dir)
    refuse_reward_model(run_dir, "a GGUF LoRA export")
    config, method, _ = _run_files(run_dir, allow_regressed)
    if method.is_full_model:
        raise NotARunError(f"{run_dir} is a full fine-tune, not an adapter: export it with --format gguf")
    verify_base_model(run_dir, config.model)
    base_dir = Path(resolve_model(config.model))
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(f"the base model {config.model} is not a local folder with config.json")
    base_config = json.loads((base_dir / "config.json").read_text())
    out = Path(out_file) if out_file else RunDir(run_dir).export_dir / f"{run_dir.resolve().name}-lora.gguf"
    write_gguf_lora(run_dir, base_config, out, name=run_dir.resolve().name)
    return out
