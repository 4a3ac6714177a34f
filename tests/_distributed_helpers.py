"""Helpers shared by the multi-process tests (DDP, FSDP2, DeepSpeed): the run config, launching, a crash hook."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import write_jsonl

ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

# a training process that saves its step-N checkpoint then stops, as a crash would (imported at start through
# PYTHONPATH, see crash_env)
CRASH_HOOK = """
import os
if os.environ.get("TEST_CRASH_AFTER_STEP") and os.environ.get("LOCAL_RANK"):     # the training processes only
    from tuneforge.training import trainer
    _save = trainer.TrainingRecipe.save_checkpoint
    def _save_then_crash(self, kind, with_state=True):
        path = _save(self, kind, with_state)
        if kind == "last" and self.state.step == int(os.environ["TEST_CRASH_AFTER_STEP"]):
            raise SystemExit(3)
        return path
    trainer.TrainingRecipe.save_checkpoint = _save_then_crash
"""


def rows(n):
    return [{"prompt": f"Ticket {i}: {['charged twice', 'parcel late', 'cannot sign in'][i % 3]}",
             "completion": ["billing", "shipping", "login"][i % 3]} for i in range(n)]


def run_config(tmp_path, tiny_model_dir, **settings):
    """A 5-step LoRA run on 40 tickets (8 held out), validated every 2 steps; ``settings`` override."""
    data = write_jsonl(tmp_path / "train.jsonl", rows(40))
    config = {"model": str(tiny_model_dir), "device": "cpu", "threads": 1, "seed": 3,
              "data": {"train": str(data), "val_fraction": 0.2}, "batch_size": 4, "max_steps": 5, "eval_every": 2,
              "learning_rate": 5e-3, "warmup_steps": 1, "keep_best": False, "progress": False,
              "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, **settings}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(cmd, tmp_path, check=True, env=None):
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, **ENV, **(env or {})}, capture_output=True,
                          text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def train_one(config, tmp_path, out, accumulation=1, env=None):
    """One process with the accumulation of two processes: the same global batch."""
    return run([sys.executable, "-m", "tuneforge.cli", "train", str(config), "--set", f"output_dir={out}",
                "--set", f"gradient_accumulation_steps={2 * accumulation}"], tmp_path, env=env)


def hook_env(tmp_path, hook, **variables):
    """Environment that imports ``hook`` (a sitecustomize module's text) at the start of every process."""
    folder = tmp_path / "hook"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(hook)
    return {**variables, "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}


def crash_env(tmp_path, step=3):
    return hook_env(tmp_path, CRASH_HOOK, TEST_CRASH_AFTER_STEP=str(step))


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def errors(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


def assert_same_steps(one, two):
    """Two runs of 5 steps with the same global batch log the same steps; returns the largest differences."""
    import pytest

    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4, 5]
    assert [r["lr"] for r in one] == [r["lr"] for r in two]            # the scheduler steps once per step
    worst = {"loss": 0.0, "grad_norm": 0.0, "eval_loss": 0.0}
    for a, b in zip(one, two, strict=True):
        assert a["trained_tokens"] == b["trained_tokens"] and a["tokens"] == b["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        # AdamW hides a wrongly scaled gradient; the logged norm (the whole gradient's, reduced) does not
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        worst["loss"] = max(worst["loss"], abs(a["loss"] - b["loss"]))
        worst["grad_norm"] = max(worst["grad_norm"], abs(a["grad_norm"] - b["grad_norm"]) / a["grad_norm"])
        if "eval_loss" in a:
            assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=1e-5)
            worst["eval_loss"] = max(worst["eval_loss"], abs(a["eval_loss"] - b["eval_loss"]))
    return worst


def assert_same_weights(wa, wb, tol):
    """The same tensor names and shapes, each within ``tol``; returns the largest difference."""
    assert wa.keys() == wb.keys() and len(wa) > 0
    worst = 0.0
    for name in wa:
        assert wa[name].shape == wb[name].shape, name
        diff = (wa[name] - wb[name]).abs().max().item()
        assert diff < tol, (name, diff)
        worst = max(worst, diff)
    return worst


def assert_resumed_bitwise(uninterrupted, resumed):
    """A run stopped and resumed logs and ends bitwise as the uninterrupted run (LoRA: its adapter)."""
    import torch
    from safetensors.torch import load_file

    a, b = metrics(uninterrupted), metrics(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for ra, rb in zip(a, b, strict=True):
        assert (ra["loss"], ra.get("eval_loss"), ra["lr"], ra["grad_norm"]) == \
            (rb["loss"], rb.get("eval_loss"), rb["lr"], rb["grad_norm"]), (ra, rb)
    wa = load_file(str(uninterrupted / "adapter_model.safetensors"))
    wb = load_file(str(resumed / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


class SharedRuns:
    """Runs trained once per test session and shared by every test that compares against them.

    The one-process reference of a config (2 accumulation steps, the global batch of 2 processes) is the same run
    for DDP, FSDP2, ZeRO-2 and ZeRO-3, so it is trained once per config; an engine's 2-process run serves both its
    equality test and, as the uninterrupted run, its resume test. Each config lives in its own folder (named by a
    hash of its settings), holding its data, ``c.yaml`` and the runs trained from it; tests write their own runs
    (a crashed run, its resume) elsewhere, pointing at the same ``c.yaml``.
    """

    def __init__(self, root: Path, tiny_model_dir: Path):
        self.root, self.model = root, tiny_model_dir

    def folder(self, **settings) -> Path:
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        folder = self.root / key
        if not (folder / "c.yaml").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            run_config(folder, self.model, **settings)
        return folder

    def config(self, **settings) -> Path:
        return self.folder(**settings) / "c.yaml"

    def one_process(self, hook: str | None = None, **settings) -> Path:
        """The one-process run of ``settings`` with the 2-process global batch (trained on first use); ``hook``: a
        :func:`hook_env` (text, variables) pair its process starts with."""
        folder = self.folder(**settings)
        name = "one" if hook is None else "one-" + hashlib.sha256(repr(hook).encode()).hexdigest()[:8]
        if not (folder / name / "run.json").is_file():
            env = hook_env(folder, hook[0], **hook[1]) if hook else None
            train_one(folder / "c.yaml", folder, name, settings.get("gradient_accumulation_steps", 1), env=env)
        return folder / name

    def launched(self, name: str, launch, **settings) -> tuple[Path, str]:
        """The run ``launch(config, cwd, output_dir)`` trains (on first use) and its stderr."""
        folder = self.folder(**settings)
        out, log = folder / name, folder / f"{name}.stderr"
        if not (out / "run.json").is_file():
            log.write_text(launch(folder / "c.yaml", folder, name).stderr)
        return out, log.read_text()
