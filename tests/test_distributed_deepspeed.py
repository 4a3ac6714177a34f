"""DeepSpeed ZeRO-2 and ZeRO-3 through accelerate: 2 processes on CPU (gloo) end where 1 process does.

Launched as a user launches it: ``accelerate launch --config_file examples/distributed/zero{2,3}_1x8.yaml`` (2
processes here, mixed precision off so that fp32 can be compared) running ``tuneforge train CONFIG`` unchanged.
No test-only switch: on a machine without GPUs accelerate hands DeepSpeed gloo, and DeepSpeed's CPU accelerator
runs its ZeRO optimizer as on GPUs. One process with 2 accumulation steps and two with one each see the same 8
examples per optimizer step: per-step losses, gradient norms, learning rates and final weights must agree.
"""

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from _distributed_helpers import (
    assert_resumed_bitwise,
    assert_same_steps,
    assert_same_weights,
    crash_env,
    errors,
    hook_env,
    metrics,
    run,
    run_config,
)

pytest.importorskip("deepspeed")     # the [test] extra installs it; `pip install 'tuneforge[deepspeed]'` for users

REPO = Path(__file__).resolve().parent.parent
ZERO = {stage: REPO / "examples" / "distributed" / f"zero{stage}_1x8.yaml" for stage in (2, 3)}


def _zero(stage, config, tmp_path, out, *extra, check=True, env=None, launch_args=()):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ZERO[stage]),
              "--num_processes", "2", "--mixed_precision", "no", *launch_args, "-m", "tuneforge.cli", "train",
              str(config), "--set", f"output_dir={out}", *extra]
    return run(launch, tmp_path, check=check, env=env)


def _launcher(stage):
    return lambda config, cwd, out: _zero(stage, config, cwd, out)


# PLAIN serves the equality and the resume test (checkpoints every step; DeepSpeed's partitioned state saved
# mid-run); the one-process references are shared with DDP and FSDP2 where the settings are the same, and each
# 2-process run is trained once (conftest's shared_runs)
PLAIN = {"save_every": 1}
CASES = [
    (2, PLAIN),
    (3, PLAIN),
    # 2 micro-batches per process (the engine reduces at the last), activations recomputed in backward, the
    # chunked loss (ZeRO-2 keeps the LM head whole on each process)
    (2, {"save_every": 2, "gradient_checkpointing": True, "chunked_loss": "on", "gradient_accumulation_steps": 2,
         "batch_size": 2}),
    # ZeRO-3 gathers each layer again for the recomputation in backward
    (3, {"save_every": 2, "gradient_checkpointing": True, "gradient_accumulation_steps": 2, "batch_size": 2}),
]


@pytest.mark.timeout(900)
@pytest.mark.parametrize(("stage", "settings"), CASES,
                         ids=["zero2", "zero3", "zero2-checkpointing-chunked-accumulation",
                              "zero3-checkpointing-accumulation"])
def test_deepspeed_lora_equals_one_process(shared_runs, stage, settings):
    one_dir = shared_runs.one_process(**settings)
    two_dir, stderr = shared_runs.launched(f"zero{stage}", _launcher(stage), **settings)
    accumulation = settings.get("gradient_accumulation_steps", 1)
    assert f"DeepSpeed ZeRO-{stage} over 2 processes: micro-batch {settings.get('batch_size', 4)}, " \
           f"{accumulation} accumulation steps" in stderr                               # the run really was DeepSpeed

    one, two = metrics(one_dir), metrics(two_dir)
    worst = assert_same_steps(one, two)          # the grad norm: the engine's, of the whole reduced gradient
    wa = load_file(str(one_dir / "adapter_model.safetensors"))
    wb = load_file(str(two_dir / "adapter_model.safetensors"))
    worst["weights"] = assert_same_weights(wa, wb, 1e-6)
    print(f"ZeRO-{stage} {settings}: largest differences {worst}")
    record = json.loads((two_dir / "run.json").read_text())
    assert record["processes"] == 2 and record["steps"] == 5
    assert len(two) == 5                                               # only the main process wrote
    # the checkpoint: the trained tensors whole (gathered under ZeRO-3), DeepSpeed's partitions beside them
    last_one = sorted((one_dir / "checkpoints").glob("last-*"))[-1]
    last_two = sorted((two_dir / "checkpoints").glob("last-*"))[-1]
    ta, tb = load_file(str(last_one / "trainable.safetensors")), load_file(str(last_two / "trainable.safetensors"))
    assert_same_weights(ta, tb, 1e-6)
    parts = sorted(p.name for p in (last_two / "deepspeed" / "zero").glob("*optim_states.pt"))
    assert len(parts) == 2, parts                                      # one optimizer partition per process


