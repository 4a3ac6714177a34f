"""The studio's plain parts, without a browser: the host and login rule, the form from the run-config schema, the
runs' status from their files, the training process's pid file (one run at a time, found again after a restart)."""

from __future__ import annotations

import json
import os
import sys

import pytest

from tuneforge.errors import ConfigError
from tuneforge.studio import process
from tuneforge.studio.app import check_host, parse_auth
from tuneforge.studio.form import config_tree, schema_fields, validate
from tuneforge.studio.runs_tab import list_runs, run_status

DATA = "src/tuneforge/recipes/data/tickets_train.jsonl"


def test_another_host_is_refused_without_a_login():
    check_host("127.0.0.1", None)
    with pytest.raises(ConfigError, match="--auth user:password"):
        check_host("0.0.0.0", None)
    check_host("0.0.0.0", parse_auth("me:secret"))
    with pytest.raises(ConfigError, match="write user:password"):
        parse_auth("no-colon")


def test_the_cli_refuses_another_host_without_auth(monkeypatch, capsys):
    pytest.importorskip("gradio", reason="tuneforge ui needs the ui extra")
    from tuneforge.cli import main
    from tuneforge.studio.app import AUTH_ENV

    monkeypatch.delenv(AUTH_ENV, raising=False)
    assert main(["ui", "--host", "0.0.0.0"]) == 2
    out = capsys.readouterr()
    assert "--auth user:password" in out.err
    assert out.out == ""                        # refused before the banner: one line, nothing said to be serving


def test_the_studios_queue_does_not_poll_every_millisecond():
    """Gradio's queue sleeps 1 ms between polls when idle (its process then took ~4% of a core with no page open);
    the studio sets Windows' 50 ms. Fails when a Gradio upgrade renames the attributes (the calming would be lost)."""
    gr = pytest.importorskip("gradio", reason="the studio needs the ui extra")
    from tuneforge.studio.app import QUEUE_IDLE_SLEEP_S, calm_queue

    with gr.Blocks() as app:
        gr.Markdown("x")
    app.queue()
    assert app._queue.sleep_when_free < QUEUE_IDLE_SLEEP_S          # Gradio's own default, not already calm
    calm_queue(app)
    assert (app._queue.sleep_when_free, app._queue.progress_update_sleep_when_free) == (0.05, 0.1)


def _values(fields, **changed):
    keys = [f.key for f in fields]
    values = [f.default for f in fields]
    for key, value in changed.items():
        values[keys.index(key.replace("__", "."))] = value
    return values


def test_the_form_has_every_key_with_its_description_and_the_methods_sections():
    from tuneforge.config import RunConfig
    from tuneforge.methods.registry import settings_sections

    fields = {f.key: f for f in schema_fields()}
    assert fields["learning_rate"].description == RunConfig.model_fields["learning_rate"].description
    assert fields["lora.r"].default == "16" and fields["batch_size"].default == "8"
    assert {k.split(".")[0] for k in fields if "." in k} >= set(settings_sections()) | {"data"}
    assert set(fields["method"].choices) >= {"lora", "full", "qlora"}


def test_an_untouched_form_writes_only_what_changed_and_validates_as_a_yaml_file_would(tmp_path):
    fields = schema_fields()
    values = _values(fields, data__train=DATA, max_steps="3", lora__r="8")
    assert config_tree(fields, values) == {"data": {"train": DATA}, "max_steps": 3, "lora": {"r": 8}}
    config, errors = validate(fields, values, str(tmp_path / "run"))
    assert errors == {} and config is not None
    assert (config.max_steps, config.lora.r, config.learning_rate_is_default) == (3, 8, True)


def test_an_invalid_value_gives_the_schema_message_for_that_key(tmp_path):
    fields = schema_fields()
    config, errors = validate(fields, _values(fields, data__train=DATA, lora__r="0"), str(tmp_path / "run"))
    assert config is None and list(errors) == ["lora.r"]
    assert "greater than or equal to 1" in errors["lora.r"]
    config, errors = validate(fields, _values(fields, data__train="missing.jsonl"), str(tmp_path / "run"))
    assert config is None and "not found" in errors["data.train"]


def _run(folder, name, **files):
    run = folder / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("method: lora\ndata:\n  train: x.jsonl\n")
    for file, text in files.items():
        (run / file.replace("__", "/")).parent.mkdir(parents=True, exist_ok=True)
        (run / file.replace("__", "/")).write_text(text)
    return run


