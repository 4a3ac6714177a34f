"""LLaMA-Factory: ``llamafactory-cli train`` (its Python entry ``run_exp``), LoRA SFT, its own chat template.

The conversations are registered as a ShareGPT-style dataset (``messages`` with role/content) in a
``dataset_info.json`` next to the data. ``cutoff_len = max_length``; the loss is on assistant turns (LLaMA-
Factory's default). Default: dynamic padding (``batch`` examples padded to the longest); with
``options.neat_packing``: examples packed into bins of ``cutoff_len`` with a block-diagonal 4-D mask. The
template is LLaMA-Factory's own, named by the parent (``spec["template"]["lf_template"]``: ``smollm2`` for
SmolLM2, which adds SmolLM's default system prompt as the model's own template does; ``gemma`` for Gemma 3 270M:
see ``templates.py`` on why not ``gemma3``).
Gradient checkpointing (LLaMA-Factory's default) is disabled like in the other recipes, unless
``options.lf_defaults``. Runs inside LLaMA-Factory's own venv: ``python llamafactory_recipe.py SPEC.json
OUT.json``.
"""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import measure  # noqa: E402


def _stub_torchaudio() -> None:
    """LLaMA-Factory's multimodal plugin imports torchaudio at module level; no torchaudio release matches
    torch 2.13, and text SFT never calls it."""
    module = types.ModuleType("torchaudio")
    module.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
    sys.modules.setdefault("torchaudio", module)


def main(spec_path: str, out_path: str) -> None:
    spec = common.load_spec(spec_path)
    measure.set_threads(spec["threads"])
    _stub_torchaudio()
    from llamafactory.train.tuner import run_exp

    options = spec.get("options", {})
    template = (spec.get("template") or {}).get("lf_template", "smollm2")
    if not template:
        raise SystemExit(f"no LLaMA-Factory template known for {Path(spec['model']).name} with template "
                         f"{spec['template']['name']}: pass --lf-template NAME")
    work = Path(spec["work_dir"])
    data_dir = work / "lf_data"
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "bench.jsonl").write_text(Path(spec["messages_file"]).read_text())
    (data_dir / "dataset_info.json").write_text(json.dumps({"bench": {
        "file_name": "bench.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                 "system_tag": "system"}}}))
    ta = common.training_args_kwargs(spec)
    args = {
        "stage": "sft", "do_train": True, "model_name_or_path": spec["model"], "finetuning_type": "lora",
        "lora_target": "all", "lora_rank": spec["lora"]["r"], "lora_alpha": spec["lora"]["alpha"],
        "lora_dropout": spec["lora"]["dropout"], "dataset": "bench", "dataset_dir": str(data_dir),
        "template": template, "cutoff_len": spec["max_length"], "overwrite_cache": True,
        "flash_attn": "sdpa", "disable_gradient_checkpointing": not options.get("lf_defaults"),
        "neat_packing": bool(options.get("neat_packing")),
        "packing": bool(options.get("neat_packing")),
        **{k: ta[k] for k in ("output_dir", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
                              "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm",
                              "logging_steps", "save_strategy", "report_to", "seed", "bf16", "disable_tqdm")},
        "use_cpu": ta["use_cpu"], "plot_loss": False,
    }
    if not spec["device"].startswith("cuda"):
        args["fp16"] = False
    log = measure.StepLog()
    probe = measure.trainer_probe(log)
    n_params = {}

    from transformers import TrainerCallback

    class CountParams(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
            n_params["n"] = measure.count_params(model)
            # LLaMA-Factory's tokenized dataset (cut at cutoff_len; neat packing numbers the sequences of a bin
            # 1, 2, ... in attention_mask, padding 0)
            masks = train_dataloader.dataset["attention_mask"]
            n_params["rendered"] = {"examples": sum(max(m) for m in masks), "tokens": sum(sum(x != 0 for x in m)
                                                                                        for m in masks)}

    run_exp(args, callbacks=[probe, CountParams()])
    label = ("llamafactory-neat" if options.get("neat_packing") else "llamafactory") + (
        "-defaults" if options.get("lf_defaults") else "")
    measure.write_result(out_path, label, log, spec["device"], n_params.get("n", 0),
                         measure.versions_of("llamafactory", "torch", "transformers", "peft"),
                         notes=("neat_packing (bins of cutoff_len, 4-D block mask)" if options.get("neat_packing")
                                else "dynamic padding to the longest of the batch")
                         + f", gradient checkpointing {'on' if options.get('lf_defaults') else 'off'}",
                         template=f"{template} (LLaMA-Factory's)", rendered=n_params.get("rendered"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
