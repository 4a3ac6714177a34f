"""Evaluation speed, side by side in one run (prints tables; run it on an idle machine):

1. MMLU cloze: tuneforge's scorer (the question's context computed once and its four choices branching off
   it, many questions per forward under a tree-shaped attention mask) against lm-evaluation-harness
   (``lm-eval``, in its own cached virtualenv, like the training bench's competitors) running its own
   ``mmlu_continuation`` task files on the same stratified subset (``benchmarks/eval/harness_mmlu.py``: the
   harness renders its prompts itself, from local copies of the questions) and the same model folder:
   questions per second, ``acc`` and ``acc_norm`` of each, then the agreement question by question (request
   strings identical, per-choice log-likelihood differences, predictions differing), plus ours without
   prefix sharing (four full sequences on a packed row).
2. Generation: ``evaluation.generation.generate`` (length-sorted, left-padded batches, KV cache) against a
   one-prompt-at-a-time ``model.generate`` loop on the quickstart's test tickets: prompts/s, generated
   tokens/s, and how many answers are identical (greedy: all of them should be).

    python benchmarks/eval_throughput.py                       # default subset (10 a subject), 150 tickets
    python benchmarks/eval_throughput.py --subjects 3 --per-subject 2 --prompts 8 --no-harness   # smoke run
    python benchmarks/eval_throughput.py --no-generation --out result.json   # numbers and agreement as JSON

Issue target: at least 2x lm-evaluation-harness's questions per second at the same accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "eval"))

from harness_mmlu import run_harness  # noqa: E402
from throughput.venvs import LM_EVAL, TORCH, ensure_venv  # noqa: E402

DEFAULT_MMLU = ROOT.parent / "shared" / "data" / "mmlu"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def bench_mmlu(args, model, tokenizer, model_path: Path) -> dict:
    from tuneforge.evaluation import forgetting

    questions = forgetting.load_mmlu(args.mmlu, per_subject=args.per_subject)
    if args.subjects:
        keep = sorted({q.subject for q in questions})[: args.subjects]
        questions = [q for q in questions if q.subject in keep]
    rows = []
    results = {}
    summary: dict = {"questions": len(questions), "per_subject": args.per_subject, "threads": args.threads,
                     "scorers": {}}
    variants = [("tuneforge (shared prefix, tree-masked rows)", True)] + (
        [] if args.no_full_sequences else [("tuneforge (4 full sequences)", False)])
    for name, share in variants:
        start = time.perf_counter()
        scored = forgetting.score_mmlu(model, tokenizer, questions, "base", share_prefix=share)
        seconds = time.perf_counter() - start
        results[name] = scored
        acc, acc_norm = (sum(scored[k]) / len(questions) for k in ("correct", "correct_norm"))
        summary["scorers"][name] = {"seconds": seconds, "questions_per_s": len(questions) / seconds, "acc": acc,
                                    "acc_norm": acc_norm}
        rows.append([name, str(len(questions)), f"{seconds:.1f}", f"{len(questions) / seconds:.2f}",
                     f"{100 * acc:.1f}%", f"{100 * acc_norm:.1f}%"])
    agreement = None
    if not args.no_harness:
        python, versions = ensure_venv(LM_EVAL, force=args.rebuild_venvs)
        res = None
        if python is None:
            rows.append(["lm-evaluation-harness", str(len(questions)), "n/a", "n/a", f"not run: {versions}", ""])
        else:
            try:   # its own mmlu_continuation task files, on these questions as the hub dataset's fields
                res = run_harness(python, model_path, [{"subject": q.subject, "question": q.question,
                                                        "choices": q.choices, "answer": q.answer} for q in questions],
                                  args.mmlu, threads=args.threads, batch=args.harness_batch)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                rows.append(["lm-evaluation-harness", str(len(questions)), "n/a", "n/a",
                             f"failed: {str(e).strip().splitlines()[-1:]}", ""])
        if res is not None:
            ours = results[variants[0][0]]
            differ = sum(a != b["acc"] for a, b in zip(ours["correct"], res["questions"], strict=True))
            summary["scorers"]["lm-evaluation-harness"] = {
                "seconds": res["seconds"], "task_setup_s": res["setup_s"], "batch": res["batch"],
                "questions_per_s": len(questions) / res["seconds"], "acc": res["acc"], "acc_norm": res["acc_norm"],
                "versions": res["versions"]}
            rows.append([f"lm-evaluation-harness ({versions}; batch {args.harness_batch})", str(len(questions)),
                         f"{res['seconds']:.1f}", f"{len(questions) / res['seconds']:.2f}",
                         f"{100 * res['acc']:.1f}% ({differ} questions scored differently from ours)",
                         f"{100 * res['acc_norm']:.1f}%"])
            agreement = _agreement(model, tokenizer, questions, ours, res, args.mmlu)
            summary["agreement"] = {k: v for k, v in agreement.items() if k != "per_question"}
            summary["per_question"] = agreement["per_question"]
    print(f"\nMMLU cloze, {len(questions)} questions, base model {args.model}, {args.threads} threads")
    text = table(["scorer", "questions", "seconds", "questions/s", "acc", "acc_norm"], rows)
    print(text)
    if agreement:
        a = agreement
        print(f"\nagreement with the harness, question by question: requests (context, continuation strings) "
              f"identical on {a['requests_identical']}/{len(questions)} questions; on those, per-choice "
              f"log-likelihood |ours - harness| max {a['max_abs_loglik_diff_identical']:.2e} nats, predictions "
              f"differing {a['predictions_differ_identical']}; on all questions, predictions differing "
              f"{a['predictions_differ']}, acc differing {a['acc_differ']}, acc_norm differing {a['acc_norm_differ']}")
    summary["table"] = text
    return summary


def _agreement(model, tokenizer, questions, ours, res, mmlu) -> dict:
    """Per question: our and the harness's per-choice log-likelihoods, predictions, correctness, and whether
    the request strings are identical (not timed; ours recomputed the way score_mmlu computes them)."""
    from tuneforge.evaluation import forgetting

    device = next(model.parameters()).device
    items = [forgetting._pieces(tokenizer, q) for q in questions]
    logliks = [ll for group in forgetting._rows(items, 1024) for ll in forgetting._logliks_tree(model, group, device)]
    rows_of: dict = {}           # (subject, question, choices) -> its row in the subject's test CSV
    count: dict = {}
    for q in forgetting.load_mmlu(mmlu, per_subject=None):
        count[q.subject] = count.get(q.subject, -1) + 1
        rows_of.setdefault((q.subject, q.question, tuple(q.choices)), count[q.subject])
    per_question = []
    for q, ll, h, correct, correct_norm in zip(questions, logliks, res["questions"], ours["correct"],
                                               ours["correct_norm"], strict=True):
        same = all(a == [q.context, " " + c] for a, c in zip(h["arguments"], q.choices, strict=True))
        per_question.append({
            "subject": q.subject, "row": rows_of[(q.subject, q.question, tuple(q.choices))],
            "answer": q.answer, "requests_identical": same,
            "ours_logliks": [round(x, 6) for x in ll], "harness_logliks": [round(x, 6) for x in h["logliks"]],
            "max_abs_loglik_diff": max(abs(a - b) for a, b in zip(ll, h["logliks"], strict=True)),
            "ours_pred": max(range(4), key=ll.__getitem__), "harness_pred": max(range(4), key=h["logliks"].__getitem__),
            "ours_acc": correct, "harness_acc": h["acc"], "ours_acc_norm": correct_norm,
            "harness_acc_norm": h["acc_norm"]})
    same = [p for p in per_question if p["requests_identical"]]
    return {
        "requests_identical": len(same),
        "max_abs_loglik_diff_identical": max((p["max_abs_loglik_diff"] for p in same), default=0.0),
        "predictions_differ_identical": sum(p["ours_pred"] != p["harness_pred"] for p in same),
        "predictions_differ": sum(p["ours_pred"] != p["harness_pred"] for p in per_question),
        "acc_differ": sum(p["ours_acc"] != p["harness_acc"] for p in per_question),
        "acc_norm_differ": sum(p["ours_acc_norm"] != p["harness_acc_norm"] for p in per_question),
        "per_question": per_question}


def bench_generation(args, model, tokenizer) -> dict:
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
    return {"prompts": len(convs), "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
            "batched": {"seconds": batched_s, "prompts_per_s": len(convs) / batched_s,
                        "generated_tokens_per_s": sum(batched.new_tokens) / batched_s},
            "one_at_a_time": {"seconds": single_s, "prompts_per_s": len(convs) / single_s,
                              "generated_tokens_per_s": single_tokens / single_s},
            "answers_identical": same}


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
    p.add_argument("--out", help="also write the numbers, the per-question agreement and versions to this JSON file")
    args = p.parse_args()

    import torch

    from tuneforge.models.loading import load_model, load_tokenizer
    from tuneforge.models.registry import resolve_model

    torch.set_num_threads(args.threads)
    model_path = resolve_model(args.model)
    model = load_model(model_path).eval()
    tokenizer = load_tokenizer(args.model)
    print(f"torch {torch.__version__} ({TORCH} pinned for the harness venv), model {model_path}")
    load_before = os.getloadavg()
    report = {"command": " ".join(["python", "benchmarks/eval_throughput.py", *sys.argv[1:]]),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(), "load_avg_before": load_before,
              "model": args.model, "model_folder": str(model_path), "versions": _versions(),
              "mmlu": bench_mmlu(args, model, tokenizer, Path(model_path))}
    if not args.no_generation:
        report["generation"] = bench_generation(args, model, tokenizer)
    report["load_avg_after"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(_dumps(report))
        print(f"\nwritten to {args.out}")


def _dumps(report: dict) -> str:
    """Indented JSON with one line per question."""
    per_question = report["mmlu"].pop("per_question", [])
    report["mmlu"]["per_question"] = "@per_question@"
    rows = ",\n".join(json.dumps(p) for p in per_question)
    return json.dumps(report, indent=1).replace('"@per_question@"', f"[\n{rows}\n]") + "\n"


def _versions() -> dict:
    import importlib.metadata as md

    return {d: md.version(d) for d in ("tuneforge", "torch", "transformers", "tokenizers")}


if __name__ == "__main__":
    main()
