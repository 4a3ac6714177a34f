"""Smoke run of benchmarks/eval_throughput.py on a tiny model and tiny settings (no harness venv): both tables print,
and greedy batched answers equal the one-at-a-time loop's. Its timings mean nothing here and are not checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MMLU = ROOT.parent / "shared" / "data" / "mmlu"


@pytest.mark.skipif(not MMLU.is_dir(), reason="needs ../shared/data/mmlu")
def test_eval_throughput_bench_runs_on_tiny_settings(tiny_model_dir):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "eval_throughput.py"), "--model",
                           str(tiny_model_dir), "--subjects", "2", "--per-subject", "2", "--prompts", "5",
                           "--max-new-tokens", "4", "--threads", "1", "--no-harness"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| tuneforge (shared prefix, tree-masked rows) | 4 |" in proc.stdout
    assert "| tuneforge (4 full sequences) | 4 |" in proc.stdout
    assert "| 5/5 |" in proc.stdout                     # batched greedy == one prompt at a time
