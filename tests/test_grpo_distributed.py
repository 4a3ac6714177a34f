"""GRPO on 2 processes (DDP, gloo on CPU) ends where 1 process does.

Launched with ``torchrun`` as a user would. Two processes with one micro-batch each and one process with two
accumulation steps draw the same micro-batches; rollouts are seeded by ``(epoch, micro-batch)``, so each process
samples exactly what the one process samples for that micro-batch, and nothing else (the loop asks each process for
its own micro-batches' normaliser: ``Objective.local_normaliser``). The per-step losses, rewards, the normaliser
(``loss_type: dapo``: trained tokens, summed over the processes), the rollout metrics (``min``/``max`` lengths
reduced as extremes), validation and the final weights must agree (to float reduction order), and samples.jsonl must
hold the same rows in the same order. The config also runs ``num_iterations: 2`` (blocks of a step's micro-batches,
each process keeping its own rollouts; a 2-process run stopped inside a block resumes on 1 process from both
processes' saved rollouts) and DAPO's refill (rounds that differ between processes: no collective inside a rollout).
A reward function that records how many completions each process scored proves that no process samples another's
micro-batches, in training or in validation.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from _distributed_helpers import CRASH_HOOK, assert_same_weights, metrics, run
from conftest import write_jsonl
from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.training.strategies import FSDP2, DeepSpeed

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
STEPS = 4

REWARDS = '''
import os


def even_share(prompts, completions, completion_ids, **kw):
    """The share of even token ids of each completion (it varies between sampled completions); each call's number of
    completions appended to calls.<RANK>.txt in $GRPO_TEST_CALLS (which process scored how many)."""
    folder = os.environ.get("GRPO_TEST_CALLS")
    if folder:
        with open(os.path.join(folder, f"calls.{os.environ.get('RANK', '0')}.txt"), "a") as f:
            f.write(f"{len(completions)}\\n")
    return [sum(t % 2 == 0 for t in ids) / len(ids) for ids in completion_ids]
'''


def _config(root: Path, model: Path) -> dict:
    prompts = [{"prompt": f"Say something about item {i}."} for i in range(20)]
    return {"model": str(model), "task": "grpo", "device": "cpu", "threads": 1, "seed": 5,
            "data": {"train": str(write_jsonl(root / "train.jsonl", prompts)), "val_fraction": 0.2},
            "batch_size": 2, "max_steps": STEPS, "eval_every": 2, "eval_batch_size": 2, "save_every": 1,
            "learning_rate": 3e-2, "warmup_ratio": 0.0, "lr_scheduler": "constant", "keep_best": False,
            "on_divergence": "off", "progress": False, "eval_share": None,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "grpo": {"num_generations": 4, "max_completion_length": 8, "temperature": 0.7, "loss_type": "dapo",
                     "num_iterations": 2, "max_refill_rounds": 1, "log_samples": 4,
                     "rewards": [{"name": "grpo_ddp_rewards:even_share"}]}}


class Runs:
    """The config (dapo, num_iterations 2, refill, validation, a checkpoint every step) and its runs, each trained
    once per module: ``train(name, processes)``."""

    def __init__(self, root: Path, model: Path):
        self.root = root
        (root / "rewards").mkdir()
        (root / "rewards" / "grpo_ddp_rewards.py").write_text(REWARDS)
        (root / "hook").mkdir()
        (root / "hook" / "sitecustomize.py").write_text(CRASH_HOOK)
        self.path = root / "c.yaml"
        self.path.write_text(yaml.safe_dump(_config(root, model)))

    def env(self, name: str, crash_after: int | None = None) -> dict[str, str]:
        calls = self.root / f"calls-{name}"
        calls.mkdir(exist_ok=True)
        folders = [str(self.root / "rewards"), *([str(self.root / "hook")] if crash_after else [])]
        return {"GRPO_TEST_CALLS": str(calls),
                "PYTHONPATH": os.pathsep.join([*folders, os.environ.get("PYTHONPATH", "")]),
                **({"TEST_CRASH_AFTER_STEP": str(crash_after)} if crash_after else {})}

    def train(self, name: str, processes: int, *extra: str, check: bool = True, crash_after: int | None = None):
        out = self.root / name
        if (out / "run.json").is_file() and not extra:
            return out
        launcher = TORCHRUN if processes == 2 else [sys.executable]
        accumulation = 2 // processes
        run([*launcher, "-m", "tuneforge.cli", "train", str(self.path), "--set", f"output_dir={out}",
             "--set", f"gradient_accumulation_steps={accumulation}", *extra], self.root, check=check,
            env=self.env(name, crash_after))
        return out

    def calls(self, name: str) -> dict[str, int]:
        """Completions each process scored (training and validation), by rank."""
        folder = self.root / f"calls-{name}"
        return {p.name.split(".")[1]: sum(int(x) for x in p.read_text().split()) for p in folder.glob("calls.*.txt")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    return Runs(tmp_path_factory.mktemp("grpo-ddp"), tiny_model_dir)


def _samples(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def _assert_same_steps(one: list[dict], two: list[dict]) -> None:
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two, strict=True):
        # the normaliser (dapo: trained tokens, all processes') and every rollout metric as one process has them
        for key in ("trained_tokens", "tokens", "completions/min_length", "completions/max_length",
                    "num_gen_batches", "refill/prompts", "refill/missing_groups"):
            assert a[key] == b[key], (key, a, b)
        for key in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length",
                    "completions/clipped_ratio", "clip_ratio/region_mean"):
            assert b[key] == pytest.approx(a[key], abs=1e-9), (key, a, b)
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)   # a wrongly scaled gradient shows here
        assert ("eval_reward" in a) == ("eval_reward" in b)
        if "eval_reward" in a:
            assert b["eval_reward"] == pytest.approx(a["eval_reward"], abs=1e-9)


@pytest.mark.timeout(600)
def test_two_process_grpo_equals_one_process(runs):
    one, two = runs.train("one", 1), runs.train("two", 2)
    a, b = metrics(one), metrics(two)
    _assert_same_steps(a, b)
    assert a[0]["reward"] != a[2]["reward"] and a[2]["reward"] == a[3]["reward"]     # blocks of 2 steps
    assert_same_weights(load_file(str(one / "adapter_model.safetensors")),
                        load_file(str(two / "adapter_model.safetensors")), 1e-6)
    assert json.loads((two / "run.json").read_text())["processes"] == 2
    assert _samples(one) == _samples(two) and len(_samples(one)) >= 16     # 4 rollouts x 4 rows: same, same order
    # every completion scored once over the processes, and each process scored only its own micro-batches' and
    # its share of validation (a process sampling all of them scores as many as one process)
    calls_one, calls_two = runs.calls("one"), runs.calls("two")
    assert set(calls_two) == {"0", "1"}
    assert calls_two["0"] + calls_two["1"] == calls_one["0"]
    assert 0 < calls_two["0"] < calls_one["0"] and 0 < calls_two["1"] < calls_one["0"]


@pytest.mark.timeout(600)
def test_a_two_process_grpo_run_resumes_on_one_process_inside_a_block(runs):
    """Stopped after step 3 (the first step of the second num_iterations block), each process's checkpoint file
    holds its own micro-batch's rollout; one process with 2 accumulation steps resumes from both files and trains
    step 4 on them, ending where the uninterrupted 2-process run ends (its samples.jsonl too)."""
    whole = runs.train("two", 2)
    cut = runs.train("cut", 2, check=False, crash_after=3)
    assert [r["step"] for r in metrics(cut)] == [1, 2, 3]
    last = json.loads((cut / "checkpoints" / "last.json").read_text())["folder"]
    checkpoint = cut / "checkpoints" / last
    assert (checkpoint / "grpo_rollouts.safetensors").is_file()
    assert (checkpoint / "grpo_rollouts.rank1.safetensors").is_file()
    resumed = runs.train("cut", 1, "--resume")
    _assert_same_steps(metrics(whole), metrics(resumed))
    assert_same_weights(load_file(str(whole / "adapter_model.safetensors")),
                        load_file(str(resumed / "adapter_model.safetensors")), 1e-6)
    assert _samples(whole) == _samples(resumed)


@pytest.mark.parametrize("engine", [FSDP2(None, 0, 2), DeepSpeed(None, 0, 2, 2)], ids=["fsdp2", "deepspeed"])
def test_fsdp2_and_deepspeed_refuse_grpo_naming_ddp(engine, tiny_model_dir, tmp_path):
    config = load_config(data=_config(tmp_path, tiny_model_dir))
    with pytest.raises(ConfigError, match=r"^task grpo with (FSDP2|DeepSpeed) is not tested yet .*; train it with "
                                          r"DDP \(distributed_type MULTI_GPU\)$"):
        engine.check(config)
