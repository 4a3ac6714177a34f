"""Helpers the recipes' child processes share (standard library, torch and transformers only).

A child is run as ``python <recipe>.py SPEC.json OUT.json``. ``SPEC.json`` (written by the parent) holds:
``model`` (local HF folder), ``messages_file`` (JSONL of ``{"messages": [...]}``), ``prompt_completion_file``
(the same conversations as ``{"prompt": [...], "completion": [last assistant turn]}``), ``max_length``,
``steps``, ``batch``, ``lr``, ``lora`` (``r``, ``alpha``, ``dropout``), ``threads``, ``device``, ``dtype``
(``fp32``/``bf16``), ``seed``, ``work_dir``, recipe ``options`` and ``template`` (the chat template chosen by
the parent, ``benchmarks/throughput/templates.py``: ``name``, ``text``, ``lf_template``; absent in older specs).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path


def load_spec(path: str) -> dict:
    return json.loads(Path(path).read_text())


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def torch_dtype(spec: dict):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec["dtype"]]


def training_args_kwargs(spec: dict) -> dict:
    """The ``TrainingArguments`` every Trainer-based recipe shares: same steps, batch, LR and schedule."""
    on_gpu = spec["device"].startswith("cuda")
    return dict(
        output_dir=str(Path(spec["work_dir"]) / "out"), per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, max_steps=spec["steps"], learning_rate=spec["lr"],
        lr_scheduler_type="cosine", warmup_steps=spec.get("warmup_steps", 0), weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=1, save_strategy="no", report_to="none", seed=spec["seed"], dataloader_num_workers=0,
        use_cpu=not on_gpu, bf16=on_gpu and spec["dtype"] == "bf16", disable_tqdm=True,
    )


def training_args(spec: dict):
    from transformers import TrainingArguments

    return TrainingArguments(**training_args_kwargs(spec))


def template_text(spec: dict) -> str | None:
    """The chat template text every recipe renders with (None: the tokenizer's own)."""
    return (spec.get("template") or {}).get("text")


def template_file(spec: dict) -> str | None:
    """The template text written to ``work_dir/chat_template.jinja`` (TRL's ``chat_template_path``), or None."""
    text = template_text(spec)
    if text is None:
        return None
    path = Path(spec["work_dir"]) / "chat_template.jinja"
    path.write_text(text)
    return str(path)


def rendered(lengths: list[int], max_length: int | None, examples: int | None = None) -> dict:
    """What a recipe tokenized: examples and tokens, each example capped at ``max_length`` (as truncation does)."""
    cap = max_length or max(lengths, default=0)
    return {"examples": len(lengths) if examples is None else examples, "tokens": sum(min(n, cap) for n in lengths)}


def run_child(script: str, python: str, recipe: str, spec: dict, work: Path, timeout: float,
              summarize: Callable[[dict], dict]) -> dict:
    """Run ``python SCRIPT --child RECIPE SPEC.json RESULT.json`` in ``work`` (the spec gets ``work_dir``) and return
    ``summarize(result)``, or ``{"recipe", "error"}`` naming the exit code, the last stderr line and the log."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "spec.json").write_text(json.dumps(dict(spec, work_dir=str(work))))
    cmd = [python, script, "--child", recipe, str(work / "spec.json"), str(work / "result.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    (work / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"recipe": recipe, "error": f"exit {proc.returncode}: {last[:200]} (log: {work / 'log.txt'})"}
    return summarize(json.loads((work / "result.json").read_text()))