# ZeRO-3: in the fresh-clone run of 2026-12-04 the resumed run logged every step's loss, lr and grad norm bitwise
# as the uninterrupted run, but its saved adapter differed; it fails the same way at 0659478 (serving changes only
# on top of 02bcab0, whose CI passed), so not from this change. Being investigated: not strict, so a pass shows.
@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_deepspeed_resume_after_a_crash_is_the_uninterrupted_run(shared_runs, tmp_path, stage):
    path = shared_runs.config(**PLAIN)
    uninterrupted, _ = shared_runs.launched(f"zero{stage}", _launcher(stage), **PLAIN)
    proc = _zero(stage, path, tmp_path, "crashed", check=False, env=crash_env(tmp_path))
    assert proc.returncode != 0
    assert [r["step"] for r in metrics(tmp_path / "crashed")] == [1, 2, 3]
    _zero(stage, path, tmp_path, "crashed", "--resume")

    assert_resumed_bitwise(uninterrupted, tmp_path / "crashed")

    # resuming that checkpoint with another engine is refused in one line, before any step
    other = 3 if stage == 2 else 2
    proc = _zero(other, path, tmp_path, "crashed", "--resume", check=False)
    found = errors(proc)
    assert found and all(f"was saved with DeepSpeed ZeRO-{stage} on 2 processes; this run has DeepSpeed "
                          f"ZeRO-{other} on 2 processes" in line for line in found), proc.stderr[-3000:]


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("stage", "settings", "launch_args", "message"), [
    (2, {"method": "full"}, (), "error: method full with DeepSpeed is not tested yet (DeepSpeed trains lora); "
                                "train it with DDP (distributed_type MULTI_GPU) or FSDP2"),
    (2, {"method": "qlora"}, (), "error: method qlora with DeepSpeed is not tested yet"),
    (2, {"task": "preference"}, (), "error: task preference with DeepSpeed is not tested yet"),
    (3, {"chunked_loss": "on"}, (), "error: chunked_loss: on with DeepSpeed ZeRO-3: the chunked loss uses the LM "
                                    "head's weight outside the head's forward"),
    (3, {"lora": {"r": 4, "use_dora": True}}, (), "error: lora.use_dora with DeepSpeed ZeRO-3 is not tested yet"),
    (2, {}, ("--zero_stage", "1"), "error: DeepSpeed ZeRO stage 1 is not tested with tuneforge train"),
    (2, {}, ("--offload_optimizer_device", "cpu"), "error: DeepSpeed offload_optimizer to cpu is not tested"),
], ids=["full", "qlora", "preference", "zero3-chunked-on", "zero3-dora", "stage1", "offload"])
def test_deepspeed_refuses_what_is_not_tested_in_one_line(tiny_model_dir, tmp_path, stage, settings, launch_args,
                                                          message):
    path = run_config(tmp_path, tiny_model_dir, max_steps=1, **settings)
    proc = _zero(stage, path, tmp_path, "refused", check=False, launch_args=launch_args)
    assert proc.returncode != 0
    found = errors(proc)
    assert found and all(line.startswith(message) for line in found), proc.stderr[-3000:]
    assert re.search(r"exitcode\s*:\s*2\b", proc.stderr)       # each process exited 2 (the CLI's ConfigError)
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()


def test_a_deepspeed_config_with_its_own_optimizer_is_refused(tiny_model_dir, tmp_path):
    """tuneforge builds AdamW and the schedule from the run config: a DeepSpeed JSON naming its own is refused."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
                              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}))
    launch = tmp_path / "accelerate.yaml"
    launch.write_text(yaml.safe_dump({"distributed_type": "DEEPSPEED", "num_machines": 1, "num_processes": 2,
                                      "deepspeed_config": {"deepspeed_config_file": str(ds)}}))
    path = run_config(tmp_path, tiny_model_dir, max_steps=1)
    proc = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch), "-m",
                 "tuneforge.cli", "train", str(path), "--set", "output_dir=refused"], tmp_path, check=False)
    found = errors(proc)
    assert found and all(line.startswith('error: the DeepSpeed config has its own "optimizer" section: tuneforge '
                                          "builds AdamW")
                          for line in found), proc.stderr[-3000:]


# every micro-batch of optimizer step 2 gets a NaN loss, on every process (as an overflow would)
POISON_HOOK = """
import os
if os.environ.get("TEST_NAN_AT_STEP"):
    from tuneforge.training import trainer
    from tuneforge.training.objectives.causal_lm import CausalLMObjective
    _step, _loss = trainer.TrainingRecipe.train_step, CausalLMObjective.loss
    poisoned = {"on": False}
    def train_step(self):
        poisoned["on"] = self.state.step + 1 == int(os.environ["TEST_NAN_AT_STEP"])
        return _step(self)
    def loss(self, model, batch, config):
        out = _loss(self, model, batch, config)
        if poisoned["on"]:
            out.loss_sum = out.loss_sum * float("nan")
        return out
    trainer.TrainingRecipe.train_step, CausalLMObjective.loss = train_step, loss
"""


@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_a_nan_step_is_skipped_by_the_engine_as_on_one_process(shared_runs, tmp_path, stage):
    """on_nonfinite: skip. DeepSpeed's engine skips a step whose gradients are not finite; the loop reports it
    as its own, and the run ends where one process (which skips it itself; one run for both stages) ends."""
    settings = {"on_nonfinite": "skip", "eval_every": 10}
    poison = (POISON_HOOK, {"TEST_NAN_AT_STEP": "2"})
    one_dir = shared_runs.one_process(hook=poison, **settings)
    proc = _zero(stage, shared_runs.config(**settings), tmp_path, "two", env=hook_env(tmp_path, poison[0], **poison[1]))
    assert "step 2: loss nan" in proc.stderr and "skipped (1 of at most 3)" in proc.stderr
    one, two = metrics(one_dir), metrics(tmp_path / "two")
    assert [r.get("skipped", False) for r in two] == [r.get("skipped", False) for r in one] == \
        [False, True, False, False, False]
    assert [r["lr"] for r in one] == [r["lr"] for r in two]
    for a, b in zip(one, two, strict=True):
        if a["loss"] is not None:
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    wa = load_file(str(one_dir / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in wb.values())
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6
