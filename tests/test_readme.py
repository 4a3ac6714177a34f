"""The README's commands are the ones CI runs: they must not drift apart."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = ROOT.joinpath("README.md").read_text()
    ci = ROOT.joinpath(".ci/run").read_text()
    test_cmd = next(line for line in ci.splitlines() if line.startswith("python3 -m venv"))
    assert test_cmd in readme


def test_readme_quickstart_command_runs_the_quickstart():
    readme = ROOT.joinpath("README.md").read_text()
    assert "tuneforge quickstart" in readme and "examples/quickstart.yaml" in readme
