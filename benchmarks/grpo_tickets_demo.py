"""GRPO on the tickets, demonstrated (issue #27 item 6): from the base model and from a short SFT run, label
accuracy on the 150 held-out tickets before and after (95% bootstrap intervals), and the reward curves.

    python benchmarks/grpo_tickets_demo.py [--steps 30] [--sft-steps 8] [--out benchmarks/results/NAME]

1. GRPO from the base model (``examples/grpo_tickets.yaml``: label_match + normalized_match rewards, never an
   answer shown), then ``tuneforge eval`` with the base and tuned columns;
2. a short SFT run (``examples/quickstart.yaml`` with ``--sft-steps``), evaluated;
3. GRPO from that SFT run (``init_from``), evaluated.
Writes ``OUT.txt`` (the table, times, settings) and ``OUT.png`` (reward per step of both GRPO runs). CPU-heavy:
run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _acc(report: dict, column: str) -> tuple[float, float, float]:
    iv = report["sets"]["test"]["columns"][column]["metrics"]["label"]
    return iv["value"], iv["low"], iv["high"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="GRPO steps of each run")
    p.add_argument("--sft-steps", type=int, default=8)
    p.add_argument("--work", default="runs/grpo-demo")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                        f"grpo_tickets_cpu_{time.strftime('%Y-%m-%d')}"))
    args = p.parse_args(argv)

    from tuneforge.config import load_config
    from tuneforge.evaluation.api import evaluate
    from tuneforge.training.trainer import train

    work = Path(args.work)
    lines, curves = [], {}

    def run(name: str, path: Path, **changes) -> tuple[Path, float]:
        config = load_config(path)
        config = config.model_copy(update={"output_dir": str(work / name), "progress": False, **changes})
        config = type(config).model_validate(config.model_dump())
        started = time.time()
        result = train(config)
        return Path(result.run_dir), time.time() - started

    def scored(run_dir: Path, columns: list[str]) -> dict:
        return evaluate(run_dir, columns=columns, progress=False).report

    grpo_yaml, sft_yaml = ROOT / "examples" / "grpo_tickets.yaml", ROOT / "examples" / "quickstart.yaml"
    base_run, t_grpo_base = run("grpo-from-base", grpo_yaml, max_steps=args.steps)
    rep = scored(base_run, ["base", "tuned"])
    rows = [("base model", *_acc(rep, "base"), "-"), (f"GRPO from base, {args.steps} steps", *_acc(rep, "tuned"),
                                                    f"{t_grpo_base:.0f}")]
    sft_run, t_sft = run("sft", sft_yaml, max_steps=args.sft_steps)
    rows.append((f"SFT, {args.sft_steps} steps", *_acc(scored(sft_run, ["tuned"]), "tuned"), f"{t_sft:.0f}"))
    from_sft, t_grpo_sft = run("grpo-from-sft", grpo_yaml, max_steps=args.steps, init_from=str(sft_run))
    rows.append((f"GRPO from that SFT run, {args.steps} steps", *_acc(scored(from_sft, ["tuned"]), "tuned"),
                 f"{t_grpo_sft:.0f}"))
    for name, folder in (("from base", base_run), ("from SFT", from_sft)):
        metrics = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
        curves[name] = [(m["step"], m["reward"]) for m in metrics if "reward" in m]

    lines.append(f"# python benchmarks/grpo_tickets_demo.py --steps {args.steps} --sft-steps {args.sft_steps} "
                 f"({time.strftime('%Y-%m-%d %H:%M')} UTC, 2-core CPU, nothing else running)")
    lines.append("# SmolLM2-135M-Instruct, LoRA r=16; GRPO: examples/grpo_tickets.yaml (4 prompts x 6 completions a "
                 "step, 8 new tokens, dapo, beta 0); label accuracy on the 150 test tickets, 95% bootstrap intervals")
    lines += ["", "| model | label accuracy | 95% interval | train s |", "|---|---|---|---|"]
    lines += [f"| {n} | {100 * v:.1f}% | [{100 * lo:.1f}, {100 * hi:.1f}] | {t} |" for n, v, lo, hi, t in rows]
    lines.append("")
    for name, curve in curves.items():
        lines.append(f"reward per step, GRPO {name}: " + " ".join(f"{r:.3f}" for _, r in curve))
    out = Path(args.out)
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for name, curve in curves.items():
        ax.plot([s for s, _ in curve], [r for _, r in curve], marker="o", markersize=3, label=f"GRPO {name}")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward (max 1.5)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
