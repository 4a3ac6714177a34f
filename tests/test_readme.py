"""The README's commands are the ones CI runs, and the documentation's tables match the code: they must not drift
apart."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS_GUIDE = ROOT / "docs" / "guides" / "methods.md"     # where the support matrix lives


def test_ci_runs_the_readme_test_command():
    readme = ROOT.joinpath("README.md").read_text()
    ci = ROOT.joinpath(".ci/run").read_text()
    test_cmd = next(line for line in ci.splitlines() if line.startswith("python3 -m venv"))
    assert test_cmd in readme


def test_readme_quickstart_command_runs_the_quickstart():
    readme = ROOT.joinpath("README.md").read_text()
    assert "tuneforge quickstart" in readme and "examples/quickstart.yaml" in readme


def test_support_matrix_merge_column_matches_the_code():
    from tuneforge.methods import mergeable_methods, not_mergeable_methods

    lines = METHODS_GUIDE.read_text().splitlines()
    header = next(line for line in lines if line.startswith("| `method:` |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    at = columns.index("merge")
    table = lines[lines.index(header) + 2:]
    rows = table[:next((i for i, line in enumerate(table) if not line.startswith("|")), len(table))]
    merge = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == len(columns), row
        merge[cells[0].split("`")[1]] = cells[at]
    assert set(merge) == {"full", "lora", "qlora", "adapter", "prefix", "prompt", "ia3"}
    for method in mergeable_methods():
        assert merge[method].startswith("✔"), method
    for method in not_mergeable_methods():
        assert merge[method].startswith("✘"), method


def test_the_own_data_commands_never_validate_on_the_quickstart_tickets():
    """Every command of the README or the docs that trains on the user's file also replaces the config's
    validation file."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    commands = [(page.name, line) for page in pages for line in page.read_text().splitlines()
                if line.startswith("tuneforge train") and "data.train=" in line]
    assert {name for name, _ in commands} >= {"README.md", "own-data.md", "preference.md"}
    for name, line in commands:
        assert "data.validation=" in line, f"{name}: {line}"
