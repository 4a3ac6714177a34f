"""Checkpoints that always exist: a crash between any two file operations of a save leaves a loadable one,
and the trainer's state (optimizer, scheduler, RNG, data cursor, scores) round-trips through it."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from conftest import write_jsonl
from tuneforge.config import load_config
from tuneforge.training import checkpoint as checkpoint_module
from tuneforge.training.checkpoint import CheckpointDir
from tuneforge.training.state import TrainState


class Killed(Exception):
    """Stands for the process dying at this point of a save."""


def _write(content: str):
    def write(folder):
        (folder / "weights").write_text(content)
        (folder / "trainer_state").write_text(content)
    return write


def _assert_loadable(ckpt: CheckpointDir, allowed: set[str]) -> str:
    folder = ckpt.current("last")
    assert folder is not None and folder.is_dir()
    weights, state = (folder / "weights").read_text(), (folder / "trainer_state").read_text()
    assert weights == state and weights in allowed, (weights, state)
    return weights


def _operations(monkeypatch, crash_at: int | None):
    """Instrument every file operation a save performs; raise Killed before operation number ``crash_at``."""
    calls: list[str] = []

    def wrap(name, fn):
        def wrapped(*args, **kwargs):
            calls.append(name)
            if crash_at is not None and len(calls) - 1 == crash_at:
                raise Killed(name)
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(checkpoint_module.tempfile, "mkdtemp", wrap("mkdtemp", checkpoint_module.tempfile.mkdtemp))
    monkeypatch.setattr(checkpoint_module.os, "rename", wrap("rename", os.rename))
    monkeypatch.setattr(checkpoint_module.os, "replace", wrap("replace", os.replace))
    monkeypatch.setattr(checkpoint_module.os, "fsync", wrap("fsync", os.fsync))
    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", wrap("rmtree", shutil.rmtree))
    monkeypatch.setattr(checkpoint_module, "_fsync_tree", wrap("fsync_tree", checkpoint_module._fsync_tree))
    return calls


def test_a_crash_at_every_operation_of_a_save_leaves_a_loadable_checkpoint(tmp_path, monkeypatch):
    # count the operations of an undisturbed second save
    probe = CheckpointDir(tmp_path / "probe")
    probe.save("last", 10, _write("step 10"))
    with monkeypatch.context() as m:
        calls = _operations(m, None)
        probe.save("last", 20, _write("step 20"))
    assert {"mkdtemp", "rename", "replace", "rmtree"} <= set(calls), calls
    n = len(calls)

    for crash_at in range(n):
        ckpt = CheckpointDir(tmp_path / f"crash{crash_at}")
        ckpt.save("last", 10, _write("step 10"))
        with monkeypatch.context() as m:
            _operations(m, crash_at)
            try:
                ckpt.save("last", 20, _write("step 20"))
            except Killed:
                pass
        seen = _assert_loadable(ckpt, {"step 10", "step 20"})
        ckpt.clean_stale()
        assert _assert_loadable(ckpt, {seen}) == seen
        names = sorted(p.name for p in ckpt.root.iterdir())
        assert names == sorted(["last.json", ckpt.current("last").name]), (crash_at, names)
        ckpt.save("last", 30, _write("step 30"))            # and the next save works
        assert _assert_loadable(ckpt, {"step 30"}) == "step 30"


def test_a_crash_while_writing_keeps_the_previous_checkpoint_and_leftovers_are_cleaned(tmp_path):
    ckpt = CheckpointDir(tmp_path / "checkpoints")
    ckpt.save("last", 10, _write("step 10"))

    def half(folder):
        (folder / "weights").write_text("half written")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ckpt.save("last", 20, half)
    assert _assert_loadable(ckpt, {"step 10"}) == "step 10"
    # what a killed process (no finally) leaves: a temporary folder, an unreferenced complete folder
    (ckpt.root / ".tmp-last-000020-abcd").mkdir()
    shutil.copytree(ckpt.current("last"), ckpt.root / "last-000020")
    (ckpt.root / ".last.json.tmp").write_text("{")
    removed = {p.name for p in ckpt.clean_stale()}
    assert removed == {".tmp-last-000020-abcd", "last-000020", ".last.json.tmp"}
    assert sorted(p.name for p in ckpt.root.iterdir()) == ["last-000010", "last.json"]


def test_kinds_are_independent(tmp_path):
    ckpt = CheckpointDir(tmp_path)
    ckpt.save("best", 4, _write("best 4"))
    ckpt.save("last", 5, _write("last 5"))
    ckpt.save("last", 10, _write("last 10"))
    assert (ckpt.current("best") / "weights").read_text() == "best 4"
    assert (ckpt.current("last") / "weights").read_text() == "last 10" and ckpt.current_step("last") == 10
    assert ckpt.clean_stale() == []


def test_train_state_round_trips_optimizer_scheduler_rng_and_cursor(tmp_path):
    from transformers import get_scheduler

    def make():
        torch.manual_seed(0)
        layer = torch.nn.Linear(4, 3)
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
        return layer, opt, get_scheduler("cosine", opt, num_warmup_steps=1, num_training_steps=10)

    layer, opt, sched = make()
    for _ in range(3):
        layer(torch.randn(2, 4)).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    state = TrainState(step=3, epoch=1, micro_batch=2, seen_tokens=99, last_loss=1.5, best_score=0.7, best_step=2,
                       bad_evals=1, metrics_rows=3, optimizer=opt, scheduler=sched)
    state.save(tmp_path)
    expected_draw = torch.rand(3)

    _, opt2, sched2 = make()
    restored = TrainState(optimizer=opt2, scheduler=sched2)
    restored.load(tmp_path)
    assert restored.counters() == state.counters()
    assert torch.equal(torch.rand(3), expected_draw)          # the RNG continues where it was saved
    assert sched2.get_last_lr() == sched.get_last_lr()
    for a, b in zip(opt.state.values(), opt2.state.values(), strict=False):
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


def test_save_every_writes_weights_and_trainer_state_under_the_pointer(tiny_model_dir, tmp_path):
    from tuneforge.training.trainer import train

    rows = [{"prompt": f"Ticket {i}", "completion": ["billing", "login"][i % 2]} for i in range(12)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    config = load_config(data={"model": str(tiny_model_dir), "data": {"train": str(data), "val_fraction": 0.25},
                               "output_dir": str(tmp_path / "run"), "max_steps": 4, "batch_size": 3, "eval_every": 2,
                               "save_every": 2, "progress": False, "lora": {"r": 2, "dropout": 0.0}})
    train(config)
    ckpt = CheckpointDir(tmp_path / "run" / "checkpoints")
    last = ckpt.current("last")
    assert last.name == "last-000004" and ckpt.current_step("last") == 4
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "trainer_state.pt"} <= {
        p.name for p in last.iterdir()}
    state = torch.load(last / "trainer_state.pt", weights_only=False)
    # 9 train examples, 3 a micro-batch: 3 per epoch; after 4 steps the cursor is at epoch 1, micro-batch 1
    assert (state["counters"]["step"], state["counters"]["epoch"], state["counters"]["micro_batch"]) == (4, 1, 1)
    assert state["optimizer"]["state"]
    assert ckpt.current("best") is not None
    assert not (tmp_path / "run" / "trainer_state.pt").exists()   # the run's top level holds the model only
    assert json.loads((tmp_path / "run" / "run.json").read_text())["eval_metric"] == "eval_loss"
    # keep_checkpoints (2): the last complete checkpoint before it stays, named by the pointer, for --resume to fall
    # back to; nothing older
    assert sorted(p.name for p in ckpt.root.iterdir() if p.is_dir()) == sorted(
        ["last-000002", last.name, ckpt.current("best").name])
    assert [c.step for c in ckpt.candidates("last")[0]] == [4, 2]
