"""Each method on each task the support matrix (docs/guides/methods.md) marks as supported (tiny model, short runs)."""

import pytest
import torch

from conftest import write_jsonl
from tuneforge.config import load_config
from tuneforge.runs import load_run
from tuneforge.training.trainer import train

METHODS = {"full": 3e-3, "lora": 1e-2, "adapter": 1e-2, "ia3": 5e-2, "prefix": 5e-2, "prompt": 5e-2, "qlora": 1e-2}


@pytest.mark.parametrize("task", ["sft", "pretrain"])
@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_and_reloads_for_task(method, task, tiny_model_dir, tmp_path):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    if task == "sft":
        rows = [{"prompt": f"Ticket {i}: parcel late", "completion": "shipping"} for i in range(16)]
    else:
        rows = [{"text": "The quick brown fox jumps over the lazy dog. " * 3} for _ in range(16)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    config = load_config(data={
        "model": str(tiny_model_dir), "method": method, "task": task, "output_dir": str(tmp_path / "run"),
        "data": {"train": str(data), "val_fraction": 0.25}, "max_steps": 6, "batch_size": 4, "eval_every": 3,
        "learning_rate": METHODS[method], "warmup_ratio": 0.0, "lr_scheduler": "constant", "progress": False,
        "prefix": {"num_virtual_tokens": 4}, "prompt": {"num_virtual_tokens": 4}})
    result = train(config)
    evals = [r["eval_loss"] for r in result.metrics if "eval_loss" in r]
    assert result.metrics[0]["loss"] > evals[-1], (result.metrics[0]["loss"], evals)
    loaded = load_run(result.run_dir)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(loaded.model(input_ids=ids).logits).all()
