"""Where tuneforge's training step spends its time, and what a change to it would save.

    python benchmarks/throughput/profile_step.py                       # phase times of the bench config
    python benchmarks/throughput/profile_step.py --profile             # + torch.profiler op table
    python benchmarks/throughput/profile_step.py --experiment loop_adamw
    python benchmarks/throughput/profile_step.py --compare baseline loop_adamw --rounds 3   # alternating A/B

It rebuilds the step of :func:`tuneforge.training.trainer.train` from the same parts (``prepare_data``,
``load_base_model``, ``apply_method``, packed attention, ``micro_batches``, ``packed_loss_sum``, AdamW, clipping)
on the bench config (SmolLM2-135M-Instruct, LoRA r=16 all-linear, 4 GPTeacher examples of at most 512 tokens
per step, fp32), and times each phase: forward + loss, backward, optimizer (clip + step + zero_grad).
Experiments change one thing without editing tuneforge (monkeypatching in this process only):

* ``dense_mask``: transformers' SDPA with its block-causal ``T x T`` mask instead of per-example SDPA;
* ``full_lm_head``: LM head on every position, then the target positions picked (no ``logits_to_keep``);
* ``no_flush_denormal``: denormal floats kept;
* ``foreach_adamw`` / ``loop_adamw``: AdamW's multi-tensor implementation / torch's CPU default (a for-loop
  over the ~420 LoRA tensors) instead of the fused one tuneforge uses;
* ``foreach_clip``: ``clip_grad_norm_(foreach=True)``;
* ``peft_forward``: peft's own LoRA forward (``nn.Dropout``, then ``A``, ``B``, scaling, add) instead of
  tuneforge's fused one (``lora.fused_forward: false``);
* ``unshared_masks``: the fused forward with one dropout mask and one ``A`` matmul per projection
  (``lora.shared_dropout_mask: false``);
* ``hf_rms_norm``: transformers' RMSNorm modules instead of tuneforge's one-function RMSNorm;
* ``no_lora_dropout``: LoRA dropout 0 (the ceiling of any cheaper dropout; changes training, so a
  measurement, not a proposal as such).

``--compare A B`` runs the experiments in fresh processes, alternating A B A B ..., and prints the median
of each phase, so a machine shared with other work biases neither side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "gpteacher_roleplay.json"
EXPERIMENTS = ("baseline", "dense_mask", "full_lm_head", "no_flush_denormal", "foreach_adamw", "loop_adamw",
               "foreach_clip", "no_lora_dropout", "peft_forward", "unshared_masks", "hf_rms_norm")


def run(args) -> dict:
    import torch

    if args.experiment != "no_flush_denormal":
        torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).parent))
    import harness

    from tuneforge.config import RunConfig
    from tuneforge.data.dataset import prepare_data
    from tuneforge.data.packing import micro_batches
    from tuneforge.methods import apply_method, load_base_model
    from tuneforge.models.loading import load_tokenizer
    from tuneforge.methods import loss as loss_mod
    from tuneforge.training.trainer import make_optimizer, prepare_for_training

    work = Path(args.work_dir)
    n = args.batch * (args.steps + 1)
    files = harness.write_data(harness.bench_subset(harness.load_conversations(args.data), n, args.seed), work)
    config = RunConfig.model_validate({
        "model": args.model, "method": "lora", "batch_size": args.batch, "output_dir": str(work / "run"),
        "learning_rate": 2e-4, "attention": "sdpa" if args.experiment == "dense_mask" else "packed_sdpa",
        "fused_rms_norm": args.experiment != "hf_rms_norm",
        "lora": {"dropout": 0.0 if args.experiment == "no_lora_dropout" else 0.05,
                 "fused_forward": args.experiment != "peft_forward",
                 "shared_dropout_mask": args.experiment != "unshared_masks"},
        "data": {"train": files["messages_file"], "format": "messages", "val_fraction": 0.0, "train_on": "assistant",
                 "max_length": args.max_length, "too_long": "truncate"}})
    tokenizer = load_tokenizer(config.model)
    data = prepare_data(config.data, tokenizer, config.seed)
    model = apply_method(load_base_model(config, dtype=torch.float32, device="cpu"), config, tokenizer)
    prepare_for_training(model, config)
    if args.experiment == "full_lm_head":
        def full_head(model, method, input_ids, position_ids, keep_idx):
            out = model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
            return out.logits[0, keep_idx]
        loss_mod.method_forward = full_head
    params = [p for p in model.parameters() if p.requires_grad]
    if args.experiment in ("foreach_adamw", "loop_adamw"):
        optimizer = torch.optim.AdamW(params, lr=2e-4, foreach=args.experiment == "foreach_adamw")
    else:
        optimizer = make_optimizer(config, params)
    batches = list(micro_batches(data.train, args.batch, config.seed, 0))
    phases = {"forward_s": [], "backward_s": [], "optimizer_s": [], "step_s": [], "tokens": []}

    def step(batch):
        t0 = time.perf_counter()
        loss = loss_mod.packed_loss_sum(model, batch, "lora") / batch.num_loss_tokens
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True if args.experiment == "foreach_clip" else None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, t3 - t0

    step(batches[0])  # warm-up (optimizer states, allocator)
    profiler = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=args.by_shape)
        profiler.__enter__()
    for batch in batches[1:args.steps + 1]:
        f, b, o, s = step(batch)
        for key, value in zip(("forward_s", "backward_s", "optimizer_s", "step_s", "tokens"), (f, b, o, s, batch.num_tokens)):
            phases[key].append(value)
    if profiler is not None:
        profiler.__exit__(None, None, None)
        table = profiler.key_averages(group_by_input_shape=args.by_shape).table(
            sort_by="self_cpu_time_total", row_limit=args.profile_rows)
        (work / "profile.txt").write_text(table)
        print(table)
    out = {"experiment": args.experiment, **{k: [round(x, 4) for x in v] for k, v in phases.items()}}
    out["tok_s"] = round(sum(phases["tokens"]) / sum(phases["step_s"]), 1)
    import resource

    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def compare(args) -> None:
    results: dict[str, list[dict]] = {e: [] for e in args.compare}
    for r in range(args.rounds):
        for exp in args.compare:
            cmd = [sys.executable, __file__, "--experiment", exp, "--steps", str(args.steps), "--batch", str(args.batch),
                   "--max-length", str(args.max_length), "--threads", str(args.threads), "--data", args.data,
                   "--model", args.model, "--work-dir", f"{args.work_dir}/{exp}-{r}", "--json-only"]
            line = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results[exp].append(json.loads(line))
            print(f"round {r} {exp}: {results[exp][-1]['tok_s']} tok/s", flush=True)
    print("| experiment | tok/s (median of runs) | forward s | backward s | optimizer s | step s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for exp, runs in results.items():
        med = {k: statistics.median(x for r in runs for x in r[k]) for k in ("forward_s", "backward_s", "optimizer_s", "step_s")}
        tok = statistics.median(r["tok_s"] for r in runs)
        print(f"| {exp} | {tok:.0f} | {med['forward_s']:.3f} | {med['backward_s']:.3f} | {med['optimizer_s']:.3f} | "
              f"{med['step_s']:.3f} | {statistics.median(r['peak_rss_mib'] for r in runs):.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=4, help="timed steps after one warm-up step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--experiment", choices=EXPERIMENTS, default="baseline")
    p.add_argument("--compare", nargs="+", choices=EXPERIMENTS)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--profile-rows", type=int, default=30)
    p.add_argument("--by-shape", action="store_true", help="--profile: one row per op and input shapes")
    p.add_argument("--work-dir", default="/tmp/tuneforge-profile")
    p.add_argument("--json-only", action="store_true")
    args = p.parse_args()
    if args.compare:
        compare(args)
        return
    out = run(args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
