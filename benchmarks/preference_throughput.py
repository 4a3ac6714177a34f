"""Preference training side by side: TRL's ``DPOTrainer`` vs tuneforge (``task: preference``), same pairs; with
``--task kto`` TRL's ``KTOTrainer`` vs ``task: kto`` (each pair as two labelled completions, thumbs up / down), with
``--task reward`` TRL's ``RewardTrainer`` (a sequence-classification head, peft LoRA) vs ``task: reward``.

Both train LoRA (r=16, alpha=32, dropout 0, all linear layers) with the sigmoid (DPO) loss, beta 0.1, on
the same model, the same ``--pairs`` pairs a step from the Anthropic HH harmless file, the same max length,
learning rate, cosine schedule and number of steps, in fp32 on ``--threads`` threads:

* **TRL 1.16** (its own virtualenv, ``benchmarks/throughput/venvs.py``): peft LoRA, reference = the adapter
  disabled, computed by a second forward at every step (``precompute_ref_log_probs=False``, its default),
  padded batches (TRL 1.16 turns ``padding_free`` off for DPO).
* **tuneforge**: the pairs of a step packed into one padding-free row, the LM head only on answer tokens,
  the reference log-probs computed once per pair with the adapter disabled, when the pair is first used
  (inside the steps' time; ``ref_s``, added to the total, is what is computed before step 1: none for LoRA.
  ``results/preference_cpu_2026-12-02.json`` was measured when every pair was computed before step 1).

The data are HH dialogues split at the last ``"\\n\\nAssistant:"`` (tuneforge's split), written once as TRL's
conversational format (``prompt`` messages, ``chosen`` / ``rejected`` assistant turns) that both read;
only pairs whose two sides fit ``--max-length`` tokens are used, so neither truncates. Each recipe is
a child process (``python preference_throughput.py --child {trl,tuneforge} SPEC OUT``); the parent
prints one row per recipe: pairs/s (whole run, reference pass included), real (non-pad) tokens/s,
seconds per step, peak resident memory (``VmHWM``), and the loss curve, and writes ``--json``.

    python benchmarks/preference_throughput.py --steps 20 --pairs 4 --max-length 512 --threads 2
    python benchmarks/preference_throughput.py --model TINY_FOLDER --steps 2 --pairs 2 --max-length 256  # smoke
    python benchmarks/preference_throughput.py --task kto --steps 10 --pairs 4     # 8 labelled completions a step
    python benchmarks/preference_throughput.py --task reward --steps 10 --pairs 4

Do not read timings taken while other processes share the cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "throughput"))
import common  # noqa: E402
import measure  # noqa: E402

HH = HERE.parents[1] / "shared" / "data" / "hh_rlhf_harmless_test.jsonl.gz"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}


# ------------------------------------------------------------------------------------------ data (parent)


def write_pairs(model: str, data: Path, n: int, max_length: int, out: Path) -> dict:
    """The first ``n`` HH pairs whose sides both fit ``max_length`` tokens, as conversational JSONL."""
    from tuneforge.data.formats import RecordError
    from tuneforge.data.preference import load_pairs, tokenize_pair
    from tuneforge.data.settings import DataConfig
    from tuneforge.models.loading import load_tokenizer

    tokenizer = load_tokenizer(model)
    cfg = DataConfig(train=str(data), max_length=max_length)
    rows, tokens = [], 0
    for example, _ in load_pairs(str(data), cfg).examples:
        try:
            pair, _ = tokenize_pair(example, tokenizer, cfg)
        except RecordError:
            continue
        rows.append({"prompt": example.prompt, "chosen": [example.chosen], "rejected": [example.rejected]})
        tokens += len(pair)
        if len(rows) == n:
            break
    if len(rows) < n:
        raise SystemExit(f"{data}: only {len(rows)} pairs fit max length {max_length}; need {n}")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the same pairs as KTO's unpaired records: the chosen answer desirable, the rejected one not (pair order kept)
    out.with_name("kto.jsonl").write_text("".join(
        json.dumps({"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}) + "\n"
        for r in rows for side in ("chosen", "rejected")))
    return {"pairs": n, "tokens": tokens}


# ------------------------------------------------------------------------------------------ children


def _train_trl(spec: dict, out_path: str, trainer_cls, args, model, rows: list[dict], task_type: str,
               examples: int | None, notes: str) -> None:
    """One TRL trainer with peft LoRA (the bench's settings) on ``rows``, timed; ``examples`` a step when TRL's own
    count is not the bench's unit (KTO: completions, reward: both sides of a pair)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    n_params = measure.count_params(model)
    log = measure.StepLog()
    trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                                 target_modules="all-linear", task_type=task_type),
                          callbacks=[measure.trainer_probe(log)])
    trainer.train()
    if examples is not None:
        for row in log.steps:
            row["examples"] = examples
    measure.write_result(out_path, "trl", log, spec["device"], n_params,
                         measure.versions_of("trl", "torch", "transformers", "peft"), ref_s=0.0, notes=notes)


