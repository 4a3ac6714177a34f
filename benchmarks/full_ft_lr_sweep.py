"""How full fine-tuning's default learning rate was chosen: a learning-rate sweep on the quickstart's tickets.

Each point trains ``method: full`` with the quickstart's recipe (``examples/quickstart.yaml``: SmolLM2-135M-
Instruct, 4 tickets a step packed into one row, cosine schedule, 5% warmup, validation on
``tickets_validation.jsonl``, the best validation checkpoint kept) at one learning rate, then scores the run with
``tuneforge eval`` (:func:`tuneforge.evaluation.evaluate`, the ``tuned`` column) on the 150 held-out test tickets
and the 48 handwritten ones: label accuracy with its 95% bootstrap interval, and the held-out answer loss. The
run's best validation loss is read from its ``run.json``. The LoRA default (1e-3, ``tuneforge init``) was chosen
the same way, by held-out quality at a fixed budget (``benchmarks/own_data_defaults.py``).

    python benchmarks/full_ft_lr_sweep.py --lr 5e-6,1e-5,2e-5,5e-5,1e-4,2e-4 --steps 40 --rows rows.jsonl
    python benchmarks/full_ft_lr_sweep.py --table rows.jsonl      # the table of the rows collected so far

Prints one JSON line per point (appended to ``--rows``) and a markdown table. On a shared machine run one
learning rate per call (``--lr 2e-5``) with the same ``--rows`` file, then ``--table``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "quickstart.yaml"
HANDWRITTEN = ROOT / "examples" / "data" / "tickets_handwritten.jsonl"


def _pct(interval: dict) -> str:
    return f"{100 * interval['value']:.1f}% [{100 * interval['low']:.1f}, {100 * interval['high']:.1f}]"


def run_point(lr: str, steps: int, eval_every: int, out: Path) -> dict:
    from tuneforge.config import load_config
    from tuneforge.evaluation.api import evaluate
    from tuneforge.training.trainer import TrainingFailed, train

    run_dir = out / f"full-lr={lr}"
    config = load_config(str(RECIPE), ["method=full", f"learning_rate={lr}", f"max_steps={steps}",
                                       f"eval_every={eval_every}", f"output_dir={run_dir}", "progress=false"])
    started = time.time()
    status = "ok"
    try:
        train(config)
    except TrainingFailed as e:        # a learning rate that ruins the model: recorded, not fatal to the sweep
        status = f"failed: {e}"
    train_s = round(time.time() - started, 1)
    if not (run_dir / "run.json").is_file():          # stopped before the end (divergence, non-finite loss)
        return {"method": "full", "learning_rate": float(lr), "status": status, "train_wall_s": train_s,
                "best_val_loss": None}
    record = json.loads((run_dir / "run.json").read_text())
    row = {"method": "full", "learning_rate": float(lr), "steps": record["steps"], "batch_size": config.batch_size,
           "status": status, "train_wall_s": train_s, "base_val_loss": record["base_eval_loss"],
           "best_val_loss": record["best_eval_loss"], "best_step": record["best_step"]}
    if status != "ok" and record.get("weights_from_step") is None:
        return row                     # no weights written: nothing to score
    started = time.time()
    report = evaluate(run_dir, columns=["tuned"], extra={"handwritten": str(HANDWRITTEN)}, progress=False).report
    for name, entry in report["sets"].items():
        tuned = entry["columns"]["tuned"]["metrics"]
        row[f"{name}_label_acc"] = tuned["label"]
        row[f"{name}_loss"] = entry["loss"]["tuned"]["loss"]
    row["eval_wall_s"] = round(time.time() - started, 1)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| learning rate | status | best val loss (step) | test label acc [95%] | test loss | handwritten "
             "label acc [95%] | handwritten loss | train s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "test_label_acc" not in r:
            lines.append(f"| {r['learning_rate']:g} | {r['status'][:60]} | {r['best_val_loss']} | - | - | - | - | "
                         f"{r['train_wall_s']} |")
            continue
        lines.append(f"| {r['learning_rate']:g} | {r['status'][:9]} | {r['best_val_loss']:.4f} ({r['best_step']}) | "
                     f"{_pct(r['test_label_acc'])} | {r['test_loss']['value']:.4f} | "
                     f"{_pct(r['handwritten_label_acc'])} | {r['handwritten_loss']['value']:.4f} | "
                     f"{r['train_wall_s']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lr", default="5e-6,1e-5,2e-5,5e-5,1e-4,2e-4", help="learning rates, comma-separated")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run (4 tickets each)")
    p.add_argument("--eval-every", type=int, default=20, help="steps between validations")
    p.add_argument("--out", default="/tmp/full_ft_lr_sweep")
    p.add_argument("--rows", help="append each point's row to this JSONL file")
    p.add_argument("--table", help="print the table of the rows in this JSONL file, and exit")
    args = p.parse_args(argv)
    if args.table:
        rows = [json.loads(line) for line in Path(args.table).read_text().splitlines() if line.strip()]
        print(table(sorted(rows, key=lambda r: r["learning_rate"])))
        return 0
    rows = []
    for lr in args.lr.split(","):
        row = run_point(lr, args.steps, args.eval_every, Path(args.out))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.rows:
            with open(args.rows, "a") as f:
                f.write(json.dumps(row) + "\n")
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
