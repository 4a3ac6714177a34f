"""constraints.txt (what CI installs) and pyproject's ranges (what users get) agree.

Every direct dependency is pinned in constraints.txt at a version inside pyproject's range, and each
``<=`` upper bound is exactly the pinned version: the newest version tested is the newest allowed.
The README's "Tested versions" table names the same versions.
"""

from __future__ import annotations

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


def test_upper_bounds_are_the_tested_versions():
    pins = _pins()
    for req in _requirements():
        for spec in req.specifier:
            if spec.operator == "<=":
                assert Version(spec.version) == pins[canonicalize_name(req.name)], (
                    f"{req.name}: upper bound {spec.version} but constraints.txt tests "
                    f"{pins[canonicalize_name(req.name)]}")


def test_readme_names_the_tested_versions():
    readme = ROOT.joinpath("README.md").read_text()
    pins = _pins()
    for name in ("torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes"):
        assert f"| {name} | {pins[name]} |" in readme, f"README's tested-versions table lacks {name} {pins[name]}"