def _trl_model(spec: dict, auto_class_name: str = "AutoModelForCausalLM", **kwargs):
    import transformers

    return getattr(transformers, auto_class_name).from_pretrained(spec["model"], dtype=common.torch_dtype(spec),
                                                                  attn_implementation="sdpa", **kwargs)


def run_trl(spec: dict, out_path: str) -> None:
    """TRL's DPOTrainer (inside TRL's venv)."""
    measure.set_threads(spec["threads"])
    from trl import DPOConfig, DPOTrainer

    kwargs = common.training_args_kwargs(dict(spec, batch=spec["pairs"]))
    args = DPOConfig(**kwargs, gradient_checkpointing=False, max_length=spec["max_length"], beta=spec["beta"],
                     loss_type=["sigmoid"], precompute_ref_log_probs=False)
    _train_trl(spec, out_path, DPOTrainer, args, _trl_model(spec), common.read_jsonl(spec["pairs_file"]),
               "CAUSAL_LM", None, "DPOTrainer, padded, reference = adapter disabled, a forward per step")


def run_trl_kto(spec: dict, out_path: str) -> None:
    """TRL's KTOTrainer (inside TRL's venv): ``2 * pairs`` labelled completions a step."""
    measure.set_threads(spec["threads"])
    from trl import KTOConfig, KTOTrainer

    kwargs = common.training_args_kwargs(dict(spec, batch=2 * spec["pairs"]))
    args = KTOConfig(**kwargs, gradient_checkpointing=False, max_length=2 * spec["max_length"], beta=spec["beta"])
    _train_trl(spec, out_path, KTOTrainer, args, _trl_model(spec), common.read_jsonl(spec["kto_file"]), "CAUSAL_LM",
               2 * spec["pairs"], "KTOTrainer, padded, reference = adapter disabled, KL from mismatched completions "
                                  "each step")


def run_trl_reward(spec: dict, out_path: str) -> None:
    """TRL's RewardTrainer (inside TRL's venv): a sequence-classification head on the model, peft LoRA."""
    measure.set_threads(spec["threads"])
    from trl import RewardConfig, RewardTrainer

    kwargs = common.training_args_kwargs(dict(spec, batch=spec["pairs"]))
    args = RewardConfig(**kwargs, gradient_checkpointing=False, max_length=2 * spec["max_length"])
    rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
            for r in common.read_jsonl(spec["pairs_file"])]
    _train_trl(spec, out_path, RewardTrainer, args, _trl_model(spec, "AutoModelForSequenceClassification",
                                                               num_labels=1),
               rows, "SEQ_CLS", 2 * spec["pairs"], "RewardTrainer, padded, chosen and rejected in one batch")


def run_tuneforge(spec: dict, out_path: str) -> None:
    """tuneforge's preference objective (in our venv); the reference pass is timed and counted."""
    measure.set_threads(spec["threads"])
    from tuneforge.config import RunConfig
    from tuneforge.training.trainer import TrainingRecipe

    task = spec.get("task", "dpo")
    by_task = {"dpo": {"task": "preference", "batch_size": spec["pairs"],
                       "preference": {"loss": "sigmoid", "beta": spec["beta"]}},
               "kto": {"task": "kto", "batch_size": 2 * spec["pairs"], "kto": {"loss": "kto", "beta": spec["beta"]}},
               "reward": {"task": "reward", "batch_size": spec["pairs"]}}[task]
    config = RunConfig.model_validate({
        "model": spec["model"], "method": "lora", **by_task,
        "output_dir": str(Path(spec["work_dir"]) / "run"), "seed": spec["seed"],
        "max_steps": spec["steps"], "learning_rate": spec["lr"],
        "lr_scheduler": "cosine", "warmup_steps": 0, "max_grad_norm": 1.0, "weight_decay": 0.0,
        "data": {"train": spec["kto_file"] if task == "kto" else spec["pairs_file"], "val_fraction": 0.0,
                 "max_length": (2 if task == "kto" else 1) * spec["max_length"], "too_long": "truncate"},
        "lora": {"r": LORA["r"], "alpha": LORA["alpha"], "dropout": LORA["dropout"], "target_modules": "all-linear"},
        "dtype": spec["dtype"], "device": spec["device"],
        "threads": spec["threads"], "progress": False, "log_every": 1, "keep_best": False})
    recipe = TrainingRecipe(config)
    timed = {"ref_s": 0.0}
    before = recipe.objective.before_training

    def before_training(*args, **kwargs):
        started = time.perf_counter()
        before(*args, **kwargs)
        timed["ref_s"] = time.perf_counter() - started

    recipe.objective.before_training = before_training  # type: ignore[method-assign]
    recipe.setup()
    recipe.fit()
    result = recipe.finish()
    log = measure.StepLog()
    for row in result.metrics:     # the normaliser (trained_tokens): pairs, KTO: labelled completions
        log.steps.append({"step": row["step"], "end_s": row["elapsed_s"], "tokens": row["tokens"], "trained_tokens": 0,
                          "examples": row["trained_tokens"] * (1 if task == "kto" else 2), "loss": row["loss"]})
    measure.write_result(out_path, "tuneforge", log, spec["device"], result.total_params - result.trainable_params,
                         measure.versions_of("tuneforge", "torch", "transformers", "peft"), ref_s=timed["ref_s"],
                         notes="packed pairs, no padding, reference computed once per pair when first used "
                               "(inside the steps' time; ref_s: what is computed before step 1)")


