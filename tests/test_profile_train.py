"""``benchmarks/throughput/profile_train.py`` on a CPU: the real training loop's steps timed, the chosen window
profiled (op tables by device and CPU time, Python's profile), a summary line; what ``gpu_profile.sh`` runs on a
lent GPU, so that a lease is not spent finding a broken script."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "throughput"))

import profile_train  # noqa: E402


def test_profile_train_times_every_step_and_profiles_the_window(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "conversations.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i} " * (i % 5 + 1)},
                                                     {"role": "assistant", "content": f"answer {i} " * 3}]}) + "\n"
                            for i in range(40)))
    out = tmp_path / "out"
    assert profile_train.main(["--model", str(tiny_model_dir), "--data", str(data), "--device", "cpu", "--batch", "2",
                               "--steps", "4", "--max-length", "64", "--threads", "1", "--profile-from", "2",
                               "--profile-steps", "2", "--out", str(out), "--label", "t"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [s["step"] for s in summary["steps"]] == [1, 2, 3, 4]
    assert all(s["s"] > 0 and s["tokens"] > 0 for s in summary["steps"])
    rest = summary["steps"][1:]
    assert summary["tok_s_after_first"] == round(sum(s["tokens"] for s in rest) / sum(s["s"] for s in rest), 1)
    assert any(line.startswith("packed attention: SDPA per example") for line in summary["chosen"])
    for name in ("ops_by_device_time.txt", "ops_by_cpu_time.txt"):
        assert "aten::" in (out / name).read_text()
    assert "packed_loss_sum" in (out / "python_by_tottime.txt").read_text() or \
        "train_step" in (out / "python_by_tottime.txt").read_text()
    assert "[t] SUMMARY " in capsys.readouterr().out
