"""constraints.txt (what CI installs) and pyproject's ranges (what users get) agree.

Every direct dependency is pinned in constraints.txt at a version inside pyproject's range; pyproject caps only
where a release is known to break us, saying why (``scripts/newer_releases.py`` reports what a fresh install
without the constraints gets).
The README's "Tested versions" table names the same versions.
"""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, Version]:
    pins = {}
    for line in ROOT.joinpath("constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads(ROOT.joinpath("pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    return reqs


def test_every_dependency_is_pinned_inside_its_range():
    pins = _pins()
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is a dependency but constraints.txt does not pin it"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{req.name}=={pins[name]} is outside {req.specifier}")


def test_caps_are_few_and_each_says_why():
    """pyproject keeps tested lower bounds; exact pins live in constraints.txt only. A cap (``<``) is allowed where
    an upstream release is known to break us, with a comment on its line (or just above it) saying why; an exact cap
    (``<=`` the tested version) would force a downgrade on anyone with a newer release installed."""
    lines = ROOT.joinpath("pyproject.toml").read_text().splitlines()
    for req in _requirements():
        assert not any(spec.operator in ("<=", "==") for spec in req.specifier), (
            f"{req}: exact versions belong in constraints.txt; keep a tested lower bound (a cap only with a reason)")
        assert any(spec.operator == ">=" for spec in req.specifier), f"{req}: no tested lower bound"
        if any(spec.operator == "<" for spec in req.specifier):
            pattern = re.compile(rf'"{re.escape(req.name)}(\[[^]]*\])?[<>=~!][^"]*"')
            at = next(i for i, line in enumerate(lines) if pattern.search(line) and str(req.specifier).split(",")[0]
                      in line)
            after = lines[at][pattern.search(lines[at]).end():]
            commented = "#" in after or lines[at - 1].strip().startswith("#")
            assert commented, f"{req}: a cap needs a comment saying which release breaks us and how"


def test_readme_names_the_tested_versions():
    readme = ROOT.joinpath("README.md").read_text()
    pins = _pins()
    for name in ("torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes"):
        assert f"| {name} | {pins[name]} |" in readme, f"README's tested-versions table lacks {name} {pins[name]}"
