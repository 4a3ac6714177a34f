"""GRPO side by side: TRL's ``GRPOTrainer`` (its own venv, no vLLM) vs tuneforge (``task: grpo``), same prompts.

Both train LoRA (r=16, alpha=32, dropout 0, all linear layers) on the same model (default: the converted
SmolLM2-135M-Instruct the other benches use), the same ticket prompts (``examples/data/tickets_train.jsonl``: the
system and user turns, the queue as ``answer``), ``--prompts`` prompts x ``--generations`` completions a step of at
most ``--max-completion`` tokens, sampled at temperature 1, the same reward (:func:`ticket_reward`: 1 when the
completion names the record's queue, else 0), loss ``dapo``, ``beta`` 0, one optimizer step per generation
(``num_iterations`` 1), the same learning rate, cosine schedule and number of steps, fp32 on ``--threads`` threads,
no gradient checkpointing (TRL's GRPOConfig turns it on by default; off here, as tuneforge's):

* **TRL 1.16** (``benchmarks/throughput/venvs.py``): ``per_device_train_batch_size`` = prompts x generations,
  ``steps_per_generation`` 1, HF ``generate`` for the rollouts, padded batches.
* **tuneforge**: rollouts by our batched KV-cached generation, prompt + completion packed padding-free, the LM head
  on completion tokens only; ``dynamic_sampling`` off (TRL does not drop groups of equal rewards).

Each recipe is a child process (``python grpo_throughput.py --child {trl,tuneforge} SPEC OUT``); the parent prints
one row per recipe: completions trained per second (every sampled completion, over the whole run: rollouts, reward,
loss and optimizer step), seconds per step, peak resident memory (``VmHWM``; on CUDA, allocated tensors), the mean
completion length (a recipe whose completions stop earlier does less work: compare it before the speed), and the
mean reward of each step, and writes ``--json``. The reward curves are one sampled run each: compare their noise,
not their values step by step.

    python benchmarks/grpo_throughput.py --steps 20 --prompts 4 --generations 8 --max-completion 32 --threads 2
    python benchmarks/grpo_throughput.py --model TINY_FOLDER --steps 2 --prompts 2 --generations 2 \\
        --max-completion 4 --threads 1        # smoke

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

TICKETS = HERE.parent / "examples" / "data" / "tickets_train.jsonl"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}


def ticket_reward(prompts: list, completions: list, answer: list, **ignored) -> list[float]:
    """1.0 when the completion names the record's queue (any case), else 0.0. ``completions``: strings (tuneforge)
    or one assistant message list each (TRL's conversational prompts)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(str(a).lower() in t.lower()) for t, a in zip(texts, answer, strict=True)]


def write_prompts(source: Path, n: int, out: Path) -> int:
    """The first ``n`` ticket records as ``{"prompt": [system, user], "answer": queue}``."""
    rows = []
    for line in source.read_text().splitlines():
        messages = json.loads(line)["messages"]
        rows.append({"prompt": messages[:-1], "answer": messages[-1]["content"]})
        if len(rows) == n:
            break
    if len(rows) < n:
        raise SystemExit(f"{source}: only {len(rows)} records; need {n} (--prompts x --steps)")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


# ------------------------------------------------------------------------------------------ children


def run_trl(spec: dict, out_path: str) -> None:
    """TRL's GRPOTrainer (inside TRL's venv), without vLLM."""
    measure.set_threads(spec["threads"])
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    kwargs = common.training_args_kwargs(dict(spec, batch=spec["prompts"] * spec["generations"]))
    args = GRPOConfig(**kwargs, gradient_checkpointing=False, num_generations=spec["generations"],
                      max_completion_length=spec["max_completion"], temperature=1.0, beta=0.0, loss_type="dapo",
                      num_iterations=1, steps_per_generation=1, use_vllm=False)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["model"], dtype=common.torch_dtype(spec),
                                                              attn_implementation="sdpa")
    n_params = measure.count_params(model)
    log = measure.StepLog()
    rewards: list[float] = []
    lengths: list[float] = []

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            log.start()

        def on_step_end(self, args, state, control, **kw):
            log.end_step(0, 0, spec["prompts"] * spec["generations"], None)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                rewards.append(float(logs["reward"]))
                lengths.append(float(logs.get("completions/mean_length", 0.0)))
                if log.steps and log.steps[-1]["loss"] is None and "loss" in logs:
                    log.steps[-1]["loss"] = float(logs["loss"])

    trainer = GRPOTrainer(model=model, reward_funcs=ticket_reward, args=args,
                          train_dataset=Dataset.from_list(common.read_jsonl(spec["prompts_file"])),
                          processing_class=tokenizer,
                          peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                                 target_modules="all-linear", task_type="CAUSAL_LM"),
                          callbacks=[Probe()])
    trainer.train()
    measure.write_result(out_path, "trl", log, spec["device"], n_params,
                         measure.versions_of("trl", "torch", "transformers", "peft"), rewards=rewards, lengths=lengths,
                         notes="GRPOTrainer, HF generate (no vLLM), padded batches")


