"""Evaluation speed, side by side in one run (prints tables; run it on an idle machine):

1. MMLU cloze: tuneforge's scorer (the question's context computed once and its four choices branching off
   it, many questions per forward under a tree-shaped attention mask) against lm-evaluation-harness (``lm-eval``, in its own cached virtualenv, like the
   training bench's competitors) on the same stratified subset, the same context/continuation strings and
   the same model folder: questions per second and accuracy (``acc``: the same rule, so the two should agree
   within a question or so), plus ours without prefix sharing (four full sequences on a packed row).
2. Generation: ``evaluation.generation.generate`` (length-sorted, left-padded batches, KV cache) against a
   one-prompt-at-a-time ``model.generate`` loop on the quickstart's test tickets: prompts/s, generated
   tokens/s, and how many answers are identical (greedy: all of them should be).

    python benchmarks/eval_throughput.py                       # default subset (10 a subject), 150 tickets
    python benchmarks/eval_throughput.py --subjects 3 --per-subject 2 --prompts 8 --no-harness   # smoke run

Issue target: at least 2x lm-evaluation-harness's questions per second at the same accuracy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from throughput.venvs import TORCH, VenvSpec, ensure_venv  # noqa: E402

LM_EVAL = VenvSpec("lm-eval", ("lm-eval==0.4.13", "transformers==5.23.0", "accelerate"),
                   ("torch", "lm-eval", "transformers", "datasets"))
DEFAULT_MMLU = ROOT.parent / "shared" / "data" / "mmlu"

HARNESS_TASK = """task: tuneforge_mmlu_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

