"""What every recipe's child process measures, and how the parent turns it into one table row.

This module imports only the standard library and torch at the top (transformers lazily), because it is
also imported by the recipes that run inside the competitors' own virtual environments.

A child records, for each optimizer step, the wall-clock time at which the step ended (seconds since
training started), the step's real tokens (every token that is not padding), trained tokens (tokens
that carry a loss, i.e. labels that survive the causal shift), examples, and loss. The parent derives:

* ``s_per_step``: mean duration of steps 2..N (step 1 pays one-off costs: allocator warm-up, lazy init);
  ``first_step_s``: step 1 alone. A step's duration is the time between consecutive step ends, so it
  includes fetching and collating the batch.
* ``real_tok_s`` / ``trained_tok_s``: tokens of steps 2..N over their total duration.
* ``peak_mem``: peak resident set (``VmHWM``) of the whole child on CPU; on a GPU the child's
  ``torch.cuda.max_memory_allocated`` (tensors; ``peak_reserved_mib``: ``max_memory_reserved``, what the caching
  allocator held, closer to what ``nvidia-smi`` shows).
* ``mfu``: model FLOPs per second over the peak FLOP/s. The parent passes the FLOPs per real token and the peak
  (``flops.py``: ``4 N_mm + 12 L d_attn S`` for LoRA, PaLM's ``6 N_mm + ...`` as ``mfu_6n``; the datasheet's dense
  bf16 rate on a known GPU, else the matmul rate measured here). Without them (old callers) the convention is
  ``4 * N * real_tokens`` with ``N`` every base parameter and no attention term. Padding is never counted, so work
  wasted on pads or on an LM head over non-target positions lowers MFU; for every recipe on the same data the
  FLOPs per real token are the same, so MFU ratios equal throughput ratios.
* ``template``: the chat template the recipe rendered with, as it was given to it; ``rendered``: the examples
  and tokens of the bench data as the recipe tokenized it (each example cut at ``max_length``), checked by the
  parent against one reference rendering (``templates.py``) so every row trains on the same token sequences.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch

LAST_STEPS_FOR_LOSS = 3


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    torch.set_flush_denormal(True)  # denormals make CPU matmuls ~20x slower; every recipe gets the same


def peak_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def matmul_peak_gflops(device: str, dtype: torch.dtype, n: int | None = None, seconds: float = 2.0) -> float:
    """Best GFLOP/s of a large square ``n x n`` matmul (``2 n^3`` FLOPs) on ``device`` in ``dtype``."""
    n = n or (8192 if device.startswith("cuda") else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, deadline = 0.0, time.time() + seconds
    for i in range(100):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        if i:  # the first is warm-up
            best = max(best, 2 * n ** 3 / dt / 1e9)
        if i >= 3 and time.time() > deadline:
            break
    return best


class StepLog:
    """Per-step records of one child; ``start()`` when training starts, ``end_step(...)`` after each step."""

    def __init__(self) -> None:
        self.t0: float | None = None
        self.steps: list[dict] = []

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def end_step(self, tokens: int, trained: int, examples: int, loss: float | None) -> None:
        if self.t0 is None:
            self.start()
        self.steps.append({"step": len(self.steps) + 1, "end_s": round(time.perf_counter() - self.t0, 4),
                           "tokens": int(tokens), "trained_tokens": int(trained), "examples": int(examples),
                           "loss": None if loss is None else round(float(loss), 5)})


def count_batch(inputs: dict) -> tuple[int, int, int]:
    """``(real tokens, trained tokens, examples)`` of a transformers-style batch.

    Real tokens: non-zero attention-mask entries, rows of a 4-D block mask that see any key (LLaMA-Factory's
    neat packing), else every input id (padding-free rows). Trained: labels other than -100
    after the shift the loss applies (``labels[..., 1:]``). Examples: rows, or position-id restarts in a
    packed row.
    """
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    labels = inputs.get("labels")
    trained = int((labels[..., 1:] != -100).sum()) if labels is not None else 0
    pos = inputs.get("position_ids")
    if mask is not None and mask.dim() == 4:  # (B, 1, T, T) block-diagonal mask (LLaMA-Factory neat packing)
        allowed = (mask[:, 0] == 0) if mask.is_floating_point() else mask[:, 0].bool()
        rows = allowed.any(-1)  # padding rows attend to nothing
        first = allowed.int().argmax(-1)  # a row whose first visible key is itself starts a sequence
        starts = (first == torch.arange(mask.shape[-1], device=mask.device)) & rows
        return int(rows.sum()), trained, int(starts.sum())
    real = int((mask != 0).sum()) if mask is not None and mask.dim() == 2 else int(ids.numel())
    if pos is not None and ids.shape[0] == 1:
        examples = int((pos == 0).sum())
    elif mask is not None and mask.dim() == 2 and int(mask.max()) > 1:  # neat packing: 1, 2, 3 per sequence
        examples = int(sum(int(row.max()) for row in mask))
    else:
        examples = int(ids.shape[0])
    return real, trained, examples


def trainer_probe(log: StepLog):
    """A transformers ``TrainerCallback`` that fills ``log``, and the patch that counts each batch's tokens.

    ``Trainer.training_step`` is wrapped (measurement only, nothing changes) to add up the tokens of the
    micro-batches of a step (the original is put back when training ends); ``on_log`` (``logging_steps=1``)
    gives the step's loss; ``on_step_end`` closes the step.
    """
    from transformers import Trainer, TrainerCallback

    pending = {"tokens": 0, "trained": 0, "examples": 0, "loss": None}
    original = Trainer.training_step

    def training_step(self, model, inputs, *args, **kwargs):
        real, trained, examples = count_batch(inputs)
        pending["tokens"] += real
        pending["trained"] += trained
        pending["examples"] += examples
        return original(self, model, inputs, *args, **kwargs)

    Trainer.training_step = training_step

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            log.start()

        def on_train_end(self, args, state, control, **kwargs):
            Trainer.training_step = original

        def on_step_end(self, args, state, control, **kwargs):
            log.end_step(pending["tokens"], pending["trained"], pending["examples"], None)
            pending.update(tokens=0, trained=0, examples=0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and log.steps and log.steps[-1]["loss"] is None:
                log.steps[-1]["loss"] = round(float(logs["loss"]), 5)

    return Probe()


def count_params(model: torch.nn.Module) -> int:
    """Parameters of the base model, tied weights once (peft's LoRA matrices excluded)."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if "lora_" in name or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def write_result(path: str | Path, recipe: str, log: StepLog, device: str, n_params: int, versions: dict,
                 **extra) -> None:
    out = {"recipe": recipe, "device": device, "n_params": n_params, "steps": log.steps,
           "peak_mem_bytes": peak_memory_bytes(device), "versions": versions, "pid": os.getpid(), **extra}
    if device.startswith("cuda"):
        out.update(peak_reserved_bytes=int(torch.cuda.max_memory_reserved()), gpu=torch.cuda.get_device_name())
    Path(path).write_text(json.dumps(out, indent=1))


