"""ruff (lint and import order, ``ruff.toml``) passes over src/ and tests/; mypy (``mypy.ini``) over methods/,
training/ and kernels/."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "src", "tests"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_finds_nothing():
    out = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_source_file_is_ignored_by_git():
    """A pattern in .gitignore meant for outputs (``runs/``) once hid the package ``src/tuneforge/runs/`` from git:
    it passed here and was missing from every clone."""
    if not (ROOT / ".git").exists():
        return
    files = [str(p.relative_to(ROOT)) for p in (ROOT / "src").rglob("*.py") if "__pycache__" not in p.parts]
    files += [str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("*")
              if p.is_file() and "__pycache__" not in p.parts and ".pytest_cache" not in p.parts]
    out = subprocess.run(["git", "check-ignore", "--no-index", *files], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "", f"ignored by .gitignore: {out.stdout.split()}"
