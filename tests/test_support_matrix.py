"""Each method on each task the support matrix (docs/guides/methods.md) marks as supported (tiny model, short runs):
it learns (the loss falls), and the run reloads as the model that trained (``load_run``'s logits equal the
in-memory model's at the last step, whose weights are the run's output with ``keep_best: false``)."""

import pytest
import torch

from conftest import write_jsonl
from tuneforge.config import load_config
from tuneforge.methods import method_forward
from tuneforge.runs import load_run
from tuneforge.training.trainer import TrainingRecipe

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
        "prefix": {"num_virtual_tokens": 4}, "prompt": {"num_virtual_tokens": 4}, "keep_best": False})
    recipe = TrainingRecipe(config)
    recipe.setup()
    recipe.fit()
    result = recipe.finish()
    evals = [r["eval_loss"] for r in result.metrics if "eval_loss" in r]
    assert result.metrics[0]["loss"] > evals[-1], (result.metrics[0]["loss"], evals)
    loaded = load_run(result.run_dir, device="cpu")
    ids = torch.tensor([[1, 504, 2520, 30, 1004, 28, 18, 19]])
    positions, keep = torch.arange(ids.shape[1])[None], torch.arange(ids.shape[1])
    with torch.no_grad():   # the training forward on both (the in-memory model keeps the trainer's packed attention)
        want = method_forward(recipe.model.eval(), method, ids, positions, keep, lengths=[ids.shape[1]]).float()
        got = method_forward(loaded.model, method, ids, positions, keep, lengths=[ids.shape[1]]).float()
        plain = loaded.model(input_ids=ids).logits[0, -ids.shape[1]:].float()   # prompt tuning prepends its tokens
    assert got.shape == want.shape == plain.shape
    assert torch.allclose(plain, got, atol=1e-5, rtol=1e-5)      # the reloaded model's own call agrees
    # qlora reloads its 4-bit base from the checkpoint again: the same quantisation, so the same logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