def versions_of(*dists: str) -> dict[str, str | None]:
    import importlib.metadata as md

    out = {}
    for d in dists:
        try:
            out[d] = md.version(d)
        except md.PackageNotFoundError:
            out[d] = None
    return out


def summarize(result: dict, peak_gflops: float, flops_per_token: float | None = None,
              flops_per_token_6n: float | None = None) -> dict:
    """One table row from a child's result (see the module docstring for the definitions)."""
    steps = result["steps"]
    if len(steps) < 2:
        raise ValueError(f"{result['recipe']}: need at least 2 steps to exclude the warm-up step, got {len(steps)}")
    rest = steps[1:]
    dt = steps[-1]["end_s"] - steps[0]["end_s"]
    tokens = sum(s["tokens"] for s in rest)
    trained = sum(s["trained_tokens"] for s in rest)
    losses = [s["loss"] for s in steps if s["loss"] is not None]
    fpt = flops_per_token if flops_per_token is not None else 4 * result["n_params"]
    flops_per_s = fpt * tokens / dt
    return {
        "recipe": result["recipe"],
        "versions": result.get("versions", {}),
        "steps": len(steps),
        "examples_per_step": round(sum(s["examples"] for s in steps) / len(steps), 2),
        "real_tokens_per_step": round(sum(s["tokens"] for s in steps) / len(steps), 1),
        "real_tok_s": round(tokens / dt, 1),
        "trained_tok_s": round(trained / dt, 1),
        "s_per_step": round(dt / len(rest), 3),
        "s_per_step_median": round(statistics.median(b["end_s"] - a["end_s"] for a, b in zip(steps, rest)), 3),
        "first_step_s": round(steps[0]["end_s"], 3),
        "peak_mem_mib": round(result["peak_mem_bytes"] / 2 ** 20, 1),
        "mfu": round(flops_per_s / (peak_gflops * 1e9), 6),
        "mfu_6n": (round(flops_per_token_6n * tokens / dt / (peak_gflops * 1e9), 6)
                   if flops_per_token_6n is not None else None),
        "flops_per_token": fpt,
        "peak_reserved_mib": (round(result["peak_reserved_bytes"] / 2 ** 20, 1)
                              if "peak_reserved_bytes" in result else None),
        "gpu": result.get("gpu"),
        "loss_last": round(sum(losses[-LAST_STEPS_FOR_LOSS:]) / len(losses[-LAST_STEPS_FOR_LOSS:]), 4) if losses else None,
        "loss_curve": losses,
        "notes": result.get("notes", ""),
        "template": result.get("template"),    # the chat template the recipe rendered with, as it was given
        "rendered": result.get("rendered"),    # examples and tokens of the bench data as the recipe tokenized it
    }
