"""FSDP2 through accelerate: 2 processes on CPU (gloo) end where 1 process does.

Launched as a user launches it: ``accelerate launch --config_file examples/distributed/fsdp_1x8.yaml`` (2
processes here, mixed precision off so that fp32 can be compared) running ``tuneforge train CONFIG``
unchanged. accelerate turns FSDP on only on GPUs; the test-only switch ``TUNEFORGE_TEST_FSDP_ON_CPU=1``
(``training/distributed.py``) puts its state into FSDP mode on CPUs with the plugin it builds from the same
``FSDP_*`` environment, so accelerate's ``fsdp2_prepare_model`` and torch's ``fully_shard`` shard the model
as on GPUs. One process with 2 accumulation steps and two with one each see the same 8 examples per
optimizer step: per-step losses, gradient norms, learning rates and final weights must agree.
"""

import json
import re
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from _distributed_helpers import (
    assert_resumed_bitwise,
    assert_same_steps,
    assert_same_weights,
    crash_env,
    errors,
    metrics,
    run,
    run_config,
)

REPO = Path(__file__).resolve().parent.parent
FSDP_CONFIG = REPO / "examples" / "distributed" / "fsdp_1x8.yaml"
FSDP_ON_CPU = {"TUNEFORGE_TEST_FSDP_ON_CPU": "1"}


def _fsdp(config, tmp_path, out, *extra, check=True, env=None, launch_args=()):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
              "--num_processes", "2", "--mixed_precision", "no", *launch_args, "-m", "tuneforge.cli", "train",
              str(config), "--set", f"output_dir={out}", *extra]
    return run(launch, tmp_path, check=check, env={**FSDP_ON_CPU, **(env or {})})


# PLAIN serves the equality and the resume test (checkpoints every step); the configs' one-process references are
# shared with DDP and DeepSpeed, and each 2-process run is trained once (conftest's shared_runs)
PLAIN = {"save_every": 1}
# checkpoints gather the sharded state mid-run; this case also recomputes layers in backward (their shards gathered
# again), runs the LM head outside the model's forward (chunked loss) and accumulates 2 micro-batches per process
# without gradient synchronisation but for the last
CHECKPOINTING = {"save_every": 2, "gradient_checkpointing": True, "chunked_loss": "on",
                 "gradient_accumulation_steps": 2, "batch_size": 2}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("settings", [PLAIN, CHECKPOINTING], ids=["plain", "checkpointing-chunked-loss-accumulation"])
def test_fsdp2_lora_equals_one_process(shared_runs, settings):
    one_dir = shared_runs.one_process(**settings)
    two_dir, stderr = shared_runs.launched("fsdp2", _fsdp, **settings)
    assert "accelerate's FSDP path forced on CPUs" in stderr        # the run really was FSDP2:
    # every parameter a shard (DTensor), one group per decoder layer (2) plus the root
    assert re.search(r"FSDP2: (\d+) of \1 parameter tensors sharded over 2 processes, in 3 groups", stderr)

    one, two = metrics(one_dir), metrics(two_dir)
    worst = assert_same_steps(one, two)
    wa = load_file(str(one_dir / "adapter_model.safetensors"))
    wb = load_file(str(two_dir / "adapter_model.safetensors"))
    worst["weights"] = assert_same_weights(wa, wb, 1e-6)
    print("FSDP2 lora, largest differences:", worst)
    record = json.loads((two_dir / "run.json").read_text())
    assert record["processes"] == 2 and record["steps"] == 5
    assert record["trainable_params"] == json.loads((one_dir / "run.json").read_text())["trainable_params"]
    assert len(two) == 5                          # only the main process wrote
    # the checkpoint holds full (gathered) tensors, the same names and shapes as one process's
    last_one = sorted((one_dir / "checkpoints").glob("last-*"))[-1]
    last_two = sorted((two_dir / "checkpoints").glob("last-*"))[-1]
    ta, tb = load_file(str(last_one / "trainable.safetensors")), load_file(str(last_two / "trainable.safetensors"))
    assert_same_weights(ta, tb, 1e-6)


@pytest.mark.timeout(900)
def test_fsdp2_full_fine_tuning_equals_one_process(shared_runs):
    settings = {"method": "full", "learning_rate": 1e-3}
    one_dir, (two_dir, _) = shared_runs.one_process(**settings), shared_runs.launched("fsdp2", _fsdp, **settings)

    worst = assert_same_steps(metrics(one_dir), metrics(two_dir))
    wa = load_file(str(one_dir / "model.safetensors"))
    wb = load_file(str(two_dir / "model.safetensors"))
    worst["weights"] = assert_same_weights(wa, wb, 1e-5)       # tied LM head saved once, as on one process
    print("FSDP2 full, largest differences:", worst)


@pytest.mark.timeout(900)
def test_fsdp2_resume_after_a_crash_is_the_uninterrupted_run(shared_runs, tmp_path):
    path = shared_runs.config(**PLAIN)
    uninterrupted, _ = shared_runs.launched("fsdp2", _fsdp, **PLAIN)
    proc = _fsdp(path, tmp_path, "crashed", check=False, env=crash_env(tmp_path))
    assert proc.returncode != 0
    assert [r["step"] for r in metrics(tmp_path / "crashed")] == [1, 2, 3]
    _fsdp(path, tmp_path, "crashed", "--resume")

    assert_resumed_bitwise(uninterrupted, tmp_path / "crashed")


def test_fsdp2_refuses_qlora_in_one_line(tiny_model_dir, tmp_path):
    path = run_config(tmp_path, tiny_model_dir, method="qlora", max_steps=1)
    proc = _fsdp(path, tmp_path, "qlora", check=False)
    assert proc.returncode != 0
    found = errors(proc)
    assert found and set(found) == {"error: method qlora with FSDP2: 4-bit weights lose their quantisation state "
                                      "when FSDP2 gathers them; train QLoRA with DDP (distributed_type MULTI_GPU) "
                                      "or on one GPU"}
    assert re.search(r"exitcode\s*:\s*2\b", proc.stderr)       # each process exited 2 (the CLI's ConfigError)
    assert not (tmp_path / "qlora" / "metrics.jsonl").exists()


@pytest.mark.parametrize(("settings", "launch_args", "message"), [
    ({"method": "ia3"}, (), "error: method ia3 with FSDP2 is not tested yet"),
    ({"task": "preference"}, (), "error: task preference with FSDP2 is not tested yet"),
    ({}, ("--fsdp_version", "1"), "error: accelerate is set up for FSDP version 1: tuneforge train runs FSDP2"),
], ids=["other-method", "preference", "fsdp1"])
def test_fsdp_refuses_what_is_not_tested_in_one_line(tiny_model_dir, tmp_path, settings, launch_args, message):
    path = run_config(tmp_path, tiny_model_dir, max_steps=1, **settings)
    proc = _fsdp(path, tmp_path, "refused", check=False, launch_args=launch_args)
    assert proc.returncode != 0
    found = errors(proc)
    assert found and all(line.startswith(message) for line in found), proc.stderr[-3000:]
    assert re.search(r"exitcode\s*:\s*2\b", proc.stderr)
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()
