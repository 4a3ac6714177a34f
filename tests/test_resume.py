"""Exact resume: a run stopped after step k (crash, SIGTERM, SIGKILL at a random moment) and resumed with
``--resume`` logs every step once and ends with bitwise the weights of the run that was never stopped."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import Killed, crash_after_checkpoint, write_jsonl
from tuneforge.config import load_config
from tuneforge.training.checkpoint import CheckpointDir
from tuneforge.training.trainer import ResumeError, TrainingRecipe, train

STEPS = 6


ROWS = [{"prompt": f"Ticket {i}: {['charged twice', 'parcel late', 'cannot sign in'][i % 3]}",
         "completion": ["billing", "shipping", "login"][i % 3]} for i in range(24)]


@pytest.fixture()
def data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", ROWS)


def _settings(tiny_model_dir, data, out):
    # 18 train examples, micro-batches of 4 (5 an epoch), 2 a step: the 6 steps cross two epoch boundaries;
    # dropout 0.1 so that the resumed run must continue the RNG streams exactly
    return {"model": str(tiny_model_dir), "data": {"train": str(data), "val_fraction": 0.25}, "output_dir": str(out),
            "max_steps": STEPS, "batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 3e-3,
            "eval_every": 2, "save_every": 1, "keep_best": False, "progress": False, "seed": 7,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.1}}


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out):
    return load_file(out / "adapter_model.safetensors")


def _assert_same_run(a, b):
    rows_a, rows_b = _rows(a), _rows(b)
    assert [r["step"] for r in rows_b] == list(range(1, STEPS + 1))          # no step twice, none missing
    for ra, rb in zip(rows_a, rows_b, strict=True):
        same = ("loss", "eval_loss", "lr", "tokens", "trained_tokens", "grad_norm")
        assert [ra.get(k) for k in same] == [rb.get(k) for k in same], (ra, rb)
        assert ra["grad_norm"] > 0, ra
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    """The run never stopped, trained once for every test here: its data is a copy of ``data``'s (a run is known
    by its data's content, not its path)."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    out = folder / "uninterrupted"
    train(load_config(data=_settings(tiny_model_dir, write_jsonl(folder / "train.jsonl", ROWS), out)))
    return out



def test_crash_after_a_checkpoint_then_resume_is_bitwise_the_uninterrupted_run(
        tiny_model_dir, data, tmp_path, uninterrupted, monkeypatch):
    out = tmp_path / "crashed"
    config = _crashed_after(tiny_model_dir, data, out, 3, monkeypatch)
    assert [r["step"] for r in _rows(out)] == [1, 2, 3]
    result = train(config, resume=True)
    assert result.steps == STEPS
    _assert_same_run(uninterrupted, out)