def run_tuneforge(spec: dict, out_path: str) -> None:
    """tuneforge's ``task: grpo`` (in our venv)."""
    measure.set_threads(spec["threads"])
    from tuneforge.config import RunConfig
    from tuneforge.training.trainer import TrainingRecipe

    sys.path.insert(0, str(HERE))          # grpo_throughput:ticket_reward, the reward TRL gets too
    config = RunConfig.model_validate({
        "model": spec["model"], "method": "lora", "task": "grpo", "batch_size": spec["prompts"],
        "output_dir": str(Path(spec["work_dir"]) / "run"), "seed": spec["seed"],
        "max_steps": spec["steps"], "learning_rate": spec["lr"],
        "lr_scheduler": "cosine", "warmup_steps": 0, "max_grad_norm": 1.0, "weight_decay": 0.0,
        "data": {"train": spec["prompts_file"], "val_fraction": 0.0, "max_length": 512},
        "lora": {"r": LORA["r"], "alpha": LORA["alpha"], "dropout": LORA["dropout"], "target_modules": "all-linear"},
        "grpo": {"num_generations": spec["generations"], "max_completion_length": spec["max_completion"],
                 "temperature": 1.0, "beta": 0.0, "loss_type": "dapo", "num_iterations": 1,
                 "dynamic_sampling": False, "log_samples": 0,
                 "rewards": [{"name": "grpo_throughput:ticket_reward", "options": {"needs": ["answer"]}}]},
        "dtype": spec["dtype"], "device": spec["device"], "eval_share": None,
        "threads": spec["threads"], "progress": False, "log_every": 1, "keep_best": False})
    recipe = TrainingRecipe(config)
    recipe.setup()
    recipe.fit()
    result = recipe.finish()
    log = measure.StepLog()
    for row in result.metrics:
        log.steps.append({"step": row["step"], "end_s": row["elapsed_s"], "tokens": 0, "trained_tokens": 0,
                          "examples": spec["prompts"] * spec["generations"], "loss": row["loss"]})
    measure.write_result(out_path, "tuneforge", log, spec["device"], result.total_params - result.trainable_params,
                         measure.versions_of("tuneforge", "torch", "transformers", "peft"),
                         rewards=[row.get("reward") for row in result.metrics],
                         lengths=[row.get("completions/mean_length", 0.0) for row in result.metrics],
                         notes="batched KV-cached rollouts, packed prompt + completion rows, no padding")


# ------------------------------------------------------------------------------------------ parent


