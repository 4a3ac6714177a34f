"""lm-evaluation-harness's own ``mmlu_continuation`` tasks on local MMLU questions, in the harness's venv.

The harness's MMLU tasks read ``cais/mmlu`` from the Hugging Face hub, which tuneforge's machines cannot reach.
This script runs its per-subject task files as installed (``lm_eval/tasks/mmlu/continuation/mmlu_<subject>.yaml``,
which include its ``_continuation_template_yaml``: description, ``doc_to_text``, ``doc_to_choice``, target
delimiter, metrics) through a one-line-per-key task file that ``include:``s each of them by its installed path
and overrides only ``dataset_path``/``dataset_kwargs``: a local JSON file per subject holding the hub dataset's
fields (``question``, ``subject``, ``choices``, ``answer``) as the CSVs have them (not stripped, like the hub's
loading script), with the subject's ``dev`` CSV as the few-shot split the template names (zero-shot: unused).
So the prompts (context and continuations) are the harness's, rendered by its code; tuneforge's prompt code is
never imported here. The model is the same folder tuneforge scores, through the harness's ``HFLM`` (fp32, CPU).

Two halves: :func:`run_harness` (called from tuneforge's venv by ``tests/test_lm_eval_harness.py`` and
``benchmarks/eval_throughput.py``) writes the questions and runs this file with the harness venv's Python;
``main()`` (that Python) runs ``lm_eval.simple_evaluate(..., log_samples=True)`` and writes, per question in
input order, the harness's request arguments (context, continuation), its log-likelihood of each choice, its
token split of each request (``HFLM._encode_pair``, recomputed after the timed run), ``acc`` and ``acc_norm``.

    <lm-eval venv>/bin/python benchmarks/eval/harness_mmlu.py --model DIR --questions q.jsonl \\
        --dev ../shared/data/mmlu/dev --out out.json [--threads 2] [--batch 16]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LETTERS = "ABCD"
DISTRIBUTIONS = ("lm-eval", "torch", "transformers", "tokenizers", "datasets", "accelerate")


def run_harness(python: str | Path, model: str | Path, questions: list[dict], mmlu: str | Path, threads: int = 2,
                batch: int = 16, timeout: float = 3600) -> dict:
    """Score ``questions`` (dicts with the hub's fields: subject, question, choices, answer index) with the
    harness in the venv of ``python``; ``mmlu``: the MMLU folder (its ``dev/`` CSVs are the few-shot split)."""
    with tempfile.TemporaryDirectory() as tmp:
        qfile, out = Path(tmp) / "questions.jsonl", Path(tmp) / "out.json"
        qfile.write_text("".join(json.dumps({k: q[k] for k in ("subject", "question", "choices", "answer")}) + "\n"
                                 for q in questions))
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   HF_DATASETS_CACHE=str(Path(tmp) / "hf-datasets"))
        proc = subprocess.run([str(python), __file__, "--model", str(model), "--questions", str(qfile), "--dev",
                               str(Path(mmlu) / "dev"), "--out", str(out), "--threads", str(threads), "--batch",
                               str(batch)], capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"lm-evaluation-harness failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        return json.loads(out.read_text())


def _task_files(questions: list[dict], dev: Path, folder: Path) -> dict[str, list[int]]:
    """One data file pair and task file per subject; returns task name -> input indices in doc_id order."""
    import lm_eval

    harness_tasks = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "continuation"
    (folder / "data").mkdir()
    (folder / "tasks").mkdir()
    by_subject: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        by_subject.setdefault(q["subject"], []).append(i)
    order = {}
    for subject, indices in by_subject.items():
        original = harness_tasks / f"mmlu_{subject}.yaml"
        if not original.is_file():
            raise SystemExit(f"the harness has no task file {original}")
        test = folder / "data" / f"{subject}_test.jsonl"
        test.write_text("".join(json.dumps(questions[i]) + "\n" for i in indices))
        dev_file = folder / "data" / f"{subject}_dev.jsonl"
        with open(dev / f"{subject}_dev.csv", newline="", encoding="utf-8") as f:
            dev_file.write_text("".join(json.dumps({"question": r[0], "subject": subject, "choices": r[1:5],
                                                    "answer": LETTERS.index(r[5].strip())}) + "\n"
                                        for r in csv.reader(f)))
        # JSON values are YAML: paths quoted safely. Every other key comes from the harness's file.
        (folder / "tasks" / f"mmlu_{subject}_continuation.yaml").write_text(
            f"include: {json.dumps(str(original))}\n"
            "dataset_path: json\n"
            f"dataset_kwargs: {json.dumps({'data_files': {'test': str(test), 'dev': str(dev_file)}})}\n")
        order[f"mmlu_{subject}_continuation"] = indices
    return order


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--questions", required=True)
    p.add_argument("--dev", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()

    import importlib.metadata as md
    import logging

    import torch

    torch.set_num_threads(args.threads)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    questions = [json.loads(x) for x in Path(args.questions).read_text().splitlines() if x.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        order = _task_files(questions, Path(args.dev), Path(tmp))
        lm = HFLM(pretrained=args.model, device="cpu", dtype="float32", batch_size=args.batch)
        start = time.perf_counter()
        manager = TaskManager(include_path=str(Path(tmp) / "tasks"), include_defaults=False)
        tasks = manager.load_task_or_group(list(order))
        setup_s = time.perf_counter() - start
        start = time.perf_counter()
        # its manager passed on: without one, simple_evaluate indexes every task file the harness ships (~30 s)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks.values()), task_manager=manager, log_samples=True)
        seconds = time.perf_counter() - start
    rows: list[dict | None] = [None] * len(questions)
    for task, indices in order.items():
        for s in out["samples"][task]:
            args_ = [list(a) for a in s["arguments"]]
            rows[indices[s["doc_id"]]] = {
                "task": task, "doc_id": s["doc_id"], "arguments": args_,
                "logliks": [r[0] for r in s["filtered_resps"]], "acc": s["acc"], "acc_norm": s["acc_norm"],
                "tokens": [list(lm._encode_pair(c, x)) for c, x in args_]}
    assert all(r is not None for r in rows), "a question has no logged sample"
    versions = {}
    for d in DISTRIBUTIONS:
        try:
            versions[d] = md.version(d)
        except md.PackageNotFoundError:
            versions[d] = None
    Path(args.out).write_text(json.dumps({
        "versions": versions, "setup_s": setup_s, "seconds": seconds, "threads": args.threads, "batch": args.batch,
        "acc": sum(r["acc"] for r in rows) / len(rows), "acc_norm": sum(r["acc_norm"] for r in rows) / len(rows),
        "results": {t: {k: v for k, v in out["results"][t].items() if isinstance(v, (int, float, str))}
                    for t in order},
        "questions": rows}))


if __name__ == "__main__":
    sys.exit(main())
