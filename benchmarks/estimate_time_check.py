"""Check ``tuneforge estimate --time`` (measured mode: a few real steps here, the first left out) against the
measured wall time of two whole runs on this machine (2 CPU cores):

* the quickstart (``examples/quickstart.yaml``, 90 steps): 102 s of run wall time
  (``benchmarks/results/quickstart_cpu_after_house_2026-12-03.txt``, "[2/2] ... 90 steps, 102 s");
* the own-data default run on the ``tools`` task (``benchmarks/own_data_defaults.py``: 3,000 generated records,
  the own-data config, 100 steps, learning rate 1e-3): 379.5 s of run wall time and 95,929 trained tokens
  (``benchmarks/results/own_data_defaults.jsonl``).

The run wall time (``run.json``'s ``wall_time_s``) holds set-up, steps, validation and saving, as the estimate's
total does. Only the estimate runs here (about a minute: no whole run is repeated); the references are the
recorded runs, made when the machine may have been busier or quieter.

    python benchmarks/estimate_time_check.py [--out benchmarks/results/estimate_time_cpu_2026-12-04.txt]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

TOLERANCE = 0.25


def cases(folder: Path) -> list[tuple[str, object, float, float | None]]:
    """``(name, config, measured wall s, measured trained tokens or None)``."""
    from own_data_defaults import tools_data

    from tuneforge.config import load_config
    from tuneforge.own_data import own_data_config

    train, _ = tools_data(folder)
    return [("quickstart (examples/quickstart.yaml, 90 steps)", load_config(str(ROOT / "examples/quickstart.yaml")),
             102.0, None),
            ("own-data default, tools task (100 steps, lr 1e-3)",
             own_data_config(train, ["learning_rate=1e-3", "max_steps=100", f"output_dir={folder / 'run'}"]),
             379.5, 95929.0)]


def main(argv: list[str] | None = None) -> int:
    from tuneforge.estimate.timing import estimate_time

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="write the results here too")
    p.add_argument("--steps", type=int, default=6, help="steps measured, the first left out (default: %(default)s)")
    args = p.parse_args(argv)
    lines = ["tuneforge estimate --time (measured mode) against recorded whole runs, CPU (2 cores)",
             "| run | tokens predicted | tokens measured | tok/s (measured steps) | predicted s | measured s | "
             "error | within 25% |", "|---|---|---|---|---|---|---|---|"]
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for name, config, wall, tokens in cases(Path(tmp)):
            est = estimate_time(config, measure_steps=args.steps)         # type: ignore[arg-type]
            error = est.seconds / wall - 1
            ok &= abs(error) <= TOLERANCE
            steps = ", ".join(f"{s:.2f}" for s in est.throughput.step_seconds)
            lines.append(f"| {name} | {est.tokens.tokens:,.0f} | {f'{tokens:,.0f}' if tokens else '-'} | "
                         f"{est.throughput.tokens_per_s:.1f} (step s: {steps}) | {est.seconds:.1f} "
                         f"(train {est.train_seconds:.1f}, validation {est.eval_seconds:.1f}, set-up "
                         f"{est.throughput.overhead_s:.1f}) | {wall:.1f} | {error:+.1%} | "
                         f"{'yes' if abs(error) <= TOLERANCE else 'no'} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
