"""`tuneforge eval` end to end on a tiny trained run: every column, the report's numbers against the answers it
holds, the HTML in headless Chromium, bad input as one line and exit 2 with nothing written, atomic writes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_jsonl
from test_eval_judge import endpoint  # noqa: F401  (the fake OpenAI-compatible judge)
from tuneforge.evaluation.metrics import normalise_label

RECIPES = Path(__file__).resolve().parents[1] / "src" / "tuneforge" / "recipes"
DOCS = RECIPES / "data" / "tickets_docs.jsonl"
HANDWRITTEN = RECIPES / "data" / "tickets_handwritten.jsonl"
MMLU = Path(__file__).resolve().parents[2] / "shared" / "data" / "mmlu"


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "tuneforge.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    import tuneforge

    folder = tmp_path_factory.mktemp("eval-run")
    tickets = (RECIPES / "data" / "tickets_train.jsonl").read_text().splitlines()
    train = write_jsonl(folder / "train.jsonl", tickets[:48])
    config = tuneforge.load_config(str(RECIPES / "quickstart.yaml"), [
        f"model={tiny_model_dir}", f"data.train={train}", "max_steps=2", "eval_every=1", "progress=false",
        f"output_dir={folder / 'run'}", "eval.max_examples=6"])
    return tuneforge.train(config).run_dir


@pytest.fixture(scope="module")
def report(tiny_run):
    from tuneforge.evaluation.api import evaluate

    forgetting = {"forgetting": True, "forgetting_data": str(MMLU), "forgetting_per_subject": 1} if MMLU.is_dir() \
        else {}
    return evaluate(tiny_run, columns=["base", "fewshot", "rag", "tuned", "tuned+rag"], docs=str(DOCS),
                    extra={"handwritten": str(HANDWRITTEN)}, max_examples=6, samples=2, progress=False,
                    variability_examples=3, **forgetting)


def test_every_column_answers_the_same_prompts_and_the_numbers_match_the_answers(report):
    r = report.report
    assert set(r["sets"]) == {"test", "handwritten"} and r["main_metric"] == "label"
    for entry in r["sets"].values():
        assert entry["n"] == 6 and list(entry["columns"]) == ["base", "fewshot", "rag", "tuned", "tuned+rag"]
        for col in entry["columns"].values():
            expected = [float(normalise_label(a) == normalise_label(ref))
                        for a, ref in zip(col["answers"], entry["references"], strict=True)]
            assert col["metrics"]["label"]["value"] == pytest.approx(sum(expected) / len(expected))
            iv = col["metrics"]["label"]
            assert iv["low"] <= iv["value"] <= iv["high"]
            assert col["failures"]["wrong"] == len(expected) - sum(expected)
            assert sum(col["failures"]["counts"].values()) == col["failures"]["wrong"]
            assert col["tokens_per_s"] > 0 and col["prompt_tokens"] > 0
        cols = entry["columns"]
        # the prompt cost of each column: few-shot and retrieval add tokens, tuning does not
        assert cols["tuned"]["prompt_tokens"] == cols["base"]["prompt_tokens"]
        assert cols["fewshot"]["prompt_tokens"] > cols["base"]["prompt_tokens"]
        assert cols["rag"]["prompt_tokens"] == cols["tuned+rag"]["prompt_tokens"] > cols["base"]["prompt_tokens"]
        assert "Context:" in cols["rag"]["context_example"]
        assert {"tuned - base", "tuned - fewshot", "tuned - rag", "tuned+rag - tuned"} <= set(entry["paired"])
        assert entry["loss"]["tuned"]["loss"]["value"] > 0 and entry["loss"]["base"]["perplexity"]["value"] > 1
    assert r["variability"]["tuned"]["samples"] == 2
    assert r["metadata"]["method"] == "lora" and r["metadata"]["trainable_params"] > 0
    assert r["metadata"]["merged_for_scoring"]["merged"]          # LoRA scored merged, checked equal


@pytest.mark.skipif(not MMLU.is_dir(), reason="needs ../shared/data/mmlu")
def test_forgetting_section(report):
    f = report.report["forgetting"]
    assert f["questions"] == 57 and f["subjects"] == 57
    assert f["drop"]["value"] == pytest.approx(f["base"]["value"] - f["tuned"]["value"])
    assert f["passed"] == (f["drop"]["value"] <= f["max_drop"])
    assert f["general_text"]["base"]["tokens"] > 500


def test_report_files_and_markdown(report):
    out = report.out_dir
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.md"]
    assert json.loads((out / "report.json").read_text())["sets"]["test"]["n"] == 6
    md = (out / "report.md").read_text()
    assert "| column | label acc |" in md and "Paired bootstrap" in md and "## `handwritten`" in md
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".eval")]


def test_html_is_self_contained_and_renders_the_table_in_chromium(report, tmp_path):
    html = (report.out_dir / "report.html").read_text()
    for external in ("http://", "https://", "<link", "src="):
        assert external not in html.replace("http://www.w3.org/2000/svg", "")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    url = (report.out_dir / "report.html").as_uri()
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert "<table class=\"main\">" in dom and "tuned+rag" in dom and "label acc" in dom
    assert dom.count("data-row=\"1\"") == 12         # the side-by-side viewer: 6 prompts of each set
    assert dom.count("class=\"metric-chart\"") == 2    # the main metric's chart, one per set
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *flags, "--window-size=1280,2400", f"--screenshot={shot}", url], capture_output=True,
                   timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_the_metric_chart_draws_each_columns_value_and_interval(report):
    """Each column's bar ends at its main-metric value and its whisker spans its interval, on one 0-100% axis: the
    chart's geometry read back against report.json's numbers."""
    from tuneforge.evaluation.report import metric_chart_svg

    r = report.report
    entry = r["sets"]["test"]
    svg = metric_chart_svg(entry, r["main_metric"], "label acc", width=560)
    bars = re.findall(r"<rect class='bar' data-column='([^']+)' data-value='([^']+)' x='(\d+)' y='\d+' "
                      r"width='([\d.]+)'", svg)
    whiskers = re.findall(r"data-low='([^']+)' data-high='([^']+)' stroke='[^']+'><line x1='([\d.]+)' "
                          r"x2='([\d.]+)'", svg)
    assert [b[0] for b in bars] == list(entry["columns"]) and len(whiskers) == len(bars)
    for (name, value, x0, width), (low, high, lo_x, hi_x) in zip(bars, whiskers, strict=True):
        iv = entry["columns"][name]["metrics"][r["main_metric"]]
        assert float(value) == iv["value"] and (float(low), float(high)) == (iv["low"], iv["high"])
        scale = 560 - 96 - 56          # the plot's width: 100%
        assert float(width) == pytest.approx(iv["value"] * scale, abs=0.06)
        assert float(lo_x) == pytest.approx(int(x0) + iv["low"] * scale, abs=0.06)
        assert float(hi_x) == pytest.approx(int(x0) + iv["high"] * scale, abs=0.06)
    html = (report.out_dir / "report.html").read_text()
    assert html.count("class='metric-chart'") == len(r["sets"])


def test_a_failed_write_leaves_the_previous_report(report, monkeypatch):
    from tuneforge.evaluation import report as report_module

    before = (report.out_dir / "report.md").read_text()

    def broken(_):
        raise RuntimeError("disk full")
    monkeypatch.setattr(report_module, "to_html", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        report_module.write_report(report.report, report.out_dir)
    assert (report.out_dir / "report.md").read_text() == before
    assert not [p for p in report.out_dir.parent.iterdir() if p.name.startswith(".eval")]


def _bad_input(capfd, run, *args, in_subprocess=False):
    """``tuneforge eval RUN ARGS``: its exit code, stderr and error lines (in this process unless ``in_subprocess``:
    the same ``cli.main``, without 5 s of imports per case)."""
    from tuneforge.cli import main

    if in_subprocess:
        proc = cli("eval", str(run), "--no-progress", *args)
        code, stderr = proc.returncode, proc.stderr
    else:
        capfd.readouterr()
        code = main(["eval", str(run), "--no-progress", *map(str, args)])
        stderr = capfd.readouterr().err
    return code, stderr, [line for line in stderr.splitlines() if line.startswith("error:")]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_run, tmp_path, capfd):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("eval"))
    bad_test = tmp_path / "bad.jsonl"
    bad_test.write_text(HANDWRITTEN.read_text().splitlines()[0] + "\n{not json\n")
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "objekt"}))
    cases = [
        ((tmp_path / "nowhere",), "no such run directory", "nowhere"),
        ((RECIPES,), "not a tuneforge run directory", str(RECIPES)),
        ((run, "--data", str(bad_test)), "test record unusable", f"{bad_test}:2"),
        ((run, "--json-schema", str(schema)), "not a valid JSON Schema", "eval.json_schema"),
        ((run, "--columns", "base,rag", "--docs", str(tmp_path / "no-docs")), "folder not found", "no-docs"),
        ((run, "--columns", "base,tuned", "--judge", "http://127.0.0.1:9/v1"), "does not answer", "127.0.0.1:9"),
        ((run, "--columns", "base,tunde"), "unknown column", "tunde"),
    ]
    for i, ((target, *args), message, where) in enumerate(cases):
        code, stderr, errors = _bad_input(capfd, target, *args, in_subprocess=i == 2)   # one as users run it
        assert code == 2, (args, stderr[-2000:])
        assert "Traceback" not in stderr
        assert len(errors) == 1 and message in errors[0] and where in errors[0], (args, errors)
        assert "Loading weights" not in stderr            # failed before any model loaded
    assert not (run / "eval").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".eval")]


def test_cli_prints_the_table(tiny_run, tmp_path):
    proc = cli("eval", str(tiny_run), "--no-progress", "--max-examples", "3", "--out", str(tmp_path / "ev"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| column | label acc |" in proc.stdout and "| tuned |" in proc.stdout
    assert (tmp_path / "ev" / "report.html").is_file()


def test_judge_section_through_the_fake_endpoint(tiny_run, endpoint, tmp_path):  # noqa: F811
    from tuneforge.evaluation.api import evaluate

    url, calls = endpoint
    result = evaluate(tiny_run, columns=["base", "tuned"], max_examples=3, judge=url, out=tmp_path / "ev",
                      progress=False, settings=None)
    j = result.report["judge"]
    assert j["n"] == 3 and len(calls) == 6 and j["against"] == "base"
    assert j["win"]["value"] + j["tie"]["value"] + j["loss"]["value"] == pytest.approx(1.0)
    assert "LLM-as-judge" in (tmp_path / "ev" / "report.md").read_text()


def test_train_with_eval_after_training_checks_the_eval_input_before_the_first_step(tiny_model_dir, tmp_path,
                                                                                     capfd):
    """A bad eval input (here a missing docs folder, then a test record that is not JSON) fails `tuneforge train`
    in one line with exit 2 before any training step, not after the last one."""
    tickets = (RECIPES / "data" / "tickets_train.jsonl").read_text().splitlines()
    train = write_jsonl(tmp_path / "train.jsonl", tickets[:16])
    bad_test = tmp_path / "bad.jsonl"
    bad_test.write_text(HANDWRITTEN.read_text().splitlines()[0] + "\n{not json\n")
    common = [str(RECIPES / "quickstart.yaml"), "--set", f"model={tiny_model_dir}", "--set", f"data.train={train}",
              "--set", "max_steps=2", "--set", "progress=false", "--set", "eval.after_training=true",
              "--set", "eval.columns=[base,rag,tuned]"]
    cases = [
        (["--set", f"eval.docs={tmp_path / 'no-docs'}", "--set", f"output_dir={tmp_path / 'a'}"], "no-docs", "a"),
        (["--set", f"eval.docs={DOCS}", "--set", f"eval.data={bad_test}", "--set", f"output_dir={tmp_path / 'b'}"],
         f"{bad_test}:2", "b"),
    ]
    for i, (extra, where, out) in enumerate(cases):
        if i == 0:                                                   # as users run it
            proc = cli("train", *common, *extra)
            code, stderr = proc.returncode, proc.stderr
        else:                                                        # the same main, in this process
            from tuneforge.cli import main

            capfd.readouterr()
            code, stderr = main(["train", *common, *extra]), capfd.readouterr().err
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert code == 2, stderr[-2000:]
        assert "Traceback" not in stderr
        assert len(errors) == 1 and "eval.after_training" in errors[0] and where in errors[0], errors
        assert not (tmp_path / out / "metrics.jsonl").exists()      # no step ran
    # the same settings with good input train and evaluate
    proc = cli("train", *common, "--set", f"eval.docs={DOCS}", "--set", "eval.max_examples=3",
               "--set", f"output_dir={tmp_path / 'c'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "c" / "eval" / "report.json").is_file()
