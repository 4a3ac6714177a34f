"""Fitting a run to a memory budget: the plan keeps the effective batch, takes the fastest choice the
estimator puts under the budget (in the documented order), and `auto_fit` applies it before training."""

from __future__ import annotations

import pytest

from conftest import write_jsonl
from tuneforge.cli import main
from tuneforge.config import load_config
from tuneforge.estimate.plan import parse_memory, plan_memory


def _config(**extra):
    return load_config("examples/quickstart.yaml", check_files=False, data=extra or None)


def test_parse_memory():
    assert parse_memory("8GB") == 8 * 2**30 and parse_memory("512 MiB") == 512 * 2**20
    assert parse_memory("1.5g") == int(1.5 * 2**30)
    with pytest.raises(ValueError, match="write a number and a unit"):
        parse_memory("lots")


@pytest.mark.parametrize("budget", ["8GB", "2GB", "1.2GB", "1GB", "800MB"])
def test_the_plan_is_the_first_candidate_under_the_budget_and_keeps_the_effective_batch(budget):
    config = _config()
    plan = plan_memory(config, parse_memory(budget), device="cpu", dtype="fp32")
    assert plan.chosen is not None and plan.chosen is plan.tried[-1]
    assert plan.chosen.peak <= plan.usable == int(0.9 * plan.budget) and all(c.peak > plan.usable
                                                                            for c in plan.tried[:-1])
    for c in plan.tried:
        assert c.batch_size * c.gradient_accumulation_steps == config.batch_size * config.gradient_accumulation_steps
    # the documented order: own method first, no checkpointing before checkpointing, larger micro-batches first
    keys = [(c.method != config.method, c.gradient_checkpointing, -c.batch_size) for c in plan.tried]
    assert keys == sorted(keys)


def test_a_roomy_budget_changes_nothing_and_a_tight_one_reaches_qlora_or_says_nothing_fits():
    config = _config()
    roomy = plan_memory(config, parse_memory("64GB"))
    assert (roomy.chosen.method, roomy.chosen.batch_size, roomy.chosen.gradient_checkpointing) == ("lora", 4, False)
    # a 7B shape on a GPU: LoRA in bf16 needs its 13.5 GB of weights, QLoRA fits in 12 GB
    big = _config(model="7b", data={"train": "x", "max_length": 2048})
    tight = plan_memory(big, parse_memory("12GB"), device="cuda", dtype="bf16")
    assert tight.chosen.method == "qlora" and all(c.peak > tight.usable for c in tight.tried if c.method == "lora")
    # SmolLM2 on CPU: QLoRA's load peak (the fp32 checkpoint's pages while quantizing, 674 MiB) is above LoRA's
    # leanest step, so under ~750 MB nothing fits
    small = plan_memory(config, parse_memory("600MB"))
    assert small.chosen is None and "nothing fits" in small.table()
    qlora = [c for c in small.tried if c.method == "qlora"]
    assert any(c.estimate.peak <= small.usable < c.load_peak for c in qlora)   # the load rules it out


def test_plan_command_prints_the_table(capsys):
    assert main(["plan", "examples/quickstart.yaml", "--memory", "1.2GB"]) == 0
    out = capsys.readouterr().out
    assert "| lora | 1 | 4 | no | 0.96 | chosen |" in out
    assert "--set batch_size=1 --set gradient_accumulation_steps=4" in out


def test_auto_fit_applies_the_plan_before_training(tiny_model_dir, tmp_path):
    from tuneforge.training.trainer import TrainingRecipe

    data = write_jsonl(tmp_path / "train.jsonl",
                       [{"prompt": f"Ticket {i}", "completion": ["billing", "login"][i % 2]} for i in range(8)])
    settings = {"model": str(tiny_model_dir), "data": {"train": str(data), "val_fraction": 0.0, "max_length": 64},
                "output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 4, "progress": False}
    config = load_config(data=settings)
    plan = plan_memory(config, 10 * 2**30)
    tight = int((plan.tried[0].peak - 1) / 0.9)   # just too little for the config as written: the next split
    recipe = TrainingRecipe(load_config(data={**settings, "auto_fit": True, "memory_budget": f"{tight}b"}))
    recipe.setup()
    assert (recipe.config.batch_size, recipe.config.gradient_accumulation_steps) == (2, 2)
    recipe.fit()
    assert recipe.finish().steps == 2


def test_plan_bad_input_is_one_line_and_exit_2(capsys):
    from tuneforge.methods import Method, register_method, unregister_method

    assert main(["plan", "examples/quickstart.yaml", "--memory", "lots"]) == 2
    # a method whose record declares no memory terms (every built-in one does)
    register_method(Method(name="no_terms", summary="a test's toy", settings={}, apply=lambda m, c, t=None: m,
                           load_trained=lambda base, folder, is_trainable=False: base, saved_types=()))
    try:
        assert main(["plan", "examples/quickstart.yaml", "--memory", "1GB", "--set", "method=no_terms"]) == 2
    finally:
        unregister_method("no_terms")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error:") for line in err)
    assert "'no_terms': the memory estimator models adapter, full, ia3, lora, prefix, prompt, qlora only" in err[1]
