"""Faults during training: a NaN/inf loss stops the run naming the step and its examples (or skips, up to a
limit) and keeps the last checkpoint; a diverging loss gets a warning (or a stop)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from tuneforge.config import load_config
from tuneforge.training.checkpoint import CheckpointDir
from tuneforge.training.objectives.causal_lm import CausalLMObjective
from tuneforge.training.trainer import DivergenceError, NonFiniteLossError, train


@pytest.fixture()
def data(tmp_path):
    rows = [{"prompt": f"Ticket {i}: {['charged twice', 'parcel late', 'cannot sign in'][i % 3]}",
             "completion": ["billing", "shipping", "login"][i % 3]} for i in range(16)]
    return write_jsonl(tmp_path / "train.jsonl", rows)


def _config(tiny_model_dir, data, out, **extra):
    return load_config(data={"model": str(tiny_model_dir), "data": {"train": str(data), "val_fraction": 0.0},
                             "output_dir": str(out), "max_steps": 4, "batch_size": 4, "save_every": 1,
                             "keep_best": False, "progress": False, "lora": {"r": 4, "dropout": 0.0}, **extra})


@pytest.fixture()
def poisoned_step_2(monkeypatch):
    """The loss of every micro-batch of optimizer step 2 becomes NaN (as an overflow or a bad record would)."""
    original = CausalLMObjective.loss
    calls = {"n": 0}

    def loss(self, model, batch, config):
        calls["n"] += 1
        out = original(self, model, batch, config)
        if calls["n"] == 2:
            out.loss_sum = out.loss_sum * float("nan")
        return out

    monkeypatch.setattr(CausalLMObjective, "loss", loss)
    return lambda: calls.update(n=0)      # call between two runs of one test


def test_a_nan_loss_stops_naming_step_examples_and_causes_and_keeps_the_checkpoint(
        tiny_model_dir, data, tmp_path, poisoned_step_2):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as err:
        train(_config(tiny_model_dir, data, out))
    message = str(err.value)
    assert message.startswith("step 2: loss nan") and "train examples #" in message and "Ticket" in message
    assert "learning_rate=0.0002" in message and "fp16" in message and "on_nonfinite: skip" in message
    ckpt = CheckpointDir(out / "checkpoints")
    assert ckpt.current_step("last") == 1 and str(ckpt.current("last")) in message
    weights = load_file(ckpt.current("last") / "trainable.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_skip_mode_skips_without_updating_and_stops_past_the_limit(tiny_model_dir, data, tmp_path, poisoned_step_2,
                                                                   caplog):
    out = tmp_path / "skip"
    with caplog.at_level(logging.WARNING, logger="tuneforge.training.trainer"):
        train(_config(tiny_model_dir, data, out, on_nonfinite="skip"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["loss"] is None and rows[1]["skipped"] is True and "skipped" not in rows[2]
    assert any("step 2" in r.message and "skipped (1 of at most 3)" in r.message for r in caplog.records)
    poisoned_step_2()
    with pytest.raises(NonFiniteLossError, match="more than max_skipped_steps=0"):
        train(_config(tiny_model_dir, data, tmp_path / "strict", on_nonfinite="skip", max_skipped_steps=0))


def test_a_skipped_step_leaves_the_weights_unchanged(tiny_model_dir, data, tmp_path, poisoned_step_2, monkeypatch):
    from tuneforge.training.trainer import TrainingRecipe

    saved = {}
    original = TrainingRecipe.save_checkpoint

    def keep(self, kind, with_state=True):
        saved[self.state.step] = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        return original(self, kind, with_state)

    monkeypatch.setattr(TrainingRecipe, "save_checkpoint", keep)
    train(_config(tiny_model_dir, data, tmp_path / "run", on_nonfinite="skip"))
    assert all(torch.equal(saved[1][n], saved[2][n]) for n in saved[1])
    assert any(not torch.equal(saved[2][n], saved[3][n]) for n in saved[2])


@pytest.fixture()
def trained_model_dir(tiny_model_dir, data, tmp_path):
    """The tiny model fully fine-tuned on the data, so its loss starts well below a random model's ln(V)."""
    out = tmp_path / "pretrained"
    train(_config(tiny_model_dir, data, out, method="full", learning_rate=1e-2, max_steps=12, save_every=None))
    return out


def test_divergence_is_warned_about_or_stops(trained_model_dir, data, tmp_path, caplog):
    """learning_rate=1e4 (the issue's example): the loss jumps and stays far above its first value."""
    settings = dict(max_steps=8, learning_rate=1e4, lr_scheduler="constant", warmup_ratio=0.0, save_every=None)
    with caplog.at_level(logging.WARNING, logger="tuneforge.training.trainer"):
        result = train(_config(trained_model_dir, data, tmp_path / "warn", **settings))
    losses = [r["loss"] for r in result.metrics]
    assert losses[-1] > 1.5 * losses[0], losses
    assert any("training is diverging" in r.message for r in caplog.records), losses
    assert sum(r.get("warning") == "diverging" for r in result.metrics) >= 1
    with pytest.raises(DivergenceError, match="stayed above 1.5 x its first value .* for 3 steps"):
        train(_config(trained_model_dir, data, tmp_path / "stop", on_divergence="stop", **settings))


def test_a_normal_run_gets_no_divergence_warning(trained_model_dir, data, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="tuneforge.training.trainer"):
        result = train(_config(trained_model_dir, data, tmp_path / "ok", max_steps=6, learning_rate=3e-3))
    assert not any("diverging" in r.message for r in caplog.records)
    assert all(r.get("warning") is None for r in result.metrics)


def test_an_unwritable_or_full_output_dir_fails_before_any_model_loads(tmp_path, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    from tuneforge.config import ConfigError
    from tuneforge.training.trainer import check_output_dir

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="cannot write there.*--set output_dir="):
        check_output_dir(blocker / "run")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**9, 10**9 - 10 * 2**20, 10 * 2**20))
    with pytest.raises(ConfigError, match="only 10 MiB free"):
        check_output_dir(tmp_path / "run")