def test_resume_refuses_a_changed_config_or_data_naming_what_changed(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    settings = _settings(tiny_model_dir, data, out)
    settings["max_steps"] = 2
    train(load_config(data=settings))
    with pytest.raises(ResumeError, match=r"different config\.learning_rate;"):
        train(load_config(data={**settings, "learning_rate": 1e-3}), resume=True)
    with pytest.raises(ResumeError, match=r"different config\.lora\.r;"):
        train(load_config(data={**settings, "lora": {"r": 8, "alpha": 8, "dropout": 0.1}}), resume=True)
    data.write_text(data.read_text().replace("Ticket 1:", "Ticket one:"))
    with pytest.raises(ResumeError, match=r"different data\.train;"):
        train(load_config(data=settings), resume=True)
    with pytest.raises(ResumeError, match="holds no checkpoint"):
        train(load_config(data={**settings, "output_dir": str(tmp_path / "empty")}), resume=True)


def _cli_train(config_file, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "train", str(config_file), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_rows(out, n, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return
        path = out / "metrics.jsonl"
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"no {n} metrics rows after {timeout} s")


def test_sigterm_saves_a_checkpoint_and_resume_finishes_the_run(tiny_model_dir, data, tmp_path, uninterrupted):
    out = tmp_path / "sigterm"
    settings = {**_settings(tiny_model_dir, data, out), "save_every": 1000}     # only the signal saves
    config_file = tmp_path / "sigterm.yaml"
    config_file.write_text(yaml.safe_dump(settings))
    proc = _cli_train(config_file)
    _wait_for_rows(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM after step" in err and "--resume" in err
    step = CheckpointDir(out / "checkpoints").current_step("last")
    assert step is not None and 2 <= step < STEPS
    train(load_config(config_file), resume=True)
    _assert_same_run(uninterrupted, out)


def test_sigkill_at_random_moments_always_leaves_a_resumable_run(tiny_model_dir, data, tmp_path, uninterrupted):
    """5 rounds: kill -9 the training process at a random point after a random number of steps (inside a
    step, an evaluation or a save), then resume until done: the same run every time. A round counts only when
    the kill landed before the last step (the process died of SIGKILL with fewer than all steps logged); a
    draw that came too late is drawn again, at most 5 times."""
    rng = random.Random(0)
    landed, late = 0, 0
    while landed < 5:
        out = tmp_path / f"kill{landed}_{late}"
        config_file = tmp_path / f"kill{landed}_{late}.yaml"
        config_file.write_text(yaml.safe_dump(_settings(tiny_model_dir, data, out)))
        proc = _cli_train(config_file)
        _wait_for_rows(out, rng.randint(1, STEPS - 1), proc)
        time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        logged = len(_rows(out)) if (out / "metrics.jsonl").is_file() else 0
        if proc.returncode != -signal.SIGKILL or logged >= STEPS:
            late += 1
            assert late <= 5, f"{late} kills came after the last step: the test no longer kills a run mid-way"
            continue
        ckpt = CheckpointDir(out / "checkpoints")
        folder = ckpt.current("last")
        assert folder is not None and (folder / "trainer_state.pt").is_file() and (
            folder / "trainable.safetensors").is_file(), landed
        assert ckpt.current_step("last") < STEPS and not (out / "adapter_model.safetensors").exists()
        train(load_config(config_file), resume=True)
        _assert_same_run(uninterrupted, out)
        landed += 1


def _crashed_after(tiny_model_dir, data, out, step, monkeypatch):
    """A run of :func:`_settings` that saved its step-``step`` checkpoint and then died."""
    config = load_config(data=_settings(tiny_model_dir, data, out))
    with monkeypatch.context() as m:
        m.setattr(TrainingRecipe, "save_checkpoint", crash_after_checkpoint(step))
        with pytest.raises(Killed):
            train(config)
    return config


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["trainable.safetensors", "trainer_state.pt", "adapter_model.safetensors",
                                    "last.json"])
def test_a_damaged_newest_checkpoint_is_named_and_resume_falls_back_to_the_one_before(
        tiny_model_dir, data, tmp_path, uninterrupted, monkeypatch, caplog, damage):
    """keep_checkpoints (2) keeps steps 3 and 4; the newest checkpoint's weights, trainer state or pointer is cut in
    half. --resume says so in one line, sets the damaged folder aside, continues from step 3, and still ends bitwise as
    the run that was never stopped."""
    out = tmp_path / "damaged"
    config = _crashed_after(tiny_model_dir, data, out, 4, monkeypatch)
    ckpt = CheckpointDir(out / "checkpoints")
    assert [c.step for c in ckpt.candidates("last")[0]] == [4, 3]
    _truncate(ckpt.root / damage if damage == "last.json" else ckpt.current("last") / damage)
    with caplog.at_level(logging.INFO, logger="tuneforge.training.trainer"):
        train(config, resume=True)
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING and "--resume" in r.message]
    if damage == "last.json":      # the pointer: the folders themselves are found, the newest (intact) is used
        assert warnings == [f"--resume: {ckpt.root / 'last.json'} is unreadable (JSONDecodeError: "
                            + warnings[0].split("(JSONDecodeError: ", 1)[1]]
        assert "looking at the checkpoint folders themselves" in warnings[0]
        assert any("resumed from" in r.message and "step 4" in r.message for r in caplog.records)
    else:
        assert len(warnings) == 1 and f"last-000004 (step 4) is damaged ({damage}: " in warnings[0], warnings
        assert "moved to damaged-last-000004. Falling back to last-000003 (step 3)" in warnings[0]
        assert (ckpt.root / "damaged-last-000004").is_dir()
        assert any("resumed from" in r.message and "step 3" in r.message for r in caplog.records)
    _assert_same_run(uninterrupted, out)


def test_resume_refuses_in_one_line_when_every_checkpoint_is_damaged(tiny_model_dir, data, tmp_path, monkeypatch):
    out = tmp_path / "ruined"
    config = _crashed_after(tiny_model_dir, data, out, 2, monkeypatch)
    ckpt = CheckpointDir(out / "checkpoints")
    for candidate in ckpt.candidates("last")[0]:
        _truncate(candidate.folder / "trainer_state.pt")
    with pytest.raises(ResumeError, match=r"every checkpoint in .* is damaged \(last-000002: trainer_state.pt: .*; "
                                          r"last-000001: trainer_state.pt: .*\); train into a new output_dir"):
        train(config, resume=True)


def test_a_moved_run_and_data_resume_by_content(tiny_model_dir, data, tmp_path, uninterrupted, monkeypatch):
    """A run is known by its config and its data's content, not by where they are: the run folder and the data file
    moved elsewhere resume and end bitwise as the run never stopped; changed content is still refused."""
    config = _crashed_after(tiny_model_dir, data, tmp_path / "here", 3, monkeypatch)
    moved_data = tmp_path / "elsewhere" / "train.jsonl"
    moved_data.parent.mkdir()
    shutil.move(data, moved_data)
    shutil.move(tmp_path / "here", tmp_path / "elsewhere" / "run")
    moved = tmp_path / "elsewhere" / "run"
    settings = {**_settings(tiny_model_dir, moved_data, moved)}
    train(load_config(data=settings), resume=True)
    _assert_same_run(uninterrupted, moved)
    assert config.output_dir != str(moved)
    with pytest.raises(ResumeError, match=r"different config\.learning_rate;"):
        train(load_config(data={**settings, "learning_rate": 1e-3}), resume=True)
