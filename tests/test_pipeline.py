"""``tuneforge pipeline``: the gates against hand-made reports (the bootstrap against its definition), then the
stages end to end on a tiny random model: a first run, a rerun that skips everything, gates failed and accepted,
--force/--from/--until, a changed data file rerunning from curate, and a failing stage (exit 2, earlier outputs
kept). Every end-to-end test works on its own copy of one run (a run directory moved keeps its records valid)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import write_jsonl
from tuneforge.cli import main
from tuneforge.config.pipeline import BeatsBaselinesGate, FailuresGate, LossGate, MinScoreGate
from tuneforge.errors import ConfigError
from tuneforge.pipeline import gates
from tuneforge.runs import EvalReport, PipelineState, RunDir

RECIPES = Path(__file__).resolve().parents[1] / "src" / "tuneforge" / "recipes"
DATA = RECIPES / "data"


def _report(tuned: list[int], baseline: list[int], counts: dict | None = None) -> EvalReport:
    def column(correct):
        return {"metrics": {"label": {"value": sum(correct) / len(correct), "low": 0.0, "high": 1.0}},
                "categories": [None if c else "wrong_label" for c in correct],
                "failures": {"n": len(correct), "wrong": len(correct) - sum(correct), "counts": counts or {}}}
    return EvalReport.model_validate({"main_metric": "label", "sets": {"test": {"n": len(tuned), "columns": {
        "tuned": column(tuned), "fewshot": column(baseline)}}}})


def _p_not_better(a, b, resamples, seed):
    """The paired bootstrap by its definition: resample prompt indices, the share of means of a - b <= 0."""
    diff = np.asarray(a, float) - np.asarray(b, float)
    idx = np.random.default_rng(seed).integers(0, len(diff), size=(resamples, len(diff)))
    return float((diff[idx].mean(axis=1) <= 0).mean())


def test_beats_baselines_pairs_each_prompts_verdict():
    tuned, base = [1] * 14 + [0] * 2, [1] * 5 + [0] * 11
    gate = BeatsBaselinesGate(against=["fewshot"], max_p_not_better=0.05, resamples=500, seed=3)
    result = gates.beats_baselines(_report(tuned, base), gate)
    assert result.passed and result.numbers["fewshot"]["tuned"] == pytest.approx(14 / 16)
    assert result.numbers["fewshot"]["p_not_better"] == pytest.approx(_p_not_better(tuned, base, 500, 3))
    close = [1] * 6 + [0] * 10      # one prompt apart: not beaten at 0.05
    failed = gates.beats_baselines(_report(close, [1] * 5 + [0] * 11), gate)
    assert not failed.passed and failed.numbers["fewshot"]["p_not_better"] > 0.05
    assert "p_not_better" in failed.detail and "fewshot" in failed.detail


def test_failure_caps_min_score_and_loss(tmp_path):
    report = _report([1] * 8 + [0] * 2, [0] * 10, counts={"refusal": 2})
    assert not gates.failures(report, FailuresGate(caps={"refusal": 0.1})).passed          # 2/10 > 10%
    assert gates.failures(report, FailuresGate(caps={"refusal": 0.2})).passed
    assert gates.min_score(report, MinScoreGate(set="test", min=0.8)).passed
    assert not gates.min_score(report, MinScoreGate(set="test", min=0.81)).passed
    assert not gates.min_score(report, MinScoreGate(set="handwritten", min=0.0)).passed    # no such set: fails
    run = RunDir(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"status": "ok"}))
    write_jsonl(run.metrics, [{"step": 1, "loss": 2.0}, {"step": 2, "eval_loss": 9.0}, {"step": 3, "loss": 1.5}])
    assert gates.loss(run, LossGate(max_final_over_first=1.0)).numbers["ratio"] == pytest.approx(0.75)
    assert not gates.loss(run, LossGate(max_final_over_first=0.7)).passed
    write_jsonl(run.metrics, [{"step": 1, "loss": 2.0}, {"step": 2, "loss": float("nan")}])
    assert not gates.loss(run, LossGate(max_final_over_first=10)).passed


@pytest.fixture(scope="module")
def tickets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline-data")
    return write_jsonl(folder / "train.jsonl", (DATA / "tickets_train.jsonl").read_text().splitlines()[:48])


def _args(tiny_model_dir, out: Path, train: Path, *extra: str) -> list[str]:
    sets = [f"model={tiny_model_dir}", f"data.train={train}",
            f"data.validation={DATA / 'tickets_validation.jsonl'}", "max_steps=2", "eval_every=1", "progress=false",
            f"output_dir={out}", "eval.max_examples=4", "eval.columns=[base,fewshot,tuned]",
            f"eval.extra={{handwritten: {DATA / 'tickets_handwritten.jsonl'}}}",
            "pipeline.gates.min_score.min=0.0", "pipeline.gates.loss.max_final_over_first=100",
            "pipeline.gates.failures.caps={never_stopped: 1.0}", *extra]
    return ["pipeline", str(RECIPES / "quickstart.yaml"), *[a for s in sets for a in ("--set", s)]]


def _statuses(out: Path) -> dict[str, str]:
    return {s["name"]: s["status"] for s in json.loads((out / "pipeline" / "summary.json").read_text())["stages"]}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_model_dir, tickets):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    assert main(_args(tiny_model_dir, out, tickets)) == 0
    return out


@pytest.fixture
def run_copy(first_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(first_run, out)
    return out


def test_first_run_runs_every_stage_and_records_hashes(first_run):
    assert _statuses(first_run) == {s: "ran" for s in ("curate", "train", "evaluate", "gates", "package")}
    state = PipelineState.load(first_run)
    assert state is not None and set(state.stages) == {"curate", "train", "evaluate", "gates", "package"}
    train = state.stages["train"]
    clean = "pipeline/curated/clean.jsonl"       # recorded relative to the run: a moved run stays up to date
    assert train.inputs[f"data:{clean}"] == state.stages["curate"].outputs[clean]
    assert "eval/report.json" in state.stages["evaluate"].outputs
    assert (first_run / "package" / "tuneforge.json").is_file()
    assert [g["name"] for g in state.stages["gates"].gates] == ["failures", "min_score", "loss"]
    assert all(g["verdict"] == "passed" for g in state.stages["gates"].gates)
    md = (first_run / "pipeline" / "summary.md").read_text()
    assert "| curate | ran |" in md and "| min_score | passed |" in md
    page = (first_run / "eval" / "report.html").read_text()      # the report's own sections, then the pipeline's
    assert page.index("<h2>Loss curve</h2>") < page.index("<h2>Pipeline</h2>")
    assert "<td>min_score</td><td>passed</td>" in page and "<td>package</td><td>ran</td>" in page


def test_rerun_skips_every_stage_quickly(run_copy, tiny_model_dir, tickets, capsys):
    began = time.time()
    assert main(_args(tiny_model_dir, run_copy, tickets)) == 0
    assert time.time() - began < 10
    assert set(_statuses(run_copy).values()) == {"skipped"}
    assert "| package | skipped |" in capsys.readouterr().out


def test_impossible_gate_stops_before_package_and_accepting_records_the_reason(run_copy, tiny_model_dir, tickets,
                                                                             capsys):
    shutil.rmtree(run_copy / "package")
    impossible = "pipeline.gates.min_score.min=1.01"
    assert main(_args(tiny_model_dir, run_copy, tickets, impossible)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "gate min_score failed" in err and "(min 1.01)" in err
    assert str(run_copy / "eval" / "report.html") in err
    assert not (run_copy / "package").exists()
    assert _statuses(run_copy)["gates"] == "ran" and _statuses(run_copy)["package"] == "not run"
    assert main(_args(tiny_model_dir, run_copy, tickets, impossible) + ["--accept-gate", "min_score", "--reason",
                                                                        "a random tiny model"]) == 0
    gate = next(g for g in json.loads((run_copy / "pipeline" / "summary.json").read_text())["gates"]
                if g["name"] == "min_score")
    assert gate["verdict"] == "accepted" and gate["accepted"] == "a random tiny model" and not gate["passed"]
    assert (run_copy / "package" / "tuneforge.json").is_file()
    # the acceptance holds while the gates' inputs stay the same
    assert main(_args(tiny_model_dir, run_copy, tickets, impossible)) == 0
    assert main(_args(tiny_model_dir, run_copy, tickets, impossible) + ["--accept-gate", "loss"]) == 2   # no --reason
    assert "--reason" in capsys.readouterr().err


def test_force_from_and_until(run_copy, tiny_model_dir, tickets):
    assert main(_args(tiny_model_dir, run_copy, tickets) + ["--force", "evaluate", "--until", "gates"]) == 0
    assert _statuses(run_copy) == {"curate": "skipped", "train": "skipped", "evaluate": "ran", "gates": "ran",
                                   "package": "not run"}
    assert main(_args(tiny_model_dir, run_copy, tickets) + ["--from", "package"]) == 0
    assert _statuses(run_copy) == {"curate": "not run", "train": "not run", "evaluate": "not run",
                                   "gates": "not run", "package": "ran"}


def test_changed_data_reruns_from_curate(run_copy, tiny_model_dir, tickets, tmp_path):
    changed = write_jsonl(tmp_path / "train.jsonl", tickets.read_text().splitlines()[:40])
    assert main(_args(tiny_model_dir, run_copy, changed) + ["--until", "train"]) == 0
    assert _statuses(run_copy)["curate"] == "ran" and _statuses(run_copy)["train"] == "ran"


def test_failing_stage_exits_2_and_keeps_earlier_outputs(run_copy, tiny_model_dir, tickets, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("not a package")
    assert main(_args(tiny_model_dir, run_copy, tickets, f"pipeline.package.out={taken}")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tuneforge pipeline: stage package failed:")
    assert (run_copy / "eval" / "report.json").is_file() and (run_copy / "run.json").is_file()
    state = PipelineState.load(run_copy)
    assert state.stages["package"].status == "failed" and state.stages["train"].status == "ok"


def test_bad_pipeline_settings_fail_before_any_stage(tmp_path, tiny_model_dir, tickets, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, out, tickets, "pipeline.stages=[train,deploy]")) == 2
    assert "unknown stage(s) deploy" in capsys.readouterr().err
    assert main(_args(tiny_model_dir, out, tickets, "pipeline.gates.beats_baselines={against: [rag]}")) == 2
    assert "not in eval.columns" in capsys.readouterr().err
    assert main(_args(tiny_model_dir, out, tickets) + ["--accept-gate", "forgetting", "--reason", "x"]) == 2
    assert "not a configured gate" in capsys.readouterr().err
    assert not out.exists()


def test_check_pipeline_refuses_a_forgetting_gate_without_the_check():
    from tuneforge.config import load_config
    from tuneforge.pipeline.runner import check_pipeline

    config = load_config(str(RECIPES / "quickstart.yaml"), ["pipeline.gates.forgetting={max_drop: 0.01}"])
    with pytest.raises(ConfigError, match="eval.forgetting.enabled"):
        check_pipeline(config, config.pipeline, None, None, [], {})


def test_quickstart_is_a_pipeline_run(tmp_path, tiny_model_dir, tickets, capsys):
    """The quickstart's gates on a random model: tuned beats nothing, so it stops before package with exit 1 (the
    tables printed); accepted, it packages and prints the pipeline's table; a rerun skips every stage."""
    out = tmp_path / "quickstart"
    sets = [f"model={tiny_model_dir}", f"data.train={tickets}", "max_steps=2", "eval_every=1", "progress=false",
            f"output_dir={out}", "eval.max_examples=4"]
    argv = ["quickstart", *[a for s in sets for a in ("--set", s)]]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "gate beats_baselines failed" in captured.err and "| fewshot" in captured.out and "| rag" in captured.out
    assert not (out / "package").exists()
    accept = [a for g in ("beats_baselines", "failures", "min_score", "loss") for a in ("--accept-gate", g)]
    assert main([*argv, *accept, "--reason", "a random tiny model"]) == 0
    printed = capsys.readouterr().out
    assert "handwritten: 4 tickets" in printed and "| package | ran |" in printed and "| beats_baselines | accepted |" \
        in printed
    assert main(argv) == 0
    assert "| train | skipped |" in capsys.readouterr().out


def test_export_stage_follows_the_package(run_copy, tiny_model_dir, tickets):
    """Adding export to the stages runs it alone: the earlier stages' inputs do not include the stage list."""
    stages = "pipeline.stages=[curate,train,evaluate,gates,package,export]"
    assert main(_args(tiny_model_dir, run_copy, tickets, stages, "pipeline.export.format=gguf-lora")) == 0
    statuses = _statuses(run_copy)
    assert statuses.pop("export") == "ran" and set(statuses.values()) == {"skipped"}
    assert (run_copy / "export" / "run-lora.gguf").stat().st_size > 0


def test_serve_stage_listens_on_this_machine_only():
    from tuneforge.config import load_config

    with pytest.raises(ConfigError, match="this machine only"):
        load_config(str(RECIPES / "quickstart.yaml"), ["pipeline.serve.host=0.0.0.0"])
