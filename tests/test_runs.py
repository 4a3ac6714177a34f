"""The run directory's records (``tuneforge.runs``): today's files read as version 1 and written back unchanged
(plus ``schema_version``), unknown keys kept, newer versions refused in one line, and the base-model check of
a package written before records were versioned."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MODEL
from tuneforge.runs import (
    SCHEMA_VERSION,
    BaseModelMismatch,
    EvalReport,
    NewerSchemaError,
    NotARunError,
    PackageManifest,
    RunDir,
    RunRecord,
    base_model_sha256,
    verify_base_model,
)

FIXTURE = Path(__file__).parent / "fixtures" / "run_v1"         # written before schema_version (README.md there)
RECORDS = [(RunRecord, FIXTURE), (EvalReport, FIXTURE), (PackageManifest, FIXTURE / "package")]
IDS = ["run.json", "report.json", "tuneforge.json"]


@pytest.mark.parametrize(("cls", "folder"), RECORDS, ids=IDS)
def test_todays_files_load_as_version_1_and_are_written_back_unchanged(cls, folder, tmp_path):
    original = cls.path_in(folder).read_text()
    assert "schema_version" not in original
    record = cls.load(folder)
    assert record.schema_version == 1 and record.model_extra == {}
    written = json.loads(record.to_json())
    assert list(written)[0] == "schema_version" and written.pop("schema_version") == 1
    # the same keys, values, order and formatting as the file: json.dumps of what remains is the file's text
    assert json.dumps(written, indent=cls.INDENT) + ("\n" if cls.FINAL_NEWLINE else "") == original
    saved = record.save(tmp_path)
    assert saved == cls.path_in(tmp_path) and json.loads(saved.read_text()) == {"schema_version": 1,
                                                                                **json.loads(original)}
    assert cls.load(tmp_path) == record and [p.name for p in saved.parent.iterdir()] == [saved.name]


def test_the_fixture_reads_through_typed_fields():
    run, report = RunRecord.load(FIXTURE), EvalReport.load(FIXTURE)
    manifest = PackageManifest.load(FIXTURE / "package")
    assert run.method == "lora" and run.status == "ok" and not run.regressed and run.examples.rejected == 1
    assert run.data[0].path.endswith("tickets.jsonl") and run.versions["torch"]
    assert run.base_sha256() == manifest.base_sha256() == run.base_model.weights_sha256["model.safetensors"]
    assert manifest.kind == "adapter" and not manifest.is_full_model and manifest.rank == 4
    assert manifest.examples == run.examples and manifest.data[1].role == "validation"
    assert report.main_metric in report.sets["test"]["columns"]["tuned"]["metrics"]
    (scores,) = report.set_scores()
    assert scores.name == "test" and scores.n == 3 and set(scores.columns) == {"base", "tuned"}
    assert report.score("test", "tuned", report.main_metric) is not None and report.forgetting_scores() is None
    from tuneforge.config import load_config

    assert load_config(RunDir(FIXTURE).config, check_files=False).method == run.method


def test_unknown_keys_are_kept_and_missing_keys_stay_missing(tmp_path):
    data = {"method": "lora", "from_the_future": {"a": [1, 2]},
            "base_model": {"spec": "m", "weights_sha256": {"x.safetensors": "ab"}, "also_new": 1}}
    (tmp_path / "run.json").write_text(json.dumps(data))
    record = RunRecord.load(tmp_path)
    assert record.model_extra == {"from_the_future": {"a": [1, 2]}} and record.steps is None
    assert record.to_dict() == {"schema_version": 1, **data}
    assert RunRecord(method="full", best_eval_loss=2, wall_time_s=1.5).to_dict() == {
        "schema_version": SCHEMA_VERSION, "method": "full", "best_eval_loss": 2, "wall_time_s": 1.5}
    assert isinstance(RunRecord(best_eval_loss=2).best_eval_loss, int)    # numbers stay as written


@pytest.mark.parametrize(("cls", "folder"), RECORDS, ids=IDS)
def test_a_newer_schema_version_is_refused_in_one_line(cls, folder, tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "run")
    where = Path(str(folder).replace(str(FIXTURE), str(tmp_path / "run")))
    path = cls.path_in(where)
    path.write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1, **json.loads(path.read_text())}))
    with pytest.raises(NewerSchemaError) as e:
        cls.load(where)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}: schema_version {SCHEMA_VERSION + 1}")
    assert "upgrade tuneforge" in message and isinstance(e.value, NotARunError)


def test_a_newer_run_json_stops_tuneforge_package_with_exit_2(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    (run / "run.json").write_text(json.dumps({"schema_version": 99, "method": "lora"}))
    proc = subprocess.run([sys.executable, "-m", "tuneforge.cli", "package", str(run), "--out", str(tmp_path / "p")],
                          capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if "bitsandbytes" not in ln]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert str(run / "run.json") in lines[0] and "schema_version 99" in lines[0] and "upgrade" in lines[0]


@pytest.mark.parametrize(("text", "says"), [
    ("{broken", "not valid JSON (line 1"), ("[1, 2]", "expected a JSON object"),
    ('{"steps": "many"}', "steps: Input should be a valid integer"), ('{"schema_version": "1"}', "not a version"),
])
def test_a_broken_record_is_one_line_naming_the_file_and_the_command(tmp_path, text, says):
    (tmp_path / "run.json").write_text(text)
    with pytest.raises(NotARunError) as e:
        RunRecord.load(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'run.json'}: ") and says in str(e.value)
    assert "`tuneforge train`" in str(e.value) and "\n" not in str(e.value)


def test_a_failed_save_leaves_the_old_file(tmp_path):
    RunRecord(method="lora").save(tmp_path)
    broken = RunRecord(method="full", unserialisable=object())
    with pytest.raises(TypeError):
        broken.save(tmp_path)
    assert RunRecord.load(tmp_path).method == "lora" and [p.name for p in tmp_path.iterdir()] == ["run.json"]


def _old_package(tmp_path: Path) -> Path:
    """A package written before schema_version (the fixture's tuneforge.json, trained on conftest's tiny model)."""
    pkg = tmp_path / "old-package"
    pkg.mkdir()
    shutil.copy(FIXTURE / "package" / "tuneforge.json", pkg / "tuneforge.json")
    return pkg


def test_a_package_of_older_tuneforge_meets_its_base_model(tmp_path, tiny_model_dir):
    """verify_base_model (tuneforge generate/merge/export, and serve --adapter through check_base) reads a
    tuneforge.json without schema_version; the tiny model of conftest is the one the fixture was trained on."""
    from tuneforge.models.loading import build_tiny_model
    from tuneforge.serving.adapters import AdapterLoadError, check_base

    pkg = _old_package(tmp_path)
    trained_on = PackageManifest.load(pkg).base_sha256()
    assert base_model_sha256(tiny_model_dir) == trained_on
    verify_base_model(pkg, tiny_model_dir)
    check_base(pkg, tiny_model_dir)
    other = tmp_path / "other"
    build_tiny_model(MODEL, seed=1).save_pretrained(other)
    with pytest.raises(BaseModelMismatch) as e:
        verify_base_model(pkg, other)
    assert trained_on in str(e.value) and base_model_sha256(other) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(AdapterLoadError, match=trained_on):
        check_base(pkg, other)
    verify_base_model(tmp_path, other)       # a folder without tuneforge.json: nothing to check


def test_the_model_card_of_an_older_manifest(tmp_path):
    from tuneforge.export.model_card import model_card

    manifest = PackageManifest.load(_old_package(tmp_path))
    card = model_card(manifest, "apache-2.0", "org/base")
    assert card == model_card(manifest.to_dict(), "apache-2.0", "org/base")
    assert manifest.base_sha256() in card and "Examples used: 18 for training, 6 for validation" in card
    assert "`not_json` 1" in card and "library_name: peft" in card


def test_load_run_refuses_a_folder_that_is_not_a_run(tmp_path):
    from tuneforge.runs import load_run

    with pytest.raises(FileNotFoundError, match="not a tuneforge run directory"):
        load_run(tmp_path)


def test_importing_runs_does_not_import_torch():
    code = ("import sys, tuneforge.runs, tuneforge.runs.records; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# keys the writers added after the fixture was made (each with its issue): optional in a version-1 file
# #24: the chat template, remote code, the learning rate trained with (and whether it was the method's default)
# #25: the precision mode (and the loss scaler's skipped steps, null but under fp16-mixed)
ADDED_SINCE_V1 = {"RunRecord": {"template", "trust_remote_code", "learning_rate", "learning_rate_default",
                                "precision", "scaler_skipped_steps"}}


def test_a_new_run_writes_todays_keys_plus_schema_version(tmp_path):
    """train, eval and package write the fixture's keys (nested too) with schema_version in front."""
    script = FIXTURE / "make_fixture.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def keys(value, prefix=""):
        """Every key path, but those that name what the machine has (library versions, a GPU's peak) or what
        the tiny model happened to answer (failure categories)."""
        if not isinstance(value, dict) or prefix.endswith(("versions.", "failures.")):
            return set()
        return ({prefix + k for k in value if k != "eval_peak_gpu_mib"}
                | set().union(*(keys(v, f"{prefix}{k}.") for k, v in value.items())))

    for cls, old_folder, new_folder in ((RunRecord, FIXTURE, tmp_path / "run"),
                                        (EvalReport, FIXTURE, tmp_path / "run"),
                                        (PackageManifest, FIXTURE / "package", tmp_path / "package")):
        old = json.loads(cls.path_in(old_folder).read_text())
        new = json.loads(cls.path_in(new_folder).read_text())
        added = ADDED_SINCE_V1.get(cls.__name__, set())
        assert [k for k in new if k not in added] == ["schema_version", *old]
        assert new["schema_version"] == SCHEMA_VERSION
        assert keys(new) - {"schema_version"} - {k for k in keys(new) if k.split(".")[0] in added} == keys(old), \
            cls.__name__
        assert added <= set(new), f"{cls.__name__} no longer writes {added - set(new)}"
