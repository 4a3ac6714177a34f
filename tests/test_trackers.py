"""report_to: tensorboard writes the same numbers as metrics.jsonl, through accelerate's tracker."""

import json
import struct

import pytest

from conftest import write_jsonl
from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.training.trainer import train


def _events(folder):
    """(tag, step, value) of every scalar in the TensorBoard event files under ``folder`` (TFRecord framing:
    length, its crc, the Event proto, its crc)."""
    from tensorboardX.proto.event_pb2 import Event

    out = []
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.append((value.tag, event.step, value.simple_value))
    return out


def test_tensorboard_gets_every_logged_number(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboardX")
    rows = [{"prompt": f"Ticket {i}: parcel late", "completion": "shipping"} for i in range(24)]
    config = load_config(data={
        "model": str(tiny_model_dir), "data": {"train": str(write_jsonl(tmp_path / "d.jsonl", rows)),
                                               "val_fraction": 0.25},
        "output_dir": str(tmp_path / "run"), "max_steps": 4, "eval_every": 2, "batch_size": 4, "progress": False,
        "report_to": ["tensorboard"], "lora": {"r": 2}})
    result = train(config)
    events = _events(result.run_dir / "tracking")
    logged = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {step: v for tag, step, v in events if tag == "loss"}
    assert losses == pytest.approx({r["step"]: r["loss"] for r in logged}, rel=1e-6)
    evals = {step: v for tag, step, v in events if tag == "eval_loss"}
    assert evals == pytest.approx({r["step"]: r["eval_loss"] for r in logged if "eval_loss" in r}, rel=1e-6)
    assert {tag for tag, _, _ in events} >= {"loss", "lr", "grad_norm", "eval_loss", "eval_seconds"}


def test_a_tracker_that_is_not_installed_fails_at_load(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    with pytest.raises(ConfigError, match=r"report_to: wandb needs wandb \(pip install wandb\)"):
        load_config(data={"data": {"train": str(data)}, "report_to": ["wandb"]})
