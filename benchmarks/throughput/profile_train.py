"""Where the real training loop spends a step, on any device: ``tuneforge.train`` with the bench's tuneforge config,
its steps timed (device-synchronised) and a few of them profiled.

    python benchmarks/throughput/profile_train.py --device cuda --random-init-shape llama-3.2-1b --batch 16
    python benchmarks/throughput/profile_train.py --device cuda --batch 80 --set attention=flash_varlen --out DIR

Unlike ``profile_step.py`` (which rebuilds the step from its parts, on a CPU), this runs
:func:`tuneforge.training.trainer.train` itself, config for config what ``train_throughput.py``'s tuneforge row
runs (``tuneforge_recipe.run_config``), so a fixed per-step cost anywhere in the loop (batching, metrics, the NaN
guard, the optimizer, host-device syncs) shows up. ``TrainingRecipe.train_step`` is wrapped: every step is timed
between two ``torch.cuda.synchronize()``; steps ``--profile-from`` .. ``+ --profile-steps - 1`` run under
``torch.profiler`` (CPU and CUDA activities) and ``cProfile``. Prints, and writes under ``--out``:

* ``ops_by_device_time.txt``: ops by self CUDA time (CPU time on a CPU run);
* ``ops_by_cpu_time.txt``: ops by self CPU time (launch overhead, Python-side work, syncs);
* ``python_by_tottime.txt``: cProfile's functions by their own time, then by cumulative time;
* one JSON line: per-step seconds, tokens per step, tokens/s of the steps after the first, peak memory, the
  attention and kernels the run chose.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "gpteacher_roleplay.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="a model name or folder (config + tokenizer "
                   "is enough with --random-init-shape)")
    p.add_argument("--random-init-shape", help="random weights of a named shape (llama-3.2-1b, tiny, ...)")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--profile-from", type=int, default=3, help="first profiled step (1-based)")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", type=int, default=25, help="rows of each table")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="tuneforge config override, as train_throughput.py's --tuneforge-set (repeatable)")
    p.add_argument("--out", default="/tmp/tuneforge-profile-train")
    p.add_argument("--label", default="")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import harness
    import measure
    import torch
    import tuneforge_recipe
    from train_throughput import tuneforge_overrides

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    measure.set_threads(args.threads)
    cuda = args.device.startswith("cuda")
    model = harness.model_folder(args.model, args.random_init_shape, args.device)
    n = args.batch * (args.steps + 1)
    files = harness.write_data(harness.bench_subset(harness.load_conversations(args.data), n, args.seed), out)
    spec = {"model": str(model), "max_length": args.max_length, "steps": args.steps, "batch": args.batch,
            "lr": 2e-4, "lora": {"r": 16, "alpha": 32, "dropout": 0.05}, "threads": args.threads,
            "device": args.device, "dtype": "bf16" if cuda else "fp32", "seed": args.seed, "options": {},
            "work_dir": str(out), "template": {"name": "auto"}, "tuneforge_config": tuneforge_overrides(args.set),
            **files}
    config_dict = tuneforge_recipe.run_config(spec)
    from tuneforge.config import RunConfig
    from tuneforge.training import trainer as trainer_mod

    chosen: list[str] = []

    class Grab:  # the kernels' log lines: which attention and kernels the run chose
        def write(self, s: str) -> None:
            if "attention" in s or "kernels:" in s or "precision" in s:
                chosen.append(s.strip())

    import logging

    handler = logging.StreamHandler(Grab())  # type: ignore[arg-type]
    logging.getLogger("tuneforge").addHandler(handler)
    logging.getLogger("tuneforge").setLevel(logging.INFO)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    steps: list[dict] = []
    first, last = args.profile_from, args.profile_from + args.profile_steps - 1
    state: dict = {}
    original = trainer_mod.TrainingRecipe.train_step

    def timed_step(self):
        k = len(steps) + 1
        if k == first:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            state["prof"] = profile(activities=activities)
            state["prof"].__enter__()
            state["cprof"] = cProfile.Profile()
            state["cprof"].enable()
        sync()
        t0 = time.perf_counter()
        row = original(self)
        sync()
        steps.append({"step": k, "s": round(time.perf_counter() - t0, 4), "tokens": row["tokens"],
                      "loss": row.get("loss")})
        if k == last:
            state["cprof"].disable()
            state["prof"].__exit__(None, None, None)
        return row

    trainer_mod.TrainingRecipe.train_step = timed_step
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer_mod.train(RunConfig.model_validate(config_dict))
    total = time.perf_counter() - started
    tag = f"[{args.label or args.batch}]"
    if "prof" in state:
        averages = state["prof"].key_averages()
        device_key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        for name, key in (("ops_by_device_time.txt", device_key), ("ops_by_cpu_time.txt", "self_cpu_time_total")):
            table = averages.table(sort_by=key, row_limit=args.rows)
            (out / name).write_text(table)
            print(f"{tag} {name} ({args.profile_steps} steps)\n{table}")
        text = io.StringIO()
        stats = pstats.Stats(state["cprof"], stream=text)
        stats.sort_stats("tottime").print_stats(args.rows)
        stats.sort_stats("cumulative").print_stats(args.rows)
        (out / "python_by_tottime.txt").write_text(text.getvalue())
        print(f"{tag} python_by_tottime.txt\n" + "\n".join(text.getvalue().splitlines()[:args.rows + 12]))
    rest = steps[1:]
    summary = {"label": args.label, "batch": args.batch, "random_init_shape": args.random_init_shape,
               "set": args.set, "device": args.device, "chosen": chosen, "steps": steps,
               "tok_s_after_first": round(sum(s["tokens"] for s in rest) / max(sum(s["s"] for s in rest), 1e-9), 1),
               "s_per_step_after_first": round(sum(s["s"] for s in rest) / max(len(rest), 1), 4),
               "peak_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
               "total_s": round(total, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{tag} SUMMARY " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