def test_run_status_comes_from_the_run_directory(tmp_path):
    finished = _run(tmp_path, "a", **{"run.json": json.dumps({"method": "lora", "steps": 3, "best_eval_loss": 1.5,
                                                             "best_step": 3, "wall_time_s": 12.0})})
    regressed = _run(tmp_path, "b", **{"run.json": json.dumps({"status": "regressed"})})
    stopped = _run(tmp_path, "c", **{"checkpoints__last.json": json.dumps({"folder": "last-000002", "step": 2}),
                                     "metrics.jsonl": '{"step": 1, "loss": 2.0, "elapsed_s": 1.0}\n'})
    (stopped / "checkpoints" / "last-000002").mkdir()
    failed = _run(tmp_path, "d", **{"metrics.jsonl": '{"step": 1, "loss": 2.0}\n{"step": 2, "lo'})   # cut short
    (tmp_path / "not-a-run").mkdir()
    assert [run_status(r) for r in (finished, regressed, stopped, failed)] == \
        ["finished", "finished (regressed)", "stopped", "failed"]
    rows = {r.path.name: r for r in list_runs(tmp_path)}
    assert set(rows) == {"a", "b", "c", "d"}
    assert (rows["a"].method, rows["a"].data, rows["a"].steps, rows["a"].time_s) == ("lora", "x.jsonl", 3, 12.0)
    assert rows["a"].best_score == "eval_loss 1.5000 (step 3)"
    assert rows["d"].steps == 1                 # the half-written last row is skipped


def test_a_package_and_the_servers_folder_are_not_runs(tmp_path):
    """The Ship tab packages into ``<run>-package`` and keeps the server's pid in ``.serve``, both beside the runs:
    neither is listed (nor makes the Train tab think a run is training)."""
    from tuneforge.studio.train_tab import running_run

    _run(tmp_path, "a", **{"run.json": json.dumps({"method": "lora", "steps": 3})})
    _run(tmp_path, "a-package", **{"tuneforge.json": "{}"})
    (tmp_path / ".serve").mkdir()
    (tmp_path / ".serve" / process.PID_FILE).write_text(str(os.getpid()))        # a live pid: "running"
    assert [r.path.name for r in list_runs(tmp_path)] == ["a"]
    assert running_run(tmp_path) is None


def test_the_ship_tab_offers_the_exporters_quantizations():
    from tuneforge.export.gguf import QUANTS
    from tuneforge.studio.ship_tab import QUANTS as OFFERED

    assert OFFERED == list(QUANTS)


def test_the_runs_tab_shows_the_gates_tuneforge_pipeline_recorded(tmp_path):
    from tuneforge.pipeline.gates import GateResult
    from tuneforge.runs import RunDir
    from tuneforge.runs.records import PipelineState, StageRecord

    run = _run(tmp_path, "a", **{"run.json": json.dumps({"method": "lora", "steps": 3})})
    gates = [GateResult("loss", True, "", {}, ""), GateResult("min_score", False, ">= 0.5", {}, "0.3", "demo"),
             GateResult("failures", False, "<= 5%", {}, "9%")]
    PipelineState(tuneforge_pipeline=1, stages={"gates": StageRecord(status="ok",
                                                                     gates=[g.to_dict() for g in gates])}).save(run)
    assert RunDir(run).pipeline_state.is_file()
    assert list_runs(tmp_path)[0].gates == "loss passed, min_score accepted, failures FAILED"


def test_a_process_is_found_by_its_pid_file_and_a_second_start_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(process, "tuneforge_command", lambda *args: [sys.executable, "-c",
                                                                     "import time; time.sleep(30)"])
    run = tmp_path / "run"
    pid = process.start(run, ["train", "x.yaml"])
    assert process.read_pid(run) == pid and run_status(run) == "running"     # as a reopened studio finds it
    with pytest.raises(process.AlreadyRunning, match="already running"):
        process.start(run, ["train", "x.yaml"])
    assert process.stop(run, wait_s=10)
    assert process.read_pid(run) is None and not (run / process.PID_FILE).exists()
    assert run_status(run) == "failed"


def test_a_run_name_stays_a_folder_under_the_runs_folder(tmp_path):
    from tuneforge.studio.train_tab import start_run

    fields = schema_fields()
    run_dir, errors = start_run(tmp_path, "../elsewhere", fields, _values(fields, data__train=DATA))
    assert "run name" in errors[""] and not (tmp_path.parent / "elsewhere").exists()


def test_an_ended_process_that_another_process_started_is_not_running(tmp_path):
    """A run the studio started is the studio's child: once it ends it is a zombie until the studio reaps it. Read
    from another process (the benchmark, a second studio), that zombie is not running (it read as running, so
    `studio_targets.py --client none` waited forever)."""
    import subprocess
    import time

    code = "import os, time\npid = os.fork()\nif pid == 0:\n    os._exit(0)\nprint(pid, flush=True)\ntime.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        deadline = time.monotonic() + 10
        while open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":    # not reaped by its parent
            assert time.monotonic() < deadline
            time.sleep(0.05)
        (tmp_path / process.PID_FILE).write_text(str(pid))
        assert process.read_pid(tmp_path) is None
    finally:
        parent.kill()
        parent.wait()
