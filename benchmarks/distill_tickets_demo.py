"""Logit distillation on the tickets, demonstrated (issue #28 item 5): a teacher made by full fine-tuning
SmolLM2-135M-Instruct, a LoRA student distilled from its logits, against plain LoRA SFT; label accuracy on the 150
held-out tickets with 95% bootstrap intervals.

    python benchmarks/distill_tickets_demo.py [--teacher-steps 90] [--steps 90] [--out benchmarks/results/NAME]

1. the teacher: ``examples/quickstart.yaml`` with ``method: full`` (learning rate: full fine-tuning's default);
2. plain SFT: the quickstart (LoRA r=16) on the tickets' answers;
3. SFT on the teacher's answers: the teacher answers every training ticket (greedy), and the quickstart trains on
   those answers instead (sequence-level distillation; ``--no-generated`` leaves it out);
4. logit distillation: the quickstart with ``task: distill``, ``distill.teacher`` the teacher run, for each
   ``--losses`` entry (``forward_kl``, ``reverse_kl``, ``jsd``; ``alpha`` from ``--alpha``); with ``--top-k`` the
   teacher's top-k is cached (a second invocation does not run the teacher).
Each run is evaluated with ``tuneforge eval`` (the quickstart's ``eval:``: label accuracy, bootstrap intervals).
Writes ``OUT.txt`` (the table, times, settings). CPU-heavy (every run is a training run of the quickstart's
length and an evaluation): run it alone on the machine. ``--steps 1 --teacher-steps 1 --max-examples 8`` is a
smoke run of every part.
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
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--teacher-steps", type=int, default=90)
    p.add_argument("--steps", type=int, default=90, help="steps of each student run")
    p.add_argument("--losses", default="forward_kl,jsd", help="comma-separated distill.loss values")
    p.add_argument("--alpha", type=float, default=0.0, help="distill.alpha: share of the answers' cross-entropy")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None, help="distill.cache_top_k (unset: the teacher on the fly)")
    p.add_argument("--no-generated", action="store_true", help="leave out SFT on the teacher's generated answers")
    p.add_argument("--max-examples", type=int, default=None, help="evaluate on this many test tickets (smoke runs)")
    p.add_argument("--work", default="runs/distill-demo")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                        f"distill_tickets_cpu_{time.strftime('%Y-%m-%d')}"))
    args = p.parse_args(argv)

    from tuneforge.config import load_config
    from tuneforge.evaluation.api import evaluate
    from tuneforge.training.trainer import train

    work = Path(args.work)
    quickstart = ROOT / "examples" / "quickstart.yaml"
    eval_overrides = {"max_examples": args.max_examples} if args.max_examples else {}
    rows: list[tuple[str, float, float, float, str]] = []

    def run(name: str, overrides: list[str]) -> tuple[Path, float]:
        config = load_config(quickstart, overrides=[f"output_dir={work / name}", "progress=false", *overrides])
        started = time.time()
        result = train(config)
        return Path(result.run_dir), time.time() - started

    def scored(run_dir: Path, column: str = "tuned") -> tuple[float, float, float]:
        report = evaluate(run_dir, columns=[column], progress=False, **eval_overrides).report
        return _acc(report, column)

    teacher, t_teacher = run("teacher", ["method=full", "learning_rate=null", f"max_steps={args.teacher_steps}",
                                         f"eval_every={args.teacher_steps}"])
    rows.append(("base model", *scored(teacher, "base"), "-"))
    rows.append((f"teacher: full fine-tune, {args.teacher_steps} steps", *scored(teacher), f"{t_teacher:.0f}"))
    student = [f"max_steps={args.steps}", f"eval_every={args.steps}"]
    sft, t_sft = run("sft", student)
    rows.append((f"student: LoRA SFT on the answers, {args.steps} steps", *scored(sft), f"{t_sft:.0f}"))

    if not args.no_generated:
        generated, t_gen = _teacher_answers(teacher, work / "teacher_answers.jsonl")
        gen_sft, t_gen_sft = run("sft-on-teacher-answers", [*student, f"data.train={generated}"])
        rows.append((f"student: LoRA SFT on the teacher's answers, {args.steps} steps (+{t_gen:.0f}s generating)",
                     *scored(gen_sft), f"{t_gen_sft:.0f}"))

    for loss in [x for x in args.losses.split(",") if x]:
        distill = ["task=distill", f"distill.teacher={teacher}", f"distill.loss={loss}", f"distill.alpha={args.alpha}",
                   f"distill.temperature={args.temperature}"]
        if args.top_k:
            distill.append(f"distill.cache_top_k={args.top_k}")
        folder, seconds = run(f"distill-{loss}", [*student, *distill])
        rows.append((f"student: LoRA distilled ({loss}, alpha {args.alpha:g}, T {args.temperature:g}), "
                     f"{args.steps} steps", *scored(folder), f"{seconds:.0f}"))

    lines = [f"# python benchmarks/distill_tickets_demo.py --teacher-steps {args.teacher_steps} --steps {args.steps} "
             f"--losses {args.losses} --alpha {args.alpha:g} --temperature {args.temperature:g}"
             f"{f' --top-k {args.top_k}' if args.top_k else ''}"
             f"{f' --max-examples {args.max_examples}' if args.max_examples else ''} "
             f"({time.strftime('%Y-%m-%d %H:%M')} UTC)",
             "# SmolLM2-135M-Instruct; students LoRA r=16 (examples/quickstart.yaml); label accuracy on the test "
             "tickets, 95% bootstrap intervals", "",
             "| model | label accuracy | 95% interval | train s |", "|---|---|---|---|"]
    lines += [f"| {n} | {100 * v:.1f}% | [{100 * lo:.1f}, {100 * hi:.1f}] | {t} |" for n, v, lo, hi, t in rows]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _teacher_answers(teacher: Path, out: Path) -> tuple[Path, float]:
    """The training tickets with the teacher's greedy answers in place of theirs (a JSONL of messages)."""
    from tuneforge.config import load_config
    from tuneforge.runs import load_run

    config = load_config(teacher / "config.yaml", check_files=False)
    records = [json.loads(line) for line in Path(config.data.train_file()).read_text().splitlines() if line.strip()]
    prompts = [[m for m in r["messages"] if m["role"] != "assistant"] for r in records]
    started = time.time()
    loaded = load_run(teacher, device="cpu")
    answers = loaded.generate_batch(prompts, max_new_tokens=16)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for messages, answer in zip(prompts, answers, strict=True):
            f.write(json.dumps({"messages": [*messages, {"role": "assistant", "content": answer}]}) + "\n")
    return out, time.time() - started


if __name__ == "__main__":
    raise SystemExit(main())
