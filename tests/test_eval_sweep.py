"""tuneforge sweep on a tiny model: every grid point trained and evaluated, a finished point kept on rerun."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tuneforge.evaluation.sweep import SweepError, parse_grid, point_name

RECIPES = Path(__file__).resolve().parents[1] / "src" / "tuneforge" / "recipes"


def test_grid_is_every_combination():
    assert parse_grid(["lora.r=4,16", "learning_rate=1e-4,3e-4"]) == [
        ["lora.r=4", "learning_rate=1e-4"], ["lora.r=4", "learning_rate=3e-4"],
        ["lora.r=16", "learning_rate=1e-4"], ["lora.r=16", "learning_rate=3e-4"]]
    assert point_name(["lora.r=4", "learning_rate=1e-4"]) == "lora.r-4__learning_rate-1e-4"
    for bad in (["lora.r"], ["=4,5"], ["lora.r="]):
        with pytest.raises(SweepError, match="KEY=V1,V2"):
            parse_grid(bad)


def test_sweep_trains_each_point_once_and_resumes(tmp_path, tiny_model_dir):
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join((RECIPES / "data" / "tickets_train.jsonl").read_text().splitlines()[:16]) + "\n")
    args = [sys.executable, "-m", "tuneforge.cli", "sweep", str(RECIPES / "quickstart.yaml"), "--grid", "lora.r=2,4",
            "--set", f"model={tiny_model_dir}", "--set", f"data.train={train}", "--set", "max_steps=1",
            "--set", "eval.max_examples=2", "--out", str(tmp_path / "sweep")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    points = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [p["name"] for p in points] == ["lora.r-2", "lora.r-4"]
    assert all(p["status"] == "done" and p["quality"] is not None for p in points)
    # LoRA's trainable parameters are linear in r
    assert points[1]["trainable_params"] == 2 * points[0]["trainable_params"]
    assert points[1]["adapter_mib"] > points[0]["adapter_mib"] and points[0]["peak_rss_mib"] > 100
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 10_000
    assert "| lora.r=2 |" in (tmp_path / "sweep" / "sweep.md").read_text()
    page = (tmp_path / "sweep" / "sweep.html").read_text()    # the table and the plot inline: opens offline
    assert page.count("<tr><td>lora.r=") == 2 and "<svg" in page and "<image" not in page
    assert not re.search(r"(href|src)=[\"']https?:", page) and "<metadata>" not in page
    mtime = (tmp_path / "sweep" / "lora.r-2" / "run.json").stat().st_mtime_ns
    again = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and again.stdout.count("done before, kept") == 2
    assert (tmp_path / "sweep" / "lora.r-2" / "run.json").stat().st_mtime_ns == mtime
