"""`tuneforge plan --accelerate-config`: the dry run of a multi-device launch, for every example config."""

from pathlib import Path

import pytest

from tuneforge.cli import main
from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.estimate.distributed_plan import engine_of, plan_distributed, read_accelerate_config
from tuneforge.estimate.memory import estimate_memory

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "distributed"


@pytest.fixture(scope="module")
def config():
    return load_config(EXAMPLES / "lora.yaml")


def test_every_example_plans(config):
    plans = {p.stem: plan_distributed(config, read_accelerate_config(p)) for p in sorted(EXAMPLES.glob("*_*.yaml"))}
    assert set(plans) == {"ddp_1x8", "ddp_2x8", "fsdp_1x8", "zero2_1x8", "zero3_1x8"}
    assert {k: (p.engine, p.processes, p.global_batch) for k, p in plans.items()} == {
        "ddp_1x8": ("DDP", 8, 64), "ddp_2x8": ("DDP", 16, 128), "fsdp_1x8": ("FSDP", 8, 64),
        "zero2_1x8": ("ZeRO-2", 8, 64), "zero3_1x8": ("ZeRO-3", 8, 64)}
    one = estimate_memory(config.model, config.method, config.data.max_length, config.batch_size,
                          lora_r=config.lora.r, lora_dropout=config.lora.dropout, dtype="bf16", device="cuda")
    ddp, fsdp = plans["ddp_1x8"], plans["fsdp_1x8"]
    # DDP: a full replica per device plus its gradient buckets; FSDP: 1/8 of the state and two gathered layers
    assert ddp.weights == one.weights and ddp.gradients == 2 * one.gradients
    assert fsdp.optimizer_states == one.optimizer_states // 8
    assert one.weights // 8 < fsdp.weights < one.weights // 2
    assert fsdp.per_device < ddp.per_device and ddp.supported and fsdp.supported       # lora under FSDP2
    # ZeRO-2 partitions gradients and optimizer states, not weights; ZeRO-3 all three
    zero2, zero3 = plans["zero2_1x8"], plans["zero3_1x8"]
    assert zero2.weights == one.weights and zero2.optimizer_states == one.optimizer_states // 8
    assert zero3.weights < zero2.weights and zero3.per_device < zero2.per_device < ddp.per_device
    assert zero2.supported and zero3.supported                                         # lora under DeepSpeed
    full = load_config(EXAMPLES / "lora.yaml")
    full.method = "full"
    assert not plan_distributed(full, read_accelerate_config(EXAMPLES / "zero3_1x8.yaml")).supported


def test_plan_cli_prints_the_dry_run(capsys):
    assert main(["plan", str(EXAMPLES / "lora.yaml"), "--accelerate-config", str(EXAMPLES / "fsdp_1x8.yaml")]) == 0
    out = capsys.readouterr().out
    assert "FSDP" in out and "1 x 8 = 8 processes" in out and "64 examples per optimizer step" in out
    assert "peak per device" in out


def test_not_an_accelerate_config(tmp_path, capsys):
    bad = tmp_path / "x.yaml"
    bad.write_text("model: x\n")
    with pytest.raises(ConfigError, match="not an accelerate config"):
        read_accelerate_config(bad)
    assert main(["plan", str(EXAMPLES / "lora.yaml"), "--accelerate-config", str(bad)]) == 2
    assert engine_of({"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 2}}) == "ZeRO-2"
