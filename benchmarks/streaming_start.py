"""Time to the first training step and peak memory: ``data.streaming`` against the in-memory data path.

    python benchmarks/streaming_start.py                          # 1M records (~1 GB JSONL), SmolLM2-135M
    python benchmarks/streaming_start.py --records 2000 --tiny    # a quick check that it works
    python benchmarks/streaming_start.py --skip-in-memory         # streaming only (the in-memory path at 1M is slow)
    python benchmarks/streaming_start.py --skip-in-memory --skip-second-run   # only the time to the first step

It writes ``--records`` unique Alpaca-size records (an instruction of ~25 words, an answer of ~150: ~1 KB a line) to a
temporary folder, then runs each case in a fresh subprocess with its own empty cache (``TUNEFORGE_CACHE``), so that
its peak RSS (``ru_maxrss``) and its timings are its own:

* ``model only``: the same run on a 64-record file: what the model, the optimizer and one step take by themselves;
* ``streaming, first run``: ``data.streaming: true``, nothing cached: the store is written while training starts;
* ``streaming, second run``: the same key again: the complete store is opened (the first run is left to tokenize to
  the end first, as a run that trained long enough would have);
* ``in memory, first run`` and ``in memory, second run``: ``data.streaming: false`` (the ``.pt`` cache).

Each case times the seconds from the start of ``TrainingRecipe.setup()`` to the end of the first optimizer step
(data preparation, model loading and the step), the mean seconds of the ``--more-steps`` steps after it (in the
first streaming run the tokenizing thread shares the CPU and the GIL with them), and the peak RSS and its excess
over ``model only``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"


def make_records(n: int, path: Path, seed: int = 0) -> Path:
    """``n`` unique Alpaca-size records, streamed to disk (~1 KB a line)."""
    rng = random.Random(seed)
    vocab = ("order parcel invoice account refund password delivery charge support ticket customer answer question "
             "problem screen update billing shipping login address payment card email phone number store return "
             "late twice again please thanks today yesterday week month price error message reset change cancel "
             "subscription plan upgrade device battery warranty repair replace item size colour stock").split()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            instruction = f"Record {i}: " + " ".join(rng.choices(vocab, k=25))
            output = " ".join(rng.choices(vocab, k=150))
            f.write(json.dumps({"instruction": instruction, "output": output}) + "\n")
    return path


def child(args: argparse.Namespace) -> None:
    """One case, in this process: set up the run and take one step; print a JSON line."""
    from tuneforge.config import load_config
    from tuneforge.data.streaming import StreamingData
    from tuneforge.training.trainer import TrainingRecipe

    settings = {"model": args.model, "output_dir": args.out,
                "data": {"train": args.data, "streaming": args.streaming, "max_length": 1024},
                "max_steps": 1000, "batch_size": 4, "gradient_accumulation_steps": 1, "progress": False,
                "eval_base": False, "save_every": None, "device": "cpu"}
    start = time.time()
    recipe = TrainingRecipe(load_config(data=settings))
    recipe.setup()
    data_ready = time.time() - start
    recipe.loop_start = time.time()
    recipe.train_step()
    first_step = time.time() - start
    more = time.time()
    for _ in range(args.more_steps):        # steps while the writer thread (first streaming run) shares the CPU
        recipe.train_step()
    more_s = (time.time() - more) / max(1, args.more_steps)
    data = recipe.data
    stored = complete = None
    if isinstance(data, StreamingData):
        complete = data.complete
        stored = data.epoch_length
        if args.finish:                                    # leave the store complete for the second run
            data.train.wait_for(1 << 62, data.writing)
        data.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"first_step_s": round(first_step, 2), "data_ready_s": round(data_ready, 2), "peak_rss": peak,
                      "next_step_s": round(more_s, 3),
                      "examples_at_first_step": stored, "complete_at_first_step": complete}))


def run_case(model: str, data: Path, cache: Path, streaming: bool, finish: bool, folder: Path,
             more_steps: int) -> dict:
    out = tempfile.mkdtemp(dir=folder, prefix="run-")
    cmd = [sys.executable, __file__, "--child", "--model", model, "--data", str(data), "--out", out]
    cmd += ["--streaming"] if streaming else []
    cmd += ["--finish"] if finish else []
    cmd += ["--more-steps", str(more_steps)]
    env = {**os.environ, "TUNEFORGE_CACHE": str(cache)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"case failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer random model of --model's architecture")
    parser.add_argument("--skip-in-memory", action="store_true")
    parser.add_argument("--skip-second-run", action="store_true",
                        help="no streaming second run (which needs the first to tokenize the whole file first)")
    parser.add_argument("--more-steps", type=int, default=5, help="steps timed after the first (mean s a step)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--streaming", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--finish", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="streaming-start-") as tmp:
        folder = Path(tmp)
        model = args.model
        if args.tiny:
            from tuneforge.models.loading import build_tiny_model, load_tokenizer

            model = str(folder / "tiny-model")
            build_tiny_model(args.model, seed=0).save_pretrained(model)
            load_tokenizer(args.model).save_pretrained(model)
        t = time.time()
        big = make_records(args.records, folder / "train.jsonl")
        small = make_records(64, folder / "small.jsonl", seed=1)
        print(f"{args.records:,} records, {big.stat().st_size / 2**20:,.0f} MiB, written in {time.time() - t:.0f} s; "
              f"model {args.model}{' (tiny)' if args.tiny else ''}", flush=True)
        cases: list[tuple[str, dict]] = []

        def case(name: str, data: Path, cache: str, streaming: bool, finish: bool = False) -> dict:
            result = run_case(model, data, folder / cache, streaming, finish, folder, args.more_steps)
            cases.append((name, result))
            return result

        base = case("model only (64 records)", small, "cache-base", False)
        case("streaming, first run", big, "cache-s", True, finish=not args.skip_second_run)
        if not args.skip_second_run:
            case("streaming, second run", big, "cache-s", True)
        if not args.skip_in_memory:
            case("in memory, first run", big, "cache-m", False)
            case("in memory, second run", big, "cache-m", False)
        print(f"{'case':<26} {'first step s':>12} {'data ready s':>12} {'next steps s':>12} {'peak RSS MiB':>12} "
              f"{'over model MiB':>14} {'tokenized at step 1':>20}")
        for name, r in cases:
            tokenized = ("" if r["examples_at_first_step"] is None else
                         f"{r['examples_at_first_step']:,}{' (all)' if r['complete_at_first_step'] else ''}")
            print(f"{name:<26} {r['first_step_s']:>12.2f} {r['data_ready_s']:>12.2f} {r['next_step_s']:>12.3f} "
                  f"{r['peak_rss'] / 2**20:>12.0f} "
                  f"{(r['peak_rss'] - base['peak_rss']) / 2**20:>14.0f} {tokenized:>20}")


if __name__ == "__main__":
    main()
