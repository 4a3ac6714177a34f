"""tuneforge: ``tuneforge.train`` with the equivalent config (LoRA, packed padding-free rows).

``batch`` examples per step are packed into one row (position ids restart per example, per-example causal
SDPA), the LM head runs only on target positions, the loss is on assistant tokens, examples longer than
``max_length`` are truncated, the chat template is the ``template:`` key with the parent's value
(``spec["template"]["name"]``: ``auto`` or a built-in such as ``gemma``). Step timings come from the run's
``metrics.jsonl`` (``elapsed_s`` at the end of each step, since the loop started). Run as ``python
tuneforge_recipe.py SPEC.json OUT.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import measure  # noqa: E402


def run_config(spec: dict) -> dict:
    """The tuneforge run config equivalent to the bench spec, then ``spec["tuneforge_config"]`` (the bench's
    ``--tuneforge-set KEY=VALUE``: e.g. ``precision`` or ``kernels``; a dotted key sets a nested one) and a
    spec's own ``options.config``."""
    options = spec.get("options", {})
    config = _base_config(spec, options)
    for key, value in {**(spec.get("tuneforge_config") or {}), **(options.get("config") or {})}.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config


def _base_config(spec: dict, options: dict) -> dict:
    return {
        "model": spec["model"], "template": (spec.get("template") or {}).get("name", "auto"), "method": "lora",
        "output_dir": str(Path(spec["work_dir"]) / "run"),
        "seed": spec["seed"], "batch_size": spec["batch"], "max_steps": spec["steps"],
        "learning_rate": spec["lr"], "lr_scheduler": "cosine", "warmup_steps": 0, "max_grad_norm": 1.0,
        "data": {"train": spec["messages_file"], "format": "messages", "val_fraction": 0.0,
                 "train_on": "assistant", "max_length": spec["max_length"], "too_long": "truncate"},
        "lora": {"r": spec["lora"]["r"], "alpha": spec["lora"]["alpha"], "dropout": spec["lora"]["dropout"],
                 "target_modules": "all-linear"},
        "dtype": spec["dtype"], "device": spec["device"], "threads": spec["threads"], "progress": False,
        "attention": options.get("attention", "packed_sdpa"), "log_every": 1,
        "gradient_checkpointing": bool(options.get("gradient_checkpointing", False)),
    }


def main(spec_path: str, out_path: str) -> None:
    spec = common.load_spec(spec_path)
    measure.set_threads(spec["threads"])
    from tuneforge.config import RunConfig
    from tuneforge.training.trainer import train

    config = run_config(spec)
    result = train(RunConfig.model_validate(config))
    record = json.loads((Path(result.run_dir) / "run.json").read_text())
    log = measure.StepLog()
    for row in result.metrics:
        log.steps.append({"step": row["step"], "end_s": row["elapsed_s"], "tokens": row["tokens"],
                          "trained_tokens": row["trained_tokens"], "examples": spec["batch"], "loss": row["loss"]})
    measure.write_result(out_path, "tuneforge", log, spec["device"], result.total_params - result.trainable_params,
                         measure.versions_of("tuneforge", "torch", "transformers", "peft"),
                         notes="packed rows of `batch` examples, assistant-only loss",
                         template=f"{config['template']} (tuneforge template: key, {record['template']['source']})",
                         # one epoch of the bench data (steps x batch conversations): its real tokens are the
                         # rendered tokens of every conversation, truncated at max_length
                         rendered={"examples": record["examples"]["train"],
                                   "tokens": sum(row["tokens"] for row in result.metrics)})


if __name__ == "__main__":
    main(*sys.argv[1:3])
