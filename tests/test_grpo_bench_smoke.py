"""Smoke test of ``benchmarks/grpo_throughput.py`` on a tiny model: both recipes (TRL's GRPOTrainer in its venv,
tuneforge's ``task: grpo``) run 2 steps of 2 prompts x 2 completions and give a row each, with a reward per step.
Timings are not looked at."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import grpo_throughput  # noqa: E402


def test_the_bench_reward_reads_both_completion_shapes():
    assert grpo_throughput.ticket_reward([], ["It is Billing.", [{"role": "assistant", "content": "login"}]],
                                         ["billing", "bug"]) == [1.0, 0.0]


def test_both_recipes_run_on_tiny_settings(tiny_model_dir, tmp_path):
    out = tmp_path / "rows.json"
    code = grpo_throughput.main(["--model", str(tiny_model_dir), "--steps", "2", "--prompts", "2", "--generations",
                                 "2", "--max-completion", "4", "--threads", "1", "--work-dir", str(tmp_path / "w"),
                                 "--json", str(out)])
    rows = {r["recipe"]: r for r in json.loads(out.read_text())["rows"]}
    assert code == 0, rows
    for name in ("tuneforge", "trl"):
        row = rows[name]
        assert row["steps"] == 2 and row["completions_per_s"] > 0 and row["peak_mem_mib"] > 0, row
        assert row["mean_completion_tokens"] > 0, row
        assert len(row["reward_curve"]) == 2 and all(0 <= r <= 1 for r in row["reward_curve"]), row
