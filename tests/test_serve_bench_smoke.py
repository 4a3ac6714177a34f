"""Smoke test of benchmarks/serve_throughput.py on a tiny model: every tuneforge row and the naive server answer
every request (``transformers serve``, a subprocess, is left to the real run)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_serve_throughput_runs_on_tiny_settings(tmp_path, capsys):
    sys.path.insert(0, str(BENCH))
    try:
        import serve_throughput
    finally:
        sys.path.remove(str(BENCH))
    out = tmp_path / "bench.json"
    assert serve_throughput.main(["--model", "tiny", "--adapters", "3", "--rank", "2", "--requests", "6",
                                  "--concurrency", "3", "--max-tokens", "3", "--configs", "a,b,c,e,f",
                                  "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results) == {"a", "b", "c", "e", "f"}
    for row in results.values():
        assert row["requests"] == 6 and row["failures"] == 0 and row["tokens"] == 18, row
    table = capsys.readouterr().out
    assert "| (a) tuneforge, 3 adapters mixed |" in table and "(a)/(b) =" in table
