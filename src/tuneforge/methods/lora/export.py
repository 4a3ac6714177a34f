"""What runtimes outside tuneforge make of a saved LoRA adapter (``adapter_config.json``, peft's ``LORA``): vLLM,
and llama.cpp's LoRA GGUF (``tuneforge export --format gguf-lora``). Read by ``tuneforge package``'s runtime table
and the GGUF LoRA writer through the record's ``runtimes``."""

from __future__ import annotations

from typing import Any

VLLM_DEFAULT_MAX_LORA_RANK = 16        # vLLM's ``--max-lora-rank`` default


def vllm_support(adapter_config: dict[str, Any]) -> dict[str, Any]:
    """Whether vLLM loads the adapter: its ``PEFTHelper`` refuses DoRA (``use_dora``), ``modules_to_save`` and LoRA
    biases; a rank above its default ``--max-lora-rank`` of 16 needs that flag raised (``max_lora_rank``)."""
    if adapter_config.get("use_dora"):
        return {"loads": False, "reason": "vLLM refuses DoRA adapters (use_dora: true); merge it "
                                          "(`tuneforge merge`) and serve the merged model"}
    if adapter_config.get("modules_to_save"):
        return {"loads": False, "reason": f"vLLM refuses modules_to_save ({adapter_config['modules_to_save']})"}
    if adapter_config.get("bias", "none") != "none" or adapter_config.get("lora_bias"):
        return {"loads": False, "reason": "vLLM refuses LoRA biases (bias / lora_bias)"}
    rank = max([int(adapter_config.get("r") or 0), *map(int, (adapter_config.get("rank_pattern") or {}).values())])
    return {"loads": True, **({"max_lora_rank": rank} if rank > VLLM_DEFAULT_MAX_LORA_RANK else {})}


def gguf_lora_problems(adapter_config: dict[str, Any]) -> list[str]:
    """What keeps the adapter out of llama.cpp's LoRA GGUF (``[]``: it can be written): DoRA's magnitude vector,
    ``modules_to_save``, LoRA biases, per-module ranks or alphas (the file holds one alpha)."""
    problems = []
    if adapter_config.get("use_dora"):
        problems.append("DoRA's magnitude vector has no place in llama.cpp's LoRA format (export the merged model "
                        "with --format gguf)")
    if adapter_config.get("modules_to_save"):
        problems.append(f"modules_to_save ({adapter_config['modules_to_save']}) are full weights, not LoRA")
    if adapter_config.get("bias", "none") != "none" or adapter_config.get("lora_bias"):
        problems.append("LoRA biases are not in llama.cpp's LoRA format")
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        problems.append("per-module ranks or alphas (the file holds one alpha)")
    return problems
