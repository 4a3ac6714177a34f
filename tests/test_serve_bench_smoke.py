"""Smoke test of benchmarks/serve_throughput.py on a tiny model: every tuneforge row and the naive server answer
every request (``transformers serve``, a subprocess, is left to the real run). The script runs as users run it,
in its own process (its servers, threads and printed table stay out of the test worker)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_serve_throughput_runs_on_tiny_settings(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH / "serve_throughput.py"), "--model", "tiny", "--adapters", "3",
                           "--rank", "2", "--requests", "6", "--concurrency", "3", "--max-tokens", "3",
                           "--configs", "a,b,c,e,f", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) == {"a", "b", "c", "e", "f"}
    for row in results.values():
        assert row["requests"] == 6 and row["failures"] == 0 and row["tokens"] == 18, row
    assert "| (a) tuneforge, 3 adapters mixed |" in proc.stdout and "(a)/(b) =" in proc.stdout
