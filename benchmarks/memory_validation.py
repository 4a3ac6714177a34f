"""Check `tuneforge estimate` against real training steps of SmolLM2-135M on CPU, for every registered method.

    python benchmarks/memory_validation.py                       # the default grid, all 7 methods (~35 min on 1 core)
    python benchmarks/memory_validation.py --methods lora --points 512x1 512x4
    python benchmarks/memory_validation.py --points 512x4:ckpt   # with gradient checkpointing
    python benchmarks/memory_validation.py --model gemma3-270m --methods lora full --points 128x1 256x1

Each measurement runs in a fresh subprocess with one thread. The child imports everything (torch,
transformers, peft, bitsandbytes, tuneforge), records its resident memory (VmRSS) as the baseline, then
does what ``tuneforge.training.trainer.train`` does for a step: ``load_base_model`` + ``apply_method`` (+
gradient checkpointing as the trainer enables it), AdamW over the trainable parameters, then two steps of
``packed_loss_sum`` -> ``backward`` -> ``clip_grad_norm_`` -> ``step`` -> ``zero_grad(set_to_none=True)``
on one packed row of ``batch`` synthetic examples of ``seq`` tokens, every token trained (``task:
pretrain``; each method with its section's defaults). Two steps, because AdamW allocates its states in the
first ``step()``, so only the second
step's backward holds weights, states and activations together. Measured = peak resident memory
(VmHWM) minus the baseline.

glibc malloc keeps freed blocks below its (dynamic, up to 32 MiB) mmap threshold in the heap, so after
the first backward the process's resident memory stays near its high-water mark and the second step
adds to it: RSS then overstates live tensor memory by 20-25% here. The estimator predicts live tensor
bytes (what ``torch.cuda.max_memory_allocated`` reports on a GPU), so by default the children run with
``MALLOC_MMAP_THRESHOLD_=65536``: every tensor of 64 KiB or more gets its own mapping, returned to the
system when freed, and RSS follows live memory. ``--mmap-threshold 0`` measures glibc's default.

QLoRA used to read 300-460 MiB above the prediction: loading quantized kept the fp32 ``model.safetensors``
mapped (the unquantized embeddings were views of it), and the pages of the linears read while quantizing
stayed resident. ``load_quantized_model`` now copies the unquantized tensors on CPU so the mapping
closes (:func:`tuneforge.methods.qlora.release_checkpoint_mapping_`). Predicted = :func:`tuneforge.estimate.estimate_memory` for the same run
(fp32, device cpu, ``trained_fraction = (seq-1)/seq``: the last token of an example has no target).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODEL = "smollm2-135m-instruct"
DEFAULT_POINTS = ("256x1", "1024x1", "256x4", "256x4:ckpt")
MIB = 1024 ** 2


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(method: str, seq: int, batch: int, ckpt: bool) -> dict:
    import torch

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    import bitsandbytes  # noqa: F401  (imported before the baseline for every method alike)
    import peft  # noqa: F401

    from tuneforge.config import RunConfig
    from tuneforge.data.packing import pack
    from tuneforge.data.rendering import TokenizedExample
    from tuneforge.methods import apply_method, count_parameters, load_base_model
    from tuneforge.models.registry import resolve_model
    from tuneforge.methods.loss import packed_loss_sum
    from tuneforge.training.trainer import make_optimizer, prepare_for_training

    resolve_model(MODEL)  # converts once, cached; not part of the measurement
    config = RunConfig.model_validate(run_config(method, ckpt))
    g = torch.Generator().manual_seed(0)
    examples = [TokenizedExample(torch.randint(0, 32000, (seq,), generator=g).tolist(), [True] * seq)
                for _ in range(batch)]
    row = pack(examples)
    baseline = _status_kib("VmRSS")

    model = load_base_model(config, dtype=torch.float32, device="cpu")
    model = apply_method(model, config)
    prepare_for_training(model, config)         # as the trainer does: packed attention, fused norms, checkpointing
    trainable, total = count_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(config, params)  # fused AdamW
    after_load = _status_kib("VmRSS")
    load_hwm = _status_kib("VmHWM")
    times = []
    for _ in range(2):
        start = time.time()
        loss = packed_loss_sum(model, row, method)
        (loss / row.num_loss_tokens).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(round(time.time() - start, 1))
    return {"baseline_mib": baseline / 1024, "load_mib": (after_load - baseline) / 1024,
            "load_peak_mib": (load_hwm - baseline) / 1024, "peak_mib": (_status_kib("VmHWM") - baseline) / 1024,
            "trainable": trainable, "step_s": times}


def run_config(method: str, ckpt: bool) -> dict:
    return {"model": MODEL, "method": method, "task": "pretrain", "dtype": "fp32", "gradient_checkpointing": ckpt,
            "learning_rate": 1e-5, "data": {"train": "unused.jsonl"}}


def refusal(method: str, ckpt: bool) -> str | None:
    """The run config's one line when it refuses the run (prefix tuning with checkpointing), else None."""
    from tuneforge.config import RunConfig

    from pydantic import ValidationError

    try:
        RunConfig.model_validate(run_config(method, ckpt))
    except ValidationError as e:
        return str(e.errors()[0]["msg"]).removeprefix("Value error, ")
    return None