def summarize(result: dict) -> dict:
    """One row: completions trained per second over the whole run, s/step, peak memory, reward per step."""
    steps = result["steps"]
    total_s = steps[-1]["end_s"]
    completions = sum(s["examples"] for s in steps)
    rewards = result.get("rewards", [])
    lengths = result.get("lengths", [])
    return {"recipe": result["recipe"], "versions": result["versions"], "steps": len(steps),
            "completions_per_s": round(completions / total_s, 3), "s_per_step": round(total_s / len(steps), 3),
            "total_s": round(total_s, 2), "peak_mem_mib": round(result["peak_mem_bytes"] / 2 ** 20, 1),
            "reward_curve": [None if r is None else round(r, 4) for r in rewards],
            "reward_mean": round(sum(r for r in rewards if r is not None) / max(1, len(rewards)), 4),
            "mean_completion_tokens": round(sum(lengths) / max(1, len(lengths)), 2),
            "notes": result.get("notes", "")}


def table(rows: list[dict]) -> str:
    lines = ["| recipe | completions/s | s/step | peak MiB | mean completion tokens | reward mean | reward per step |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['recipe']} | not run: {r['error']} | | | | | |")
            continue
        curve = " ".join("-" if x is None else f"{x:.2f}" for x in r["reward_curve"])
        lines.append(f"| {r['recipe']} | {r['completions_per_s']:.3f} | {r['s_per_step']:.2f} | "
                     f"{r['peak_mem_mib']:.0f} | {r['mean_completion_tokens']:.1f} | {r['reward_mean']:.3f} | "
                     f"{curve} |")
    done = {r["recipe"]: r for r in rows if "error" not in r}
    if "trl" in done and "tuneforge" in done:
        t, f = done["trl"], done["tuneforge"]
        lines.append(f"\ntuneforge vs TRL: completions/s x{f['completions_per_s'] / t['completions_per_s']:.2f}, "
                     f"peak memory x{f['peak_mem_mib'] / t['peak_mem_mib']:.2f}")
    return "\n".join(lines)


def run_child(python: str, recipe: str, spec: dict, work: Path, timeout: float) -> dict:
    return common.run_child(__file__, python, recipe, spec, work, timeout, summarize)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="built-in name or local HF folder")
    p.add_argument("--data", default=str(TICKETS), help="ticket records (messages ending with the queue)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per optimizer step")
    p.add_argument("--generations", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--max-completion", type=int, default=32, help="new tokens per completion at most")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default="/tmp/tuneforge-grpo-bench")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--with-trl", action=argparse.BooleanOptionalAction, default=True,
                   help="build TRL's venv (once) and run it")
    p.add_argument("--timeout", type=float, default=3600)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        recipe, spec_path, out_path = sys.argv[2:5]
        (run_trl if recipe == "trl" else run_tuneforge)(common.load_spec(spec_path), out_path)
        return 0
    args = parse_args(argv)
    from tuneforge.models.registry import resolve_model

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model = str(resolve_model(args.model))
    prompts_file = work / "prompts.jsonl"
    n = write_prompts(Path(args.data), args.prompts * args.steps, prompts_file)
    print(f"{n} ticket prompts; {args.prompts} prompts x {args.generations} completions of <= {args.max_completion} "
          f"tokens a step, {args.steps} steps, {args.threads} threads, {args.device} {args.dtype}", flush=True)
    spec = {"model": model, "prompts_file": str(prompts_file), "prompts": args.prompts,
            "generations": args.generations, "max_completion": args.max_completion, "steps": args.steps,
            "lr": args.lr, "threads": args.threads, "device": args.device, "dtype": args.dtype, "seed": args.seed}
    started = time.time()
    rows = [run_child(sys.executable, "tuneforge", spec, work / "tuneforge", args.timeout)]
    if args.with_trl:
        import venvs

        python, versions = venvs.ensure_venv(venvs.TRL if args.device == "cpu" else venvs.TRL_GPU)
        rows.append(run_child(str(python), "trl", spec, work / "trl", args.timeout) if python
                    else {"recipe": "trl", "error": versions})
    else:
        rows.append({"recipe": "trl", "error": "disabled (--no-with-trl)"})
    print(table(rows))
    print(f"({time.time() - started:.0f} s in all)")
    if args.json:
        Path(args.json).write_text(json.dumps({"spec": spec, "rows": rows}, indent=1))
    return 0 if all("error" not in r or r["error"].startswith("disabled") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
