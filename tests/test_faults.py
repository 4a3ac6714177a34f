"""Faults during training: a NaN/inf loss stops the run naming the step and its examples (or skips, up to a
limit) and keeps the last checkpoint; a diverging or collapsed loss stops it (or gets a warning); a run that ends
worse than it started fails and never writes the worse weights as its output."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from tuneforge.config import load_config
from tuneforge.training.checkpoint import CheckpointDir
from tuneforge.training.objectives.causal_lm import CausalLMObjective
from tuneforge.training.trainer import CollapseError, DivergenceError, NonFiniteLossError, RunRegressed, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows = [{"prompt": f"Ticket {i}: {['charged twice', 'parcel late', 'cannot sign in'][i % 3]}",
             "completion": ["billing", "shipping", "login"][i % 3]} for i in range(16)]
    return write_jsonl(tmp_path_factory.mktemp("faults-data") / "train.jsonl", rows)


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
    assert "learning_rate=0.0002" in message and "on_nonfinite: skip" in message
    assert "fp16" not in message          # an fp32 run: fp16 overflow is not among its causes (test_precision)
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


@pytest.fixture(scope="module")
def trained_model_dir(tiny_model_dir, data, tmp_path_factory):
    """The tiny model fully fine-tuned on the data, so its loss starts well below a random model's ln(V)."""
    out = tmp_path_factory.mktemp("pretrained") / "run"
    train(_config(tiny_model_dir, data, out, method="full", learning_rate=1e-2, max_steps=12, save_every=None))
    return out


def test_divergence_stops_by_default_or_is_warned_about(trained_model_dir, data, tmp_path, caplog):
    """learning_rate=0.3 on the trained model: the loss jumps to 8-12 and stays above 1.5 x its first value (4.6),
    without collapsing (neither ln V nor zero gradients)."""
    settings = dict(max_steps=8, learning_rate=0.3, lr_scheduler="constant", warmup_ratio=0.0, save_every=2)
    with caplog.at_level(logging.WARNING, logger="tuneforge.training.trainer"):
        result = train(_config(trained_model_dir, data, tmp_path / "warn", on_divergence="warn", **settings))
    losses = [r["loss"] for r in result.metrics]
    assert max(losses[1:4]) > 1.5 * losses[0], losses
    assert any("training is diverging" in r.message for r in caplog.records), losses
    assert sum(r.get("warning") == "diverging" for r in result.metrics) >= 1
    out = tmp_path / "stop"
    with pytest.raises(DivergenceError, match="stayed above 1.5 x its first value .* for 3 steps") as err:
        train(_config(trained_model_dir, data, out, **settings))            # on_divergence: stop is the default
    assert not isinstance(err.value, CollapseError)
    assert f"the last is {out / 'checkpoints' / 'last-000002'}" in str(err.value)
    assert not _weights(out) and not (out / "run.json").exists()


def test_a_collapsed_run_stops_like_a_nan_and_ships_nothing(trained_model_dir, data, tmp_path):
    """The issue's run: learning_rate=1e4 sits at ln V (10.80, a uniform guess) with gradient norm exactly 0 and no
    NaN. It used to end with exit 0 and the destroyed adapter as the run's output; now it stops at the third such step
    with exit status 1 and one line naming the step and the likely cause, and writes no weights as the output. With a
    divergence factor no loss can reach, the collapse check alone stops it."""
    config = tmp_path / "run.yaml"
    out = tmp_path / "collapsed"
    config.write_text(_config(trained_model_dir, data, out, max_steps=12, learning_rate=1e4, lr_scheduler="constant",
                              warmup_ratio=0.0, save_every=None).model_dump_json())
    proc = subprocess.run([sys.executable, "-m", "tuneforge.cli", "train", str(config), "--set",
                           "divergence_factor=1000"], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "step 4: training has collapsed: the loss (10.8" in error[0] and "uniform guess" in error[0]
    assert "gradient norm is exactly 0" in error[0] and "learning_rate=10000" in error[0]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]                     # step 4 raised before its row was logged
    assert all(abs(r["loss"] - math.log(49152)) < 0.2 for r in rows[1:]) and rows[2]["grad_norm"] == 0, rows
    assert not _weights(out)
    with pytest.raises(CollapseError):                  # and warned about, not stopped, with on_divergence: warn
        train(_config(trained_model_dir, data, tmp_path / "api", max_steps=5, learning_rate=1e4,
                      lr_scheduler="constant", warmup_ratio=0.0, save_every=None, divergence_factor=1000))
    result = train(_config(trained_model_dir, data, tmp_path / "warned", max_steps=5, learning_rate=1e4,
                           lr_scheduler="constant", warmup_ratio=0.0, save_every=None, on_divergence="warn"))
    assert [r.get("warning") for r in result.metrics][3] == "collapsed"


