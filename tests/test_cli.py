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


def test_a_training_file_without_usable_records_is_one_line_and_exit_2(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"unrelated": 1}\n')
    proc = run("train", "examples/quickstart.yaml", "--set", f"model={tiny_model_dir}", "--set", f"data.train={empty}",
               "--set", "data.validation=null", "--set", f"output_dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no usable training records" in errors[0] and str(empty) in errors[0]


def test_the_gguf_cache_is_keyed_by_content_not_path(tmp_path):
    """Another copy of the same GGUF (another virtualenv's wheel) maps to the same converted folder."""
    import os
    import shutil

    from tuneforge.models.registry import SMOLLM2, convert_gguf, resolve_model, smollm2_gguf_path

    folder = resolve_model(SMOLLM2)
    copy = tmp_path / "elsewhere" / smollm2_gguf_path().name
    copy.parent.mkdir()
    shutil.copy(smollm2_gguf_path(), copy)
    os.utime(copy, (1_000_000, 1_000_000))
    assert convert_gguf(copy, name=SMOLLM2) == folder
