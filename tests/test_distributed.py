"""Several processes through accelerate: 2-process DDP on CPU (gloo) ends where 1 process does.

Launched with ``torchrun`` exactly as a user would (``tuneforge train CONFIG`` unchanged). One process with
2 accumulation steps and two processes with one each see the same 8 examples per optimizer step, so the
per-step losses, the learning rates and the final weights must agree (to float reduction order).
"""

import json
import os
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from _distributed_helpers import assert_same_steps, assert_same_weights, crash_env, metrics, run
from conftest import write_jsonl

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


# one config for the equality and the resume test (checkpoints every step, for the resume): its one-process
# reference is shared with FSDP2 and DeepSpeed, its 2-process run trained once (conftest's shared_runs)
PLAIN = {"save_every": 1}


def _ddp(config, cwd, out, *extra, check=True, env=None):
    return run([*TORCHRUN, "-m", "tuneforge.cli", "train", str(config), "--set", f"output_dir={out}", *extra], cwd,
               check=check, env=env)


@pytest.mark.timeout(900)
def test_two_process_ddp_equals_one_process(shared_runs):
    one_dir, (two_dir, _) = shared_runs.one_process(**PLAIN), shared_runs.launched("ddp", _ddp, **PLAIN)

    one, two = metrics(one_dir), metrics(two_dir)
    assert_same_steps(one, two)
    assert_same_weights(load_file(str(one_dir / "adapter_model.safetensors")),
                        load_file(str(two_dir / "adapter_model.safetensors")), 1e-6)
    record = json.loads((two_dir / "run.json").read_text())
    assert record["processes"] == 2 and record["steps"] == 5
    # only the main process wrote: one metrics row per step, no duplicates
    assert len(two) == 5


@pytest.mark.timeout(900)
def test_two_process_ddp_equals_one_process_under_bf16_mixed(shared_runs):
    """The precision seam under DDP (training/precision.py): autocast inside the wrapped forward, the same bf16
    micro-batches as one process, fp32 gradients reduced."""
    settings = {"precision": "bf16-mixed"}
    one_dir, (two_dir, _) = shared_runs.one_process(**settings), shared_runs.launched("ddp", _ddp, **settings)
    assert_same_steps(metrics(one_dir), metrics(two_dir))
    assert_same_weights(load_file(str(one_dir / "adapter_model.safetensors")),
                        load_file(str(two_dir / "adapter_model.safetensors")), 1e-5)
    assert json.loads((two_dir / "run.json").read_text())["precision"]["autocast_dtype"] == "bf16"


def test_fsdp_without_gpus_is_refused_not_run_as_independent_processes(tiny_model_dir, tmp_path):
    """On CPUs accelerate runs an FSDP request as DDP (device cpu) or as independent processes (device auto)."""
    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Ticket: parcel late", "completion": "shipping"}] * 8)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "device": "cpu", "data": {"train": str(data)},
                                    "max_steps": 1, "progress": False}))
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "tuneforge.cli", "train", str(path), "--set", "output_dir=fsdp"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "error: accelerate is set up for FSDP: tuneforge train runs DDP" in proc.stderr   # torchrun adds a trace
    assert not (tmp_path / "fsdp" / "metrics.jsonl").exists()


@pytest.mark.timeout(900)
def test_a_ddp_run_resumes_on_fewer_processes_with_the_same_global_batch(shared_runs, tmp_path):
    """Every process draws the step's accumulation x processes micro-batches from one seeded stream, so the data
    order depends on their product only: a 2-process run stopped after step 3 resumes on 1 process with
    gradient_accumulation_steps 2 and ends where the uninterrupted 2-process run ends. With the product changed,
    --resume is refused in one line naming it."""
    path = shared_runs.config(**PLAIN)
    uninterrupted, _ = shared_runs.launched("ddp", _ddp, **PLAIN)
    one = [sys.executable, "-m", "tuneforge.cli", "train", str(path)]
    assert _ddp(path, tmp_path, "crashed", check=False, env=crash_env(tmp_path)).returncode != 0

    refused = run([*one, "--set", "output_dir=crashed", "--resume"], tmp_path, check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: --resume: the run in crashed was trained with different gradient_accumulation_steps x processes "
        "(2 then, 1 now); resume with the same config and data, or train into a new output_dir")
    run([*one, "--set", "output_dir=crashed", "--set", "gradient_accumulation_steps=2", "--resume"], tmp_path)

    a, b = metrics(uninterrupted), metrics(tmp_path / "crashed")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for ra, rb in zip(a, b, strict=True):
        assert ra["lr"] == rb["lr"] and ra["tokens"] == rb["tokens"]
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
    wa = load_file(str(uninterrupted / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "crashed" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6
