"""The CLI is a thin layer: help lists the commands, config errors are one clear line and exit 2."""

import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "tuneforge.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_the_commands():
    out = run("--help").stdout
    for command in ("train", "quickstart", "generate", "chat", "data", "merge"):
        assert command in out


def test_config_typo_fails_before_loading_a_model_with_a_suggestion():
    proc = run("train", "examples/quickstart.yaml", "--set", "max_stpes=3")
    assert proc.returncode == 2
    assert "unknown key 'max_stpes' (did you mean 'max_steps'?)" in proc.stderr
    assert "Loading weights" not in proc.stderr


def test_data_preview_marks_trained_tokens():
    proc = run("data", "preview", "examples/data/tickets_train.jsonl", "-n", "1", "--no-color")
    assert proc.returncode == 0, proc.stderr
    assert "[[login<|im_end|>]]" in proc.stdout and "800 usable records" in proc.stdout
