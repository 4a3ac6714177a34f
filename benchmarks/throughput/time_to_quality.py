"""Time to quality: held-out exact-match accuracy against training wall time, tuneforge vs TRL and LLaMA-Factory.

The task is the quickstart (``examples/quickstart.yaml``: route support tickets to one of six queues).
tuneforge trains with the quickstart's own settings (its defaults: packed rows of 4 tickets, LR 1e-3
cosine, validation every 30 steps with the best checkpoint kept) for each step count in ``--ttq-steps``;
TRL trains its recipe (``SFTTrainer``, BFD packing into bins of ``max_length`` = 256 tokens, 4 bins per
step, completion-only loss, same LR, schedule, LoRA) for each count in ``--ttq-trl-steps``; LLaMA-Factory
its default recipe (dynamic padding, 4 tickets a step like tuneforge, loss on the answers, same LR,
schedule, LoRA, gradient checkpointing off as in the throughput table) for each count in
``--ttq-lf-steps``. Each run's
schedule is sized to its own length. Training wall time is the training loop (first step start to last
step end; tuneforge's includes its validation passes). Accuracy: :func:`evaluate_generation` (exact match of
the normalised answer, and the share of answers that are one of the labels) on
``examples/data/tickets_test.jsonl`` (greedy, 8 new tokens); tuneforge's run is
loaded with :func:`tuneforge.serving.inference.load_run`, TRL's and LLaMA-Factory's saved adapters with
peft on the same base.

The budget table then answers: given B seconds of training, what accuracy does each tool reach (the best
of its runs that finished within B)?
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402
import measure  # noqa: E402
import venvs  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
TICKETS = ROOT / "examples" / "data"


def _test_conversations() -> tuple[list[list[dict]], list[str]]:
    import yaml

    cfg = yaml.safe_load(QUICKSTART.read_text())
    rows = [json.loads(x) for x in (TICKETS / "tickets_test.jsonl").read_text().splitlines() if x.strip()]
    return [r["messages"] for r in rows], cfg["eval"]["labels"]


def normalise_answer(text: str) -> str:
    return text.strip().strip("\"'`").rstrip(".").strip().casefold()


@dataclass
class GenerationEval:
    n: int
    exact_match: float
    valid_format: float
    predictions: list[dict]


def evaluate_generation(loaded, conversations: list[list[dict]], labels: list[str], max_new_tokens: int = 16,
                        batch_size: int = 16) -> GenerationEval:
    """Greedy answers to each conversation but its last turn: exact match of the normalised answer (stripped,
    case-folded, surrounding quotes and a final period removed) with that turn, and the share of answers
    that are one of ``labels`` (the numbers of benchmarks/results/ttq_*.json)."""
    prompts = [conv[:-1] for conv in conversations]
    references = [conv[-1]["content"] for conv in conversations]
    answers = loaded.generate_batch(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    label_set = {normalise_answer(label) for label in labels}
    rows = [{"reference": r, "answer": a, "correct": normalise_answer(a) == normalise_answer(r)}
            for a, r in zip(answers, references, strict=True)]
    n = max(len(conversations), 1)
    return GenerationEval(len(conversations), sum(r["correct"] for r in rows) / n,
                          sum(normalise_answer(a) in label_set for a in answers) / n, rows)


def _score(loaded, limit: int | None = None) -> dict:
    conversations, labels = _test_conversations()
    conversations = conversations[:limit]
    started = time.time()
    result = evaluate_generation(loaded, conversations, labels=labels, max_new_tokens=8)
    return {"exact_match": result.exact_match, "valid_format": result.valid_format, "n": result.n,
            "eval_s": round(time.time() - started, 1)}


def child_tuneforge(spec: dict, out: Path) -> None:
    """Train the quickstart for ``spec['steps']`` steps with tuneforge's settings, then score it."""
    measure.set_threads(spec["threads"])
    from tuneforge.config import load_config
    from tuneforge.serving.inference import load_run
    from tuneforge.training.trainer import train

    overrides = [f"max_steps={spec['steps']}", f"output_dir={spec['work_dir']}/run", f"threads={spec['threads']}",
                 "progress=false", f"model={spec['model']}", f"seed={spec['seed']}"]   # the bench's --seed, 0 = quickstart's
    result = train(load_config(QUICKSTART, overrides))
    loop_s = result.metrics[-1]["elapsed_s"]
    score = _score(load_run(result.run_dir, device="cpu"), spec.get("test_examples"))
    out.write_text(json.dumps({"recipe": "tuneforge", "steps": spec["steps"], "train_loop_s": loop_s,
                               "process_train_s": result.wall_time_s, **score}))


