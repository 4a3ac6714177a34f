"""The quickstart installs as users install: its config and ticket data are package data, found from any folder.

A wheel is built from a copy of ``pyproject.toml``, ``README.md`` and ``src/`` (no network, no build
isolation, nothing written into the checkout) and unpacked with ``pip install --target``; the installed
copy then runs from an empty folder that holds a decoy ``examples/quickstart.yaml``. ``.ci/run`` does the
same with a real ``pip install .`` into a second virtualenv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "src" / "tuneforge" / "recipes"
SHIPPED = ("quickstart.yaml", "data/tickets_train.jsonl", "data/tickets_validation.jsonl", "data/tickets_test.jsonl")
DECOY = "not: a run config\n"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools", minversion="70.1", reason="needs setuptools' own bdist_wheel (>= 70.1)")
    tree = tmp_path_factory.mktemp("tree")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(tree / "dist"), str(tree)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return next((tree / "dist").glob("tuneforge-*.whl"))


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel installed (non-editable, no dependencies) into a folder that goes first on PYTHONPATH."""
    site = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                           str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return site


def _elsewhere(tmp_path: Path) -> Path:
    """An empty folder outside the checkout, with a decoy where a clone keeps the quickstart config."""
    folder = tmp_path / "elsewhere"
    (folder / "examples").mkdir(parents=True)
    (folder / "examples" / "quickstart.yaml").write_text(DECOY)
    return folder


def _run(site: Path, cwd: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONNOUSERSITE="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _files(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_the_repository_holds_one_copy_and_examples_link_to_it():
    for rel in SHIPPED:
        assert (RECIPES / rel).is_file() and not (RECIPES / rel).is_symlink(), rel
        assert (ROOT / "examples" / rel).samefile(RECIPES / rel), rel


def test_the_wheel_carries_the_quickstart_config_and_data(wheel):
    with zipfile.ZipFile(wheel) as zf:
        for rel in SHIPPED:
            assert zf.read(f"tuneforge/recipes/{rel}") == (RECIPES / rel).read_bytes(), rel


def test_installed_quickstart_reads_its_config_from_the_package_not_the_current_folder(installed, tmp_path):
    folder = _elsewhere(tmp_path)
    code = ("import tuneforge; from tuneforge.quickstart import quickstart_config; "
            "print(tuneforge.__file__); print(quickstart_config())")
    proc = _run(installed, folder, "-c", code)
    assert proc.returncode == 0, proc.stderr
    module, config = (Path(line) for line in proc.stdout.splitlines())
    assert module == installed / "tuneforge" / "__init__.py"
    assert config == installed / "tuneforge" / "recipes" / "quickstart.yaml"


def test_print_config_gives_a_config_that_trains_from_any_folder(installed, tmp_path):
    folder = _elsewhere(tmp_path)
    proc = _run(installed, folder, "-m", "tuneforge.cli", "quickstart", "--print-config")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# The quickstart")  # the comments are kept
    (folder / "my.yaml").write_text(proc.stdout)
    check = ("from tuneforge.config import load_config; c = load_config('my.yaml', ['max_steps=2']); "
             "print(c.data.train); print(c.data.validation); print(c.eval.data); print(c.output_dir)")
    proc = _run(installed, folder, "-c", check)
    assert proc.returncode == 0, proc.stderr
    train, validation, test, output_dir = proc.stdout.splitlines()
    data = installed / "tuneforge" / "recipes" / "data"
    assert [train, validation, test] == [str(data / f"tickets_{s}.jsonl") for s in ("train", "validation", "test")]
    assert output_dir == "runs/quickstart"  # relative: the run goes under the current folder
    original = yaml.safe_load((RECIPES / "quickstart.yaml").read_text())
    printed = yaml.safe_load((folder / "my.yaml").read_text())
    for section, key in (("data", "train"), ("data", "validation"), ("eval", "data")):
        original[section][key] = printed[section][key]
    assert printed == original  # nothing but the data paths changed


@pytest.mark.integration
def test_installed_quickstart_runs_from_an_empty_folder_and_writes_only_there(installed, tmp_path):
    """One step on the real model: the run lands under the current folder; the package is only read. (One step
    does not pass the quickstart's gates: they are accepted, as the pipeline lets a user do with a reason.)"""
    folder = _elsewhere(tmp_path)
    before = _files(installed)
    proc = _run(installed, folder, "-m", "tuneforge.cli", "quickstart", "--set", "max_steps=1", "--set",
                "eval.max_examples=2", "--set", "progress=false", "--accept-gate", "beats_baselines", "--accept-gate",
                "failures", "--accept-gate", "min_score", "--accept-gate", "loss", "--reason",
                "one step on two tickets", timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| tuned" in proc.stdout
    assert (folder / "runs" / "quickstart" / "eval" / "report.json").is_file()
    assert _files(installed) == before


def test_the_wheel_carries_the_builtin_chat_templates(wheel):
    from tuneforge.data.templates import BUILTINS

    folder = ROOT / "src" / "tuneforge" / "data" / "templates"
    with zipfile.ZipFile(wheel) as zf:
        for name in BUILTINS:
            assert zf.read(f"tuneforge/data/templates/{name}.jinja") == (folder / f"{name}.jinja").read_bytes(), name
