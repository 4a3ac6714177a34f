"""llama.cpp as the GGUF reference: what it computes from tuneforge's GGUF files, next to the merged model.

Used by ``tests/test_export_llamacpp.py`` (tiny model) and ``benchmarks/gguf/llamacpp_table.py`` (the real
model, the export guide's table). llama.cpp runs in its own cached venv (``venvs.LLAMACPP``, built once per
machine by ``python benchmarks/throughput/venvs.py llamacpp``); :func:`llamacpp_outputs` runs
``llamacpp_run.py`` there.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "throughput"))
import venvs  # noqa: E402


def llamacpp_python() -> Path | None:
    """The llama.cpp venv's python when it is built (nothing is built here), else None."""
    return venvs.python_of(venvs.LLAMACPP) if venvs.ready(venvs.LLAMACPP) else None


def llamacpp_outputs(gguf: Path, sequences: list[list[int]], greedy: int = 0, texts: list[str] | None = None,
                     lora: Path | None = None, threads: int = 2) -> dict[str, np.ndarray]:
    python = llamacpp_python()
    if python is None:
        raise RuntimeError("llama.cpp's venv is not built: python benchmarks/throughput/venvs.py llamacpp")
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"model": str(gguf), "lora": str(lora) if lora else None, "sequences": sequences,
                                   "greedy": greedy, "texts": texts or [], "threads": threads}))
        out = Path(tmp) / "out.npz"
        proc = subprocess.run([str(python), str(HERE / "llamacpp_run.py"), str(job), str(out)], capture_output=True,
                              text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"llama.cpp failed on {gguf.name}: {proc.stderr.strip()[-800:]}")
        with np.load(out) as data:
            return {k: data[k] for k in data.files}


def reference_outputs(model, sequences: list[list[int]], greedy: int = 0) -> dict[str, np.ndarray]:
    """The same from a transformers model (fp32): logits at every position and greedy continuations."""
    import torch

    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for i, ids in enumerate(sequences):
            out[f"logits_{i}"] = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
            tokens = list(ids)
            for _ in range(greedy):
                tokens.append(int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
            out[f"greedy_{i}"] = np.array(tokens[len(ids):], dtype=np.int64)
    return out


def agreement(reference: dict[str, np.ndarray], other: dict[str, np.ndarray], n: int) -> dict[str, float]:
    """``max_abs_diff`` of the logits, ``max_abs_logit`` (the scale), ``top1``: share of positions whose argmax
    agrees, ``decisive_flips``: positions whose argmax differs although the reference's top-2 margin exceeds
    twice that position's largest logit difference (a difference the arithmetic cannot explain), ``greedy_same``
    of ``greedy_all``: tokens of the greedy continuations equal before the first difference."""
    diffs, scale, top1, positions, greedy_same, greedy_all, decisive_flips = [], 0.0, 0, 0, 0, 0, 0
    for i in range(n):
        a, b = reference[f"logits_{i}"], other[f"logits_{i}"]
        diffs.append(float(np.abs(a - b).max()))
        scale = max(scale, float(np.abs(a).max()))
        top1 += int((a.argmax(-1) == b.argmax(-1)).sum())
        top2 = np.sort(a, axis=-1)[:, -2:]
        decisive = (top2[:, 1] - top2[:, 0]) > 2 * np.abs(a - b).max(-1)
        decisive_flips += int((decisive & (a.argmax(-1) != b.argmax(-1))).sum())
        positions += a.shape[0]
        ga, gb = reference[f"greedy_{i}"], other[f"greedy_{i}"]
        same = next((k for k, (x, y) in enumerate(zip(ga, gb, strict=True)) if x != y), len(ga))
        greedy_same += same
        greedy_all += len(ga)
    return {"max_abs_diff": max(diffs), "max_abs_logit": scale, "top1": top1 / positions,
            "decisive_flips": decisive_flips, "greedy_same": greedy_same, "greedy_all": greedy_all}