def predict(method: str, seq: int, batch: int, ckpt: bool):
    from tuneforge.estimate import estimate_memory

    return estimate_memory(MODEL, method, seq, batch, gradient_checkpointing=ckpt, dtype="fp32", device="cpu",
                           trained_fraction=(seq - 1) / seq)


def parse_point(text: str) -> tuple[int, int, bool]:
    body, _, flag = text.partition(":")
    seq, batch = (int(x) for x in body.lower().split("x"))
    return seq, batch, flag == "ckpt"


def main(argv: list[str] | None = None) -> int:
    global MODEL
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    from tuneforge.estimate.memory import estimable_methods

    p.add_argument("--methods", nargs="+", default=estimable_methods(), choices=estimable_methods())
    p.add_argument("--points", nargs="+", default=list(DEFAULT_POINTS), help="SEQxBATCH[:ckpt]")
    p.add_argument("--mmap-threshold", type=int, default=65536,
                   help="MALLOC_MMAP_THRESHOLD_ for the children (bytes); 0 = glibc's default dynamic threshold")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--model", default=MODEL, help="model spec (default: %(default)s)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    MODEL = args.model
    if args.child:
        method, seq, batch, ckpt = json.loads(args.child)
        print(json.dumps(child(method, seq, batch, ckpt)))
        return 0

    rows = []
    print(f"{MODEL}, fp32, CPU, 1 thread, MALLOC_MMAP_THRESHOLD_="
          f"{args.mmap_threshold or 'glibc default'}; MiB above the baseline after imports")
    header = (f"{'method':<7}{'seq':>6}{'batch':>6}{'ckpt':>6}{'pred MiB':>10}{'meas MiB':>10}{'error':>8}"
              f"{'  phase':<18}{'load MiB':>9}{'act+logit':>11}{'step s':>9}")
    print(header)
    print("-" * len(header))
    for method in args.methods:
        for point in args.points:
            seq, batch, ckpt = parse_point(point)
            refused = refusal(method, ckpt)
            if refused:
                print(f"{method:<7}{seq:>6}{batch:>6}{'yes' if ckpt else 'no':>6}  refused: {refused}", flush=True)
                rows.append({"method": method, "seq": seq, "batch": batch, "ckpt": ckpt, "refused": refused})
                continue
            est = predict(method, seq, batch, ckpt)
            env = dict(os.environ)
            env.pop("MALLOC_MMAP_THRESHOLD_", None)
            if args.mmap_threshold:
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
            out = subprocess.run([sys.executable, __file__, "--model", MODEL, "--child",
                                  json.dumps([method, seq, batch, ckpt])],
                                 capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(f"{method} {point}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            m = json.loads(out.stdout.strip().splitlines()[-1])
            pred = max(est.peak, est.load_peak) / MIB   # VmHWM counts loading too (QLoRA quantizing on CPU)
            err = 100 * (pred - m["peak_mib"]) / m["peak_mib"]
            rows.append({"method": method, "seq": seq, "batch": batch, "ckpt": ckpt, "predicted_mib": round(pred, 1),
                         "measured_mib": round(m["peak_mib"], 1), "error_pct": round(err, 1), **m,
                         "components_mib": {k: round(v / MIB, 1) for k, v in est.rows()}})
            print(f"{method:<7}{seq:>6}{batch:>6}{'yes' if ckpt else 'no':>6}{pred:>10.0f}{m['peak_mib']:>10.0f}"
                  f"{err:>+7.1f}%  {est.peak_phase:<16}{m['load_mib']:>9.0f}{est.backward_peak / MIB:>11.0f}"
                  f"{max(m['step_s']):>9.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
