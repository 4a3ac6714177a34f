"""Smoke test of ``benchmarks/preference_throughput.py`` on a tiny model: both recipes (TRL's DPOTrainer in its
venv, tuneforge) run 2 steps of 2 HH pairs and give a row each. Timings are not looked at."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import preference_throughput  # noqa: E402


@pytest.mark.skipif(not preference_throughput.HH.is_file(), reason="shared HH data not present")
def test_both_recipes_run_on_tiny_settings(tiny_model_dir, tmp_path):
    out = tmp_path / "rows.json"
    code = preference_throughput.main(["--model", str(tiny_model_dir), "--steps", "2", "--pairs", "2",
                                       "--max-length", "256", "--threads", "1", "--work-dir", str(tmp_path / "w"),
                                       "--json", str(out)])
    rows = {r["recipe"]: r for r in json.loads(out.read_text())["rows"]}
    assert code == 0, rows
    for name in ("tuneforge", "trl"):
        row = rows[name]
        assert row["steps"] == 2 and row["pairs_per_s"] > 0 and row["peak_mem_mib"] > 0
        assert abs(row["loss_curve"][0] - 0.6931) < 1e-3               # both start at ln 2
    assert rows["tuneforge"]["ref_s"] == 0      # LoRA: no pass before step 1, references computed inside the steps
    # the same pairs rendered the same way: the same real (non-pad) tokens a step
    assert rows["trl"]["real_tokens_per_step"] == rows["tuneforge"]["real_tokens_per_step"]


@pytest.mark.skipif(not preference_throughput.HH.is_file(), reason="shared HH data not present")
@pytest.mark.parametrize("task,first_loss", [("kto", 0.5), ("reward", 0.6931)])
def test_kto_and_reward_recipes_run_on_tiny_settings(tiny_model_dir, tmp_path, task, first_loss):
    """``--task kto`` (TRL's KTOTrainer vs task kto: both start at 0.5, the KL estimate and every reward 0) and
    ``--task reward`` (RewardTrainer vs task reward: rewards near 0 at the start, a loss near ln 2)."""
    out = tmp_path / "rows.json"
    code = preference_throughput.main(["--task", task, "--model", str(tiny_model_dir), "--steps", "2", "--pairs",
                                       "2", "--max-length", "256", "--threads", "1", "--work-dir",
                                       str(tmp_path / "w"), "--json", str(out)])
    rows = {r["recipe"]: r for r in json.loads(out.read_text())["rows"]}
    assert code == 0, rows
    for name in ("tuneforge", "trl"):
        row = rows[name]
        assert row["steps"] == 2 and row["pairs_per_s"] > 0 and row["peak_mem_mib"] > 0, row
        assert abs(row["loss_curve"][0] - first_loss) < (1e-3 if task == "kto" else 0.05), (name, row["loss_curve"])
