"""Competitors' own virtual environments, built once and cached, so their pins never touch ours.

Each venv lives in ``$TUNEFORGE_CACHE/bench-venvs/<name>`` (default ``~/.cache/tuneforge/bench-venvs``) and
is built with ``python -m venv``, then ``pip install torch==<ours>`` (the local CPU wheel installs in
seconds), then the competitor's packages pinned. A ``ready.json`` written last records the installed
versions; a venv without it (an interrupted or failed build) is rebuilt. A failed build leaves
``failed.json`` with the reason, and is not retried within ``retry_after_s`` unless forced.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tuneforge.fileutil import cache_dir

TORCH = "torch==2.13.0"


@dataclass(frozen=True)
class VenvSpec:
    name: str
    packages: tuple[str, ...]        # installed after torch, with torch held at TORCH by a constraint
    report: tuple[str, ...]          # distributions whose versions go into ready.json
    remove: tuple[str, ...] = ()     # uninstalled afterwards (binary wheels built for another torch)
    timeout_s: int = 900
    env: tuple[tuple[str, str], ...] = ()   # build settings (recorded in ready.json)
    torch: bool = True               # install our torch first (a venv that never imports it skips it)


TRL = VenvSpec("trl", ("trl==1.16.0", "peft==0.21.2", "transformers==5.23.0", "accelerate", "datasets"),
               ("torch", "trl", "peft", "transformers", "accelerate", "datasets"))
# TRL on a GPU: the same, plus Liger's Triton kernels (use_liger_kernel=True: the trl-liger row). A venv of its own
# so the CPU bench's TRL venv is not rebuilt. On a Linux GPU machine pip's torch wheel is the CUDA build.
LIGER = "liger-kernel==0.8.5"
TRL_GPU = VenvSpec("trl-gpu", (*TRL.packages, LIGER), (*TRL.report, "liger-kernel"))
# pip resolves torchvision 0.28 (a CUDA build: its ops fail to load against torch+cpu) and torchaudio 2.11
# (no release for torch 2.13): both are removed; text SFT needs neither (llamafactory_recipe.py stubs the
# `import torchaudio` of LLaMA-Factory's multimodal plugin).
LLAMAFACTORY = VenvSpec("llamafactory", ("llamafactory==0.9.5",),
                        ("torch", "llamafactory", "transformers", "peft", "trl", "accelerate", "datasets"),
                        remove=("torchvision", "torchaudio"))


# llama.cpp, the GGUF consumer users have, through its Python binding, compiled from the sdist (10-20 min on 2
# cores, once per machine). Portable flags (no -march=native): the cache may move between machines of a kind.
LLAMACPP = VenvSpec("llamacpp", ("llama-cpp-python==0.3.36", "numpy"), ("llama_cpp_python", "numpy"),
                    timeout_s=3600, torch=False,
                    env=(("CMAKE_ARGS", "-DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DGGML_OPENMP=ON -DLLAMA_CURL=OFF"),
                         ("CMAKE_BUILD_PARALLEL_LEVEL", "2")))


# lm-evaluation-harness, the MMLU cloze reference (tests/test_lm_eval_harness.py, benchmarks/eval_throughput.py):
# run with its own task code, on transformers and tokenizers at our pins (the same model code and token split).
LM_EVAL = VenvSpec("lm-eval", ("lm-eval==0.4.13", "transformers==5.24.0", "tokenizers==0.23.3", "accelerate"),
                   ("torch", "lm-eval", "transformers", "tokenizers", "datasets", "accelerate"))

SPECS = {spec.name: spec for spec in (TRL, TRL_GPU, LLAMAFACTORY, LLAMACPP, LM_EVAL)}


def venv_root() -> Path:
    return cache_dir() / "bench-venvs"


def python_of(spec: VenvSpec) -> Path:
    return venv_root() / spec.name / "bin" / "python"


def ready(spec: VenvSpec) -> dict | None:
    marker = venv_root() / spec.name / "ready.json"
    return json.loads(marker.read_text()) if marker.is_file() else None


def _versions(python: Path, dists: tuple[str, ...]) -> dict[str, str]:
    code = ("import json, importlib.metadata as m\nout = {}\nfor d in %r:\n"
            "    try: out[d] = m.version(d)\n    except m.PackageNotFoundError: out[d] = None\n"
            "print(json.dumps(out))") % (dists,)
    return json.loads(subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout)


def ensure_venv(spec: VenvSpec, force: bool = False, retry_after_s: float = 24 * 3600,
                log=print) -> tuple[Path | None, str]:
    """Return ``(python, versions text)`` of a ready venv, building it if needed, or ``(None, reason)``."""
    folder = venv_root() / spec.name
    info = ready(spec)
    if info and not force:
        return python_of(spec), ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    failed = folder / "failed.json"
    if failed.is_file() and not force:
        prev = json.loads(failed.read_text())
        if time.time() - prev["time"] < retry_after_s:
            return None, f"venv build failed earlier ({prev['reason']}); rerun with --rebuild-venvs to retry"
    if folder.exists():
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    log(f"building the {spec.name} venv in {folder} (once; pip log in {folder}.log)")
    started = time.time()
    constraint = folder.parent / f"{spec.name}-constraints.txt"
    constraint.write_text(TORCH + "\n")
    pip_log = open(f"{folder}.log", "w")
    env = dict(os.environ, PIP_CONSTRAINT=str(constraint), **dict(spec.env))  # torch held at our version
    steps = [[sys.executable, "-m", "venv", str(folder)],
             *([[str(folder / "bin/python"), "-m", "pip", "install", "-q", TORCH]] if spec.torch else []),
             [str(folder / "bin/python"), "-m", "pip", "install", "-q", *spec.packages]]
    if spec.remove:
        steps.append([str(folder / "bin/python"), "-m", "pip", "uninstall", "-y", "-q", *spec.remove])
    try:
        for cmd in steps:
            left = spec.timeout_s - (time.time() - started)
            pip_log.write("$ " + " ".join(cmd) + "\n")
            pip_log.flush()
            proc = subprocess.run(cmd, stdout=pip_log, stderr=subprocess.STDOUT, env=env, timeout=max(left, 1))
            if proc.returncode != 0:
                tail = Path(f"{folder}.log").read_text().strip().splitlines()[-3:]
                raise RuntimeError(f"`{' '.join(cmd[2:])}` failed: {' | '.join(tail)[-300:]}")
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        reason = f"install timed out after {spec.timeout_s}s" if isinstance(e, subprocess.TimeoutExpired) else str(e)
        folder.mkdir(parents=True, exist_ok=True)
        failed.write_text(json.dumps({"time": time.time(), "reason": reason}))
        return None, reason
    finally:
        pip_log.close()
    versions = _versions(python_of(spec), spec.report)
    (folder / "ready.json").write_text(json.dumps({"versions": versions, "build_s": round(time.time() - started, 1),
                                                   "build_env": dict(spec.env)}))
    log(f"{spec.name} venv ready in {time.time() - started:.0f}s: {versions}")
    return python_of(spec), ", ".join(f"{k} {v}" for k, v in versions.items() if v)


if __name__ == "__main__":  # python benchmarks/throughput/venvs.py trl [llamafactory] [llamacpp] [lm-eval] [--force]
    for name in [a for a in sys.argv[1:] if not a.startswith("--")]:
        print(name, ensure_venv(SPECS[name], force="--force" in sys.argv))
