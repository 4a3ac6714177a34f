"""Time and cost of a run (``tuneforge estimate --time``, the line of ``tuneforge plan``): FLOPs per token against
hand-computed values, hours against the analytic formula, a measured run that leaves its warm-up step out, and bad
input refused in one line."""

from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from tuneforge.cli import main
from tuneforge.config import load_config
from tuneforge.estimate.flops import flops_per_token, gpu_peak, matmul_params, method_flops
from tuneforge.estimate.shapes import ModelShape
from tuneforge.estimate.timing import TrainingTokens, estimate_time, measure_throughput

# d=8, I=16, L=2, H=2 of hd 4 (q 8), KV=1 (kv 4), V=32: per layer q 64, k 32, v 32, o 64, gate 128, up 128, down 128
TINY = ModelShape("tiny", hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                  vocab_size=32)
N_MM = 2 * (64 + 32 + 32 + 64 + 128 + 128 + 128) + 32 * 8      # 1152 + 256 (LM head) = 1408


def test_flops_per_token_by_hand_lora_and_full():
    assert matmul_params(TINY) == N_MM == 1408
    span = 10.0
    attention = 12 * 2 * 8 * span                                # 12 L d_attn S = 1920
    # full: 6 N_mm + attention (PaLM's 6N)
    full = method_flops(TINY, "full", span)
    assert attention == 1920 and full.total == 6 * 1408 + attention == 10368
    # LoRA r=2 on every linear: A (r x d_in) and B (d_out x r) per linear; 4 N_mm + 6 P_lora + attention
    lora_params = 2 * 2 * sum(d_in + d_out for d_in, d_out in [(8, 8), (8, 4), (8, 4), (8, 8), (8, 16), (8, 16),
                                                                (16, 8)])      # 2 layers x r x (d_in + d_out)
    assert lora_params == 512
    lora = method_flops(TINY, "lora", span, settings={"lora": _lora(r=2)})
    assert lora.added == 6 * 512 and lora.weight_grads == 0
    assert lora.total == 4 * 1408 + 6 * 512 + 1920 == 10624
    # gradient checkpointing runs the forward again: 2 N_mm + 4 L d_attn S
    assert flops_per_token(TINY, span, gradient_checkpointing=True).recompute == 2 * 1408 + 4 * 2 * 8 * span


def _lora(r):
    from tuneforge.methods.lora.config import LoraConfig

    return LoraConfig(r=r, target_modules="all-linear")


def test_hours_are_tokens_times_flops_over_peak_times_mfu():
    config = load_config("examples/quickstart.yaml", check_files=False)
    tokens = TrainingTokens(steps=1000, per_step=8, examples=8000, example_tokens=8000 * 500, tokens=4e6, span=500.0)
    est = estimate_time(config, gpu="a100", mfu=0.25, price_per_hour=2.0, tokens=tokens)
    seconds = 4e6 * est.flops.total / (312e12 * 0.25)
    assert est.train_seconds == pytest.approx(seconds, rel=1e-12)
    assert est.hours == pytest.approx(seconds / 3600) and est.cost == pytest.approx(2.0 * seconds / 3600)
    # the same run on an H100 (989.5 TFLOP/s) is 989.5 / 312 times quicker
    h100 = estimate_time(config, gpu="h100", mfu=0.25, tokens=tokens)
    assert est.seconds / h100.seconds == pytest.approx(989.5 / 312) and h100.cost is None


def test_estimate_time_command_json_and_table(capsys):
    assert main(["estimate", "--time", "--config", "examples/quickstart.yaml", "--gpu", "h200",
                 "--price-per-hour", "3.5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # the quickstart: 90 steps x 4 examples of its 800 (mean 66.5 tokens)
    assert out["tokens"]["steps"] == 90 and out["tokens"]["per_step"] == 4
    assert out["tokens"]["tokens"] == pytest.approx(90 * 4 * out["tokens"]["example_tokens"] / 800)
    assert out["cost"] == pytest.approx(out["hours"] * 3.5)
    assert main(["estimate", "--time", "--config", "examples/quickstart.yaml", "--gpu", "l4"]) == 0
    table = capsys.readouterr().out
    assert "| tokens trained |" in table and "L4: 121 TFLOP/s" in table


@pytest.mark.parametrize("argv, message", [
    (["--gpu", "h10"], "did you mean 'h100'?"),
    (["--gpu", "h100", "--price-per-hour", "-1"], "--price-per-hour -1: give a price of 0 or more"),
    (["--gpu", "h100", "--mfu", "1.5"], "--mfu 1.5"),
    (["--measure-steps", "1"], "--measure-steps 1: at least 2"),
])
def test_bad_time_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(["estimate", "--time", "--config", "examples/quickstart.yaml", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_unknown_gpu_names_the_closest():
    with pytest.raises(ValueError, match="did you mean 'h100-pcie'"):
        gpu_peak("H100 PCI")
    assert gpu_peak("H100 PCIe")[1] == 756.5 and gpu_peak("h200")[1] == 989.5


def _tiny_config(tiny_model_dir, tmp_path, **extra):
    data = tmp_path / "train.jsonl"
    write_jsonl(data, [{"messages": [{"role": "user", "content": f"question {i} " * (1 + i % 5)},
                                     {"role": "assistant", "content": f"answer {i}"}]} for i in range(24)])
    return load_config(data={"model": str(tiny_model_dir), "output_dir": str(tmp_path / "run"),
                             "data": {"train": str(data), "val_fraction": 0.0, "max_length": 64},
                             "batch_size": 2, "max_steps": 7, **extra})


def test_measured_mode_runs_real_steps_and_leaves_the_first_out(tiny_model_dir, tmp_path):
    config = _tiny_config(tiny_model_dir, tmp_path)
    t = measure_throughput(config, steps=3, workdir=tmp_path)
    assert len(t.step_seconds) == 3 and t.mfu is None and "the first step left out" in t.source
    # tokens/s is over steps 2 and 3 only: the warm-up step (allocator, first kernels) does not lower it
    assert t.tokens_per_s == pytest.approx(sum(t.step_tokens[1:]) / sum(t.step_seconds[1:]))
    assert t.tokens_per_s != pytest.approx(sum(t.step_tokens) / sum(t.step_seconds))
    est = estimate_time(config, measure_steps=3)
    assert est.tokens.steps == 7 and est.throughput.overhead_s >= 0
    assert est.train_seconds == pytest.approx(est.tokens.tokens / est.throughput.tokens_per_s)


def test_plan_shows_the_time_line(capsys):
    assert main(["plan", "examples/quickstart.yaml", "--memory", "8GB", "--gpu", "h100",
                 "--price-per-hour", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("time: ") and "tokens x" in lines[-1] and "H100" in lines[-1]
    assert main(["plan", "examples/quickstart.yaml", "--memory", "8GB", "--gpu", "h1OO"]) == 2