# ------------------------------------------------------------------------------------------ parent


def summarize(result: dict) -> dict:
    """One row: pairs/s over the whole run (reference pass included), real tokens/s, s/step, peak memory."""
    steps = result["steps"]
    total_s = steps[-1]["end_s"] + result.get("ref_s", 0.0)
    pairs = sum(s["examples"] for s in steps) / 2
    tokens = sum(s["tokens"] for s in steps)
    return {"recipe": result["recipe"], "versions": result["versions"], "steps": len(steps),
            "pairs_per_s": round(pairs / total_s, 3), "real_tok_s": round(tokens / total_s, 1),
            "s_per_step": round(steps[-1]["end_s"] / len(steps), 3), "ref_s": round(result.get("ref_s", 0.0), 2),
            "total_s": round(total_s, 2), "real_tokens_per_step": round(tokens / len(steps), 1),
            "peak_mem_mib": round(result["peak_mem_bytes"] / 2 ** 20, 1),
            "loss_curve": [s["loss"] for s in steps], "notes": result.get("notes", "")}


def table(rows: list[dict]) -> str:
    lines = ["| recipe | pairs/s | real tok/s | s/step | reference pass s | peak MiB | loss first -> last |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['recipe']} | not run: {r['error']} | | | | | |")
            continue
        curve = [x for x in r["loss_curve"] if x is not None]
        loss = f"{curve[0]:.4f} -> {curve[-1]:.4f}" if curve else "-"
        lines.append(f"| {r['recipe']} | {r['pairs_per_s']:.3f} | {r['real_tok_s']:.0f} | {r['s_per_step']:.2f} | "
                     f"{r['ref_s']:.1f} | {r['peak_mem_mib']:.0f} | {loss} |")
    done = {r["recipe"]: r for r in rows if "error" not in r}
    if "trl" in done and "tuneforge" in done:
        t, f = done["trl"], done["tuneforge"]
        lines.append(f"\ntuneforge vs TRL: pairs/s x{f['pairs_per_s'] / t['pairs_per_s']:.2f}, peak memory "
                     f"x{f['peak_mem_mib'] / t['peak_mem_mib']:.2f}")
    return "\n".join(lines)


def run_child(python: str, recipe: str, spec: dict, work: Path, timeout: float) -> dict:
    return common.run_child(__file__, python, recipe, spec, work, timeout, summarize)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=["dpo", "kto", "reward"], default="dpo",
                   help="dpo: DPOTrainer vs task preference; kto: KTOTrainer vs task kto (each pair as two labelled "
                        "completions); reward: RewardTrainer vs task reward")
    p.add_argument("--model", default="smollm2-135m-instruct", help="built-in name or local HF folder")
    p.add_argument("--data", default=str(HH))
    p.add_argument("--pairs", type=int, default=4, help="pairs per optimizer step")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-length", type=int, default=512, help="tokens per side (prompt + answer)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default="/tmp/tuneforge-preference-bench")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--with-trl", action=argparse.BooleanOptionalAction, default=True,
                   help="build TRL's venv (once) and run it")
    p.add_argument("--timeout", type=float, default=3600)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        recipe, spec_path, out_path = sys.argv[2:5]
        spec = common.load_spec(spec_path)
        trl = {"dpo": run_trl, "kto": run_trl_kto, "reward": run_trl_reward}[spec.get("task", "dpo")]
        (trl if recipe == "trl" else run_tuneforge)(spec, out_path)
        return 0
    args = parse_args(argv)
    from tuneforge.models.registry import resolve_model

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model = str(resolve_model(args.model))
    pairs_file = work / "pairs.jsonl"
    info = write_pairs(model, Path(args.data), args.pairs * args.steps, args.max_length, pairs_file)
    print(f"{info['pairs']} HH pairs ({info['tokens']} tokens, both sides) fitting {args.max_length} tokens a side; "
          f"{args.pairs} pairs/step x {args.steps} steps, {args.threads} threads", flush=True)
    spec = {"model": model, "task": args.task, "pairs_file": str(pairs_file),
            "kto_file": str(pairs_file.with_name("kto.jsonl")), "pairs": args.pairs, "steps": args.steps,
            "max_length": args.max_length, "lr": args.lr, "beta": args.beta, "threads": args.threads,
            "device": "cpu", "dtype": "fp32", "seed": args.seed}
    rows = [run_child(sys.executable, "tuneforge", spec, work / "tuneforge", args.timeout)]
    if args.with_trl:
        import venvs

        python, versions = venvs.ensure_venv(venvs.TRL)
        rows.append(run_child(str(python), "trl", spec, work / "trl", args.timeout) if python
                    else {"recipe": "trl", "error": versions})
    else:
        rows.append({"recipe": "trl", "error": "disabled (--no-with-trl)"})
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"spec": spec, "rows": rows}, indent=1))
    return 0 if all("error" not in r or r["error"].startswith("disabled") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
