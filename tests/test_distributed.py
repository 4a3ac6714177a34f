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

from conftest import write_jsonl


def _rows(n):
    return [{"prompt": f"Ticket {i}: {['charged twice', 'parcel late', 'cannot sign in'][i % 3]}",
             "completion": ["billing", "shipping", "login"][i % 3]} for i in range(n)]


def _run(cmd, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.timeout(900)
def test_two_process_ddp_equals_one_process(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", _rows(40))
    config = {"model": str(tiny_model_dir), "device": "cpu", "threads": 1, "seed": 3,
              "data": {"train": str(data), "val_fraction": 0.2}, "batch_size": 4, "max_steps": 5, "eval_every": 2,
              "learning_rate": 5e-3, "warmup_steps": 1, "keep_best": False, "progress": False,
              "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    _run([sys.executable, "-m", "tuneforge.cli", "train", str(path), "--set", "output_dir=one",
          "--set", "gradient_accumulation_steps=2"], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "-m", "tuneforge.cli", "train", str(path), "--set", "output_dir=two"], tmp_path)

    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4, 5]
    assert [r["lr"] for r in one] == [r["lr"] for r in two]            # the scheduler steps once per step
    for a, b in zip(one, two, strict=True):
        assert a["trained_tokens"] == b["trained_tokens"] and a["tokens"] == b["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        # AdamW hides a wrongly scaled gradient; the logged norm does not (DDP averages, we want the step's sum)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        if "eval_loss" in a:
            assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=1e-5)
    wa = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and len(wa) > 0
    for name in wa:
        assert (wa[name] - wb[name]).abs().max().item() < 1e-6, name
    record = json.loads((tmp_path / "two" / "run.json").read_text())
    assert record["processes"] == 2 and record["steps"] == 5
    # only the main process wrote: one metrics row per step, no duplicates
    assert len(two) == 5


def test_fsdp_without_gpus_is_refused_not_run_as_independent_processes(tiny_model_dir, tmp_path):
    """On CPUs accelerate runs an FSDP request as DDP (device cpu) or as independent processes (device auto)."""
    data = write_jsonl(tmp_path / "train.jsonl", _rows(8))
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


# a process that saves its step-3 checkpoint then stops, as a crash would (imported at start via PYTHONPATH)
CRASH_HOOK = """
import os
if os.environ.get("TEST_CRASH_AFTER_STEP") and os.environ.get("LOCAL_RANK"):     # the training processes only
    from tuneforge.training import trainer
    _save = trainer.TrainingRecipe.save_checkpoint
    def _save_then_crash(self, kind, with_state=True):
        path = _save(self, kind, with_state)
        if kind == "last" and self.state.step == int(os.environ["TEST_CRASH_AFTER_STEP"]):
            raise SystemExit(3)
        return path
    trainer.TrainingRecipe.save_checkpoint = _save_then_crash
"""


@pytest.mark.timeout(900)
def test_a_ddp_run_resumes_on_fewer_processes_with_the_same_global_batch(tiny_model_dir, tmp_path):
    """Every process draws the step's accumulation x processes micro-batches from one seeded stream, so the data
    order depends on their product only: a 2-process run stopped after step 3 resumes on 1 process with
    gradient_accumulation_steps 2 and ends where the uninterrupted 2-process run ends. With the product changed,
    --resume is refused in one line naming it."""
    data = write_jsonl(tmp_path / "train.jsonl", _rows(40))
    config = {"model": str(tiny_model_dir), "device": "cpu", "threads": 1, "seed": 3,
              "data": {"train": str(data), "val_fraction": 0.2}, "batch_size": 4, "max_steps": 5, "eval_every": 2,
              "learning_rate": 5e-3, "warmup_steps": 1, "keep_best": False, "progress": False, "save_every": 1,
              "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "tuneforge.cli", "train", str(path)]
    one = [sys.executable, "-m", "tuneforge.cli", "train", str(path)]
    _run([*ddp, "--set", "output_dir=uninterrupted"], tmp_path)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CRASH_HOOK)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", TEST_CRASH_AFTER_STEP="3",
               PYTHONPATH=os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    crashed = subprocess.run([*ddp, "--set", "output_dir=crashed"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
    assert crashed.returncode != 0

    refused = subprocess.run([*one, "--set", "output_dir=crashed", "--resume"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: --resume: the run in crashed was trained with different gradient_accumulation_steps x processes "
        "(2 then, 1 now); resume with the same config and data, or train into a new output_dir")
    _run([*one, "--set", "output_dir=crashed", "--set", "gradient_accumulation_steps=2", "--resume"], tmp_path)

    a = [json.loads(x) for x in (tmp_path / "uninterrupted" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for ra, rb in zip(a, b, strict=True):
        assert ra["lr"] == rb["lr"] and ra["tokens"] == rb["tokens"]
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
    wa = load_file(str(tmp_path / "uninterrupted" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "crashed" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6
