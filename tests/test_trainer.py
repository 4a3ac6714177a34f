"""The training loop on a tiny model: run directory contents, loss going down, accumulation, checkpoints."""

import json

import pytest
import torch

from conftest import write_jsonl
from tuneforge.config import load_config
from tuneforge.training.trainer import train

LABELS = ["billing", "shipping", "login"]


@pytest.fixture()
def data(tmp_path):
    rows = [{"prompt": f"Ticket {i}: {['charged twice', 'parcel late', 'cannot sign in'][i % 3]}",
             "completion": LABELS[i % 3]} for i in range(48)]
    return write_jsonl(tmp_path / "train.jsonl", rows + ["{broken"])


def _config(tiny_model_dir, data_file, tmp_path, **extra):
    settings = {"model": str(tiny_model_dir), "data": {"train": str(data_file), "val_fraction": 0.25},
                "output_dir": str(tmp_path / "run"), "max_steps": 12, "batch_size": 6, "learning_rate": 3e-3,
                "eval_every": 4, "progress": False, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    settings.update(extra)
    return load_config(data=settings)


def test_run_directory_has_everything(tiny_model_dir, data, tmp_path):
    result = train(_config(tiny_model_dir, data, tmp_path))
    run = result.run_dir
    for name in ("config.yaml", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                 "chat_template.jinja", "metrics.jsonl", "loss_curve.png", "run.json", "rejects.jsonl"):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert {"loss", "lr", "tokens_per_s"} <= rows[0].keys()
    assert [r["step"] for r in rows if "eval_loss" in r] == [4, 8, 12]
    record = json.loads((run / "run.json").read_text())
    assert record["data"][0]["sha256"] and record["base_model"]["weights_sha256"]
    assert record["seed"] == 42 and record["versions"]["torch"] and record["wall_time_s"] > 0
    assert record["examples"] == {"train": 36, "validation": 12, "rejected": 1, "truncated": 0,
                                  "formats": {"prompt_completion": 48}}
    reject = json.loads((run / "rejects.jsonl").read_text())
    assert reject["line"] == 49 and reject["raw"] == "{broken"
    assert reject["reasons"][0]["check"] == "not_json" and "not JSON" in reject["reasons"][0]["message"]
    # LoRA r=4 on every linear of 2 layers: r * (d_in + d_out) summed over q,k,v,o,gate,up,down
    h, kv, inter = 64, 32, 128
    per_layer = 4 * ((h + h) + (h + kv) * 2 + (h + h) + (h + inter) * 2 + (inter + h))
    assert result.trainable_params == 2 * per_layer


def test_loss_goes_down_and_best_checkpoint_is_kept(tiny_model_dir, data, tmp_path):
    result = train(_config(tiny_model_dir, data, tmp_path, method="full", learning_rate=1e-2))
    evals = [r["eval_loss"] for r in result.metrics if "eval_loss" in r]
    assert evals == sorted(evals, reverse=True) and evals[-1] < evals[0] - 1.5, evals
    assert result.best_eval_loss == pytest.approx(min(evals), abs=1e-6)
    assert json.loads((result.run_dir / "run.json").read_text())["weights_from_step"] == result.best_step


def _trained_lora(tiny_model_dir, data, tmp_path, name, with_metrics=False, **extra):
    cfg = _config(tiny_model_dir, data, tmp_path, output_dir=str(tmp_path / name), max_steps=3, eval_every=100,
                  keep_best=False, warmup_ratio=0.0, data={"train": str(data), "val_fraction": 0.0}, **extra)
    from safetensors.torch import load_file

    result = train(cfg)
    weights = load_file(tmp_path / name / "adapter_model.safetensors")
    return (weights, result.metrics) if with_metrics else weights


def test_gradient_accumulation_matches_one_big_batch(tiny_model_dir, data, tmp_path):
    """4 micro-batches of 3 examples accumulate to exactly the update of one batch of 12: the same gradient at
    every step (its norm, before clipping: AdamW's update would hide a gradient scaled by a constant) and the
    same weights."""
    big, big_rows = _trained_lora(tiny_model_dir, data, tmp_path, "big", batch_size=12, gradient_accumulation_steps=1,
                                  with_metrics=True)
    acc, acc_rows = _trained_lora(tiny_model_dir, data, tmp_path, "acc", batch_size=3, gradient_accumulation_steps=4,
                                  with_metrics=True)
    norms = [(b["grad_norm"], a["grad_norm"]) for b, a in zip(big_rows, acc_rows, strict=True)]
    assert len(norms) == 3 and all(b > 0 and abs(b - a) <= 1e-3 * b for b, a in norms), norms
    assert [b["loss"] for b in big_rows] == pytest.approx([a["loss"] for a in acc_rows], abs=1e-5)
    for k in big:
        assert torch.allclose(big[k], acc[k], atol=1e-5), k


def test_early_stopping(tiny_model_dir, data, tmp_path):
    result = train(_config(tiny_model_dir, data, tmp_path, learning_rate=1e-9, lr_scheduler="constant",
                           warmup_ratio=0.0, max_steps=40, eval_every=1, early_stopping_patience=2))
    assert result.steps < 40


def test_second_run_on_unchanged_data_does_not_tokenize_again(tiny_model_dir, data, tmp_path, monkeypatch):
    from tuneforge.data import dataset
    from tuneforge.models.loading import load_tokenizer

    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    calls = []
    real = dataset._prepare
    monkeypatch.setattr(dataset, "_prepare", lambda *a: calls.append(1) or real(*a))
    cfg = _config(tiny_model_dir, data, tmp_path).data
    tok = load_tokenizer(str(tiny_model_dir))
    first = dataset.prepare_data(cfg, tok, seed=1)
    second = dataset.prepare_data(cfg, tok, seed=1)
    assert len(calls) == 1
    assert [e.input_ids for e in first.train] == [e.input_ids for e in second.train]
    assert [(r.line, r.reasons) for r in first.rejects] == [(r.line, r.reasons) for r in second.rejects]
    dataset.prepare_data(cfg, tok, seed=2)  # another split: tokenized again
    cfg.train_on = "all"
    dataset.prepare_data(cfg, tok, seed=1)  # another setting: tokenized again
    assert len(calls) == 3


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gradient_checkpointing_gives_the_same_update(tiny_model_dir, data, tmp_path, dropout):
    """With dropout too: the recomputed forward must draw the same (fused) LoRA dropout masks."""
    lora = {"r": 4, "alpha": 8, "dropout": dropout}
    plain = _trained_lora(tiny_model_dir, data, tmp_path, "plain", lora=lora)
    ckpt = _trained_lora(tiny_model_dir, data, tmp_path, "ckpt", gradient_checkpointing=True, lora=lora)
    for k in plain:
        assert torch.allclose(plain[k], ckpt[k], atol=1e-6), k


def test_generate_and_chat_commands_use_the_run(tiny_model_dir, data, tmp_path, monkeypatch, capsys):
    from tuneforge.cli import main

    result = train(_config(tiny_model_dir, data, tmp_path, max_steps=2))
    assert main(["generate", str(result.run_dir), "--prompt", "Ticket 1: parcel late", "--max-new-tokens", "3"]) == 0
    answers = iter(["Ticket 2: charged twice", "/reset", "Ticket 3: cannot sign in", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    assert main(["chat", str(result.run_dir), "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.count("model>") == 2