def child_score_adapter(spec: dict, out: Path) -> None:
    """Score a peft adapter (saved by a TRL or LLaMA-Factory run) on the base model, in tuneforge's environment."""
    measure.set_threads(spec["threads"])
    from peft import PeftModel

    from tuneforge.serving.inference import LoadedModel, load_base

    base = load_base(spec["model"], dtype="fp32", device="cpu")
    model = PeftModel.from_pretrained(base.model, spec["adapter"])
    result = json.loads(Path(spec["recipe_result"]).read_text())
    loop_s = result["steps"][-1]["end_s"]
    out.write_text(json.dumps({"recipe": spec["recipe"], "steps": len(result["steps"]), "train_loop_s": loop_s,
                               "examples_per_step": round(sum(s["examples"] for s in result["steps"]) / len(result["steps"]), 1),
                               **_score(LoadedModel(model, base.tokenizer), spec.get("test_examples"))}))


def _run_child(kind: str, spec: dict, work: Path, timeout: float) -> dict:
    import subprocess

    work.mkdir(parents=True, exist_ok=True)
    spec = dict(spec, work_dir=str(work))
    (work / "spec.json").write_text(json.dumps(spec))
    with open(work / "child.log", "w") as logf:
        proc = subprocess.run([sys.executable, __file__, kind, str(work / "spec.json"), str(work / "result.json")],
                              stdout=logf, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        return {"recipe": kind, "error": f"exit {proc.returncode} (log: {work / 'child.log'})"}
    return json.loads((work / "result.json").read_text())


def main(args, base: dict, work: Path) -> int:
    import yaml

    cfg = yaml.safe_load(QUICKSTART.read_text())
    base = dict(base, test_examples=args.ttq_test_examples)
    rows = []
    for steps in args.ttq_steps:
        print(f"[{time.strftime('%H:%M:%S')}] tuneforge quickstart, {steps} steps", flush=True)
        rows.append(_run_child("tuneforge", dict(base, steps=steps), work / f"ttq-tuneforge-{steps}", args.timeout))
        print(f"  {rows[-1]}", flush=True)
    train_conv = [json.loads(x)["messages"] for x in (TICKETS / "tickets_train.jsonl").read_text().splitlines() if x.strip()]
    files = harness.write_data(train_conv, work / "ttq-data")
    recipe_spec = dict(base, **files, batch=cfg["batch_size"], lr=cfg["learning_rate"],
                       max_length=cfg["data"]["max_length"],
                       lora={"r": cfg["lora"]["r"], "alpha": cfg["lora"]["alpha"], "dropout": cfg["lora"]["dropout"]})
    versions = {}
    for recipe, venv, step_counts in (("trl", venvs.TRL, args.ttq_trl_steps),
                                      ("llamafactory", venvs.LLAMAFACTORY, args.ttq_lf_steps)):
        python, versions[recipe] = venvs.ensure_venv(venv, force=args.rebuild_venvs)
        for steps in step_counts:
            if python is None:
                rows.append({"recipe": recipe, "steps": steps, "error": versions[recipe]})
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {recipe} quickstart, {steps} steps", flush=True)
            run_dir = work / f"ttq-{recipe}-{steps}"
            adapter = run_dir / ("adapter" if recipe == "trl" else "out")   # LLaMA-Factory saves into output_dir
            spec = dict(recipe_spec, steps=steps, warmup_steps=round(cfg["warmup_ratio"] * steps),
                        options={"save_adapter": str(adapter)} if recipe == "trl" else {})
            result = harness.run_recipe(recipe, python, spec, run_dir, args.timeout)
            if "error" in result:
                rows.append({"recipe": recipe, "steps": steps, "error": result["error"]})
                continue
            rows.append(_run_child("score-adapter", dict(base, recipe=recipe, adapter=str(adapter),
                                                         recipe_result=str(run_dir / "result.json")),
                                   run_dir / "score", args.timeout))
            print(f"  {rows[-1]}", flush=True)
    print(report(rows, args.ttq_budgets))
    if args.json:
        Path(args.json).write_text(json.dumps({"mode": "time-to-quality", "load_average": harness.load_average(),
                                               "versions": versions, "rows": rows}, indent=1))
    return 0


def report(rows: list[dict], budgets: list[float]) -> str:
    lines = ["| recipe | steps | train loop s | exact match | valid format |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['recipe']} | {r.get('steps', '-')} | not run: {r['error']} | | |")
        else:
            vf = "-" if r["valid_format"] is None else f"{r['valid_format']:.1%}"
            lines.append(f"| {r['recipe']} | {r['steps']} | {r['train_loop_s']:.0f} | {r['exact_match']:.1%} | {vf} |")
    lines += ["", "| training budget s | " + " | ".join(sorted({r["recipe"] for r in rows})) + " |",
              "|---|" + "---|" * len({r["recipe"] for r in rows})]
    for b in budgets:
        cells = []
        for recipe in sorted({r["recipe"] for r in rows}):
            done = [r for r in rows if r["recipe"] == recipe and "error" not in r and r["train_loop_s"] <= b]
            cells.append(f"{max(r['exact_match'] for r in done):.1%}" if done else "no run fits")
        lines.append(f"| {b:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # child entry: time_to_quality.py {tuneforge|score-adapter} SPEC.json OUT.json
    kind, spec_path, out_path = sys.argv[1:4]
    {"tuneforge": child_tuneforge, "score-adapter": child_score_adapter}[kind](
        json.loads(Path(spec_path).read_text()), Path(out_path))