HARNESS_SCRIPT = """
import json, sys, time
import lm_eval
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
import torch
torch.set_num_threads(int(sys.argv[3]))
lm = HFLM(pretrained=sys.argv[1], batch_size=int(sys.argv[4]), device="cpu", dtype="float32")
tm = TaskManager(include_path=sys.argv[2])
start = time.perf_counter()
out = lm_eval.simple_evaluate(model=lm, tasks=["tuneforge_mmlu_cloze"], task_manager=tm, log_samples=True)
seconds = time.perf_counter() - start
samples = out["samples"]["tuneforge_mmlu_cloze"]
correct = {s["doc_id"]: float(s["acc"]) for s in samples}
print("RESULT " + json.dumps({"seconds": seconds, "acc": out["results"]["tuneforge_mmlu_cloze"]["acc,none"],
                              "correct": [correct[i] for i in sorted(correct)]}))
"""


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def bench_mmlu(args, model, tokenizer, model_path: Path) -> None:
    from tuneforge.evaluation import forgetting

    questions = forgetting.load_mmlu(args.mmlu, per_subject=args.per_subject)
    if args.subjects:
        keep = sorted({q.subject for q in questions})[: args.subjects]
        questions = [q for q in questions if q.subject in keep]
    rows = []
    results = {}
    variants = [("tuneforge (shared prefix, tree-masked rows)", True)] + (
        [] if args.no_full_sequences else [("tuneforge (4 full sequences)", False)])
    for name, share in variants:
        start = time.perf_counter()
        scored = forgetting.score_mmlu(model, tokenizer, questions, "base", share_prefix=share)
        seconds = time.perf_counter() - start
        results[name] = scored["correct"]
        rows.append([name, str(len(questions)), f"{seconds:.1f}", f"{len(questions) / seconds:.2f}",
                     f"{100 * sum(scored['correct']) / len(questions):.1f}%"])
    if not args.no_harness:
        python, versions = ensure_venv(LM_EVAL, force=args.rebuild_venvs)
        if python is None:
            rows.append(["lm-evaluation-harness", str(len(questions)), "n/a", "n/a", f"not run: {versions}"])
        else:
            with tempfile.TemporaryDirectory() as tmp:
                data = Path(tmp) / "subset.jsonl"
                data.write_text("".join(json.dumps({"context": q.context, "choices": [c.strip() for c in q.choices],
                                                    "answer": q.answer}) + "\n" for q in questions))
                (Path(tmp) / "task.yaml").write_text(HARNESS_TASK.format(data=data))
                proc = subprocess.run([str(python), "-c", HARNESS_SCRIPT, str(model_path), tmp, str(args.threads),
                                       str(args.harness_batch)], capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                rows.append(["lm-evaluation-harness", str(len(questions)), "n/a", "n/a",
                             f"failed: {proc.stderr.strip().splitlines()[-1:]}"])
            else:
                res = json.loads(line[7:])
                ours = results[variants[0][0]]
                differ = sum(a != b for a, b in zip(ours, res["correct"], strict=True))
                rows.append([f"lm-evaluation-harness ({versions})", str(len(questions)), f"{res['seconds']:.1f}",
                             f"{len(questions) / res['seconds']:.2f}",
                             f"{100 * res['acc']:.1f}% ({differ} questions scored differently from ours)"])
    print(f"\nMMLU cloze, {len(questions)} questions, base model {args.model}, {args.threads} threads")
    print(table(["scorer", "questions", "seconds", "questions/s", "accuracy"], rows))


def bench_generation(args, model, tokenizer) -> None:
    import torch

    from tuneforge.data.rendering import prompt_ids
    from tuneforge.evaluation import generation

    lines = (ROOT / "src/tuneforge/recipes/data/tickets_test.jsonl").read_text().splitlines()[: args.prompts]
    convs = [json.loads(x)["messages"][:-1] for x in lines]
    start = time.perf_counter()
    batched = generation.generate(model, tokenizer, convs, max_new_tokens=args.max_new_tokens,
                                  batch_size=args.batch_size)
    batched_s = time.perf_counter() - start
    single, single_tokens = [], 0
    start = time.perf_counter()
    with torch.no_grad():
        for conv in convs:
            ids = torch.tensor([prompt_ids(tokenizer, conv)])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.eos_token_id)
            new = out[0, ids.shape[1]:].tolist()
            end = new.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in new else None
            single_tokens += len(new) if end is None else end + 1
            single.append(tokenizer.decode(new[:end], skip_special_tokens=True).strip())
    single_s = time.perf_counter() - start
    same = sum(a == b for a, b in zip(batched.texts, single, strict=True))
    print(f"\ngeneration, {len(convs)} quickstart test tickets, greedy, at most {args.max_new_tokens} new tokens")
    print(table(["path", "seconds", "prompts/s", "generated tokens/s", "answers identical"], [
        [f"batched (batch {args.batch_size}, length-sorted, KV cache)", f"{batched_s:.1f}",
         f"{len(convs) / batched_s:.2f}", f"{sum(batched.new_tokens) / batched_s:.1f}", f"{same}/{len(convs)}"],
        ["one prompt at a time (model.generate)", f"{single_s:.1f}", f"{len(convs) / single_s:.2f}",
         f"{single_tokens / single_s:.1f}", "reference"]]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--mmlu", default=str(DEFAULT_MMLU))
    p.add_argument("--per-subject", type=int, default=10)
    p.add_argument("--subjects", type=int, default=None, help="only the first N subjects (smoke runs)")
    p.add_argument("--prompts", type=int, default=150)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--harness-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-harness", action="store_true", help="skip lm-evaluation-harness")
    p.add_argument("--no-generation", action="store_true")
    p.add_argument("--no-full-sequences", action="store_true", help="skip our 4-full-sequences variant")
    p.add_argument("--rebuild-venvs", action="store_true")
    args = p.parse_args()

    import torch

    from tuneforge.models.loading import load_model, load_tokenizer
    from tuneforge.models.registry import resolve_model

    torch.set_num_threads(args.threads)
    model_path = resolve_model(args.model)
    model = load_model(model_path).eval()
    tokenizer = load_tokenizer(args.model)
    print(f"torch {torch.__version__} ({TORCH} pinned for the harness venv), model {model_path}")
    bench_mmlu(args, model, tokenizer, Path(model_path))
    if not args.no_generation:
        bench_generation(args, model, tokenizer)


if __name__ == "__main__":
    main()