def test_a_random_model_at_ln_v_is_not_collapsed(tiny_model_dir, data, tmp_path):
    """A freshly initialised model starts at ln V: sitting there is where it began, not a collapse."""
    result = train(_config(tiny_model_dir, data, tmp_path / "fresh", max_steps=5, learning_rate=1e-5,
                           save_every=None))
    assert all(abs(r["loss"] - math.log(49152)) < 0.2 for r in result.metrics), result.metrics
    assert all(r.get("warning") is None for r in result.metrics)


def _weights(run_dir):
    """The weight files at the top of a run directory (its output)."""
    return sorted(p.name for p in run_dir.glob("*.safetensors"))


def _swapped_labels(data, tmp_path):
    swap = {"billing": "login", "shipping": "billing", "login": "shipping"}
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    return write_jsonl(tmp_path / "wrong.jsonl", [{**r, "completion": swap[r["completion"]]} for r in rows])


@pytest.fixture(scope="module")
def labelled_model_dir(tiny_model_dir, data, tmp_path_factory):
    """The tiny model fully fine-tuned until it answers the data's labels (loss well under 1)."""
    out = tmp_path_factory.mktemp("labelled") / "run"
    train(_config(tiny_model_dir, data, out, method="full", learning_rate=1e-2, max_steps=40, save_every=None,
                  lr_scheduler="constant", warmup_ratio=0.0))
    return out


def test_a_run_that_ends_worse_than_it_started_fails_and_keeps_the_better_weights(labelled_model_dir, data, tmp_path):
    """Trained on wrong labels and validated on the right ones: the training loss falls (nothing diverges), the
    validation loss rises past the model's before training. The run writes its directory, marks it regressed,
    never writes the worse weights as its output, and fails (exit status 1 from the CLI)."""
    wrong = _swapped_labels(data, tmp_path)
    settings = dict(max_steps=8, method="full", learning_rate=1e-2, save_every=None, eval_every=4)

    def config(out, **extra):
        c = _config(labelled_model_dir, wrong, out, **{**settings, **extra})
        c.data.validation = str(data)
        return c

    out = tmp_path / "regressed"
    with pytest.raises(RunRegressed, match=r"worse than the model's before training") as err:
        train(config(out))
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "regressed" and record["problems"] and record["weights_from_step"] is None
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"] and evals[-1] > 1.01 * record["base_eval_loss"], (rows, record)
    assert not _weights(out) and "no weights were written" in str(err.value)
    # keep_best: the best checkpoint is the output only when it beats the model before training; here none does
    out = tmp_path / "regressed_best"
    with pytest.raises(RunRegressed):
        train(config(out, keep_best=True))
    assert not _weights(out)
    # on_divergence: warn accepts the run (marked regressed); a run on the right labels passes the check
    warned = train(config(tmp_path / "warned", on_divergence="warn"))
    assert json.loads((warned.run_dir / "run.json").read_text())["status"] == "regressed"
    assert _weights(warned.run_dir) == ["model.safetensors"]
    good = train(config(tmp_path / "good", keep_best=True, learning_rate=1e-3) .model_copy(
        update={"data": config(tmp_path / "x").data.model_copy(update={"train": str(data)})}))
    record = json.loads((good.run_dir / "run.json").read_text())
    assert record["status"] == "ok" and record["best_eval_loss"] <= record["base_eval_loss"], record


def test_an_unwritable_or_full_output_dir_fails_before_any_model_loads(tmp_path, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    from tuneforge.errors import ConfigError
    from tuneforge.training.trainer import check_output_dir

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="cannot write there.*--set output_dir="):
        check_output_dir(blocker / "run")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**9, 10**9 - 10 * 2**20, 10 * 2**20))
    with pytest.raises(ConfigError, match="only 10 MiB free"):
        check_output_dir(tmp_path / "run")


def test_without_eval_base_the_first_validation_is_the_yardstick(labelled_model_dir, data, tmp_path):
    """eval_base: false: the final validation is compared with the first one during training (step 2 here)."""
    wrong = _swapped_labels(data, tmp_path)
    config = _config(labelled_model_dir, wrong, tmp_path / "no_base", max_steps=8, method="full", learning_rate=2e-3,
                     save_every=None, eval_every=2, eval_base=False)
    config.data.validation = str(data)
    with pytest.raises(RunRegressed, match=r"worse than the first validation's \([0-9.]+, step 2\)"):
        train(config)
    assert json.loads((tmp_path / "no_base" / "run.json").read_text())["base_eval_loss"] is None
