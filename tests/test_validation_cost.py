"""Validation that stays cheap and measures the right data: a capped split, a subset sized to eval_share,
larger forward-only batches, eval time reported, and warnings when validation is another task's data."""

import json
import logging

import pytest

from conftest import write_jsonl
from tuneforge.config import load_config
from tuneforge.data.dataset import prepare_data
from tuneforge.training.trainer import MIN_EVAL_EXAMPLES, TrainingRecipe

QUEUES = ["billing", "shipping", "login"]


def _rows(n):
    return [{"prompt": f"Ticket {i}: {['charged twice', 'parcel late', 'cannot sign in'][i % 3]}",
             "completion": QUEUES[i % 3]} for i in range(n)]


def _config(tiny_model_dir, tmp_path, data, **extra):
    settings = {"model": str(tiny_model_dir), "data": data, "output_dir": str(tmp_path / "run"), "max_steps": 10,
                "batch_size": 4, "progress": False, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    settings.update(extra)
    return load_config(data=settings)


def test_val_fraction_is_capped(tiny_model_dir, tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", _rows(600))
    capped = prepare_data(_config(tiny_model_dir, tmp_path, {"train": str(train), "val_fraction": 0.5}).data,
                          tokenizer, seed=0)
    assert (len(capped.train), len(capped.validation)) == (400, 200)      # half would be 300: capped at 200
    uncapped = prepare_data(_config(tiny_model_dir, tmp_path, {"train": str(train), "val_fraction": 0.5,
                                                               "val_max_examples": None}).data, tokenizer, seed=0)
    assert (len(uncapped.train), len(uncapped.validation)) == (300, 300)


def _set_up(tiny_model_dir, tmp_path, **extra):
    """A recipe set up (not trained) on 400 training and 300 validation examples of the same kind."""
    train = write_jsonl(tmp_path / "t.jsonl", _rows(400))
    val = write_jsonl(tmp_path / "v.jsonl", _rows(300))
    recipe = TrainingRecipe(_config(tiny_model_dir, tmp_path, {"train": str(train), "validation": str(val)}, **extra))
    recipe.setup()
    return recipe


def test_validation_subset_fits_eval_share(tiny_model_dir, tmp_path):
    recipe = _set_up(tiny_model_dir, tmp_path, max_steps=30, eval_every=10)
    # 30 steps x 4 examples trained (~same length as the validation examples), 3 evaluations:
    # 0.1 x 3 (backward) x 120 / 3 = 12 examples fit, raised to the minimum
    assert len(recipe.val_examples) == MIN_EVAL_EXAMPLES
    assert recipe.val_examples == [e for e in recipe.data.validation if e in recipe.val_examples]   # file order
    # a fixed subset: the same on every setup
    again = TrainingRecipe(recipe.config)
    again.setup()
    assert [e.input_ids for e in again.val_examples] == [e.input_ids for e in recipe.val_examples]
    # forward-only batches are 4x the training micro-batch
    assert len(recipe.val_batches) == MIN_EVAL_EXAMPLES // 16
    everything = _set_up(tiny_model_dir, tmp_path, max_steps=30, eval_every=10, eval_share=None)
    assert len(everything.val_examples) == 300


def test_short_runs_validate_less_often_rather_than_over_budget(tiny_model_dir, tmp_path):
    """With eval_every left to its default (5 evaluations a run), a budget too small for the minimum subset at
    every evaluation spaces the evaluations out instead of exceeding eval_share; a set eval_every is kept."""
    # 40 steps x 4 trained: budget 0.1 x 3 x 160 = 48 validation examples over the run (same lengths):
    # one evaluation of 32 fits, five would need 160
    recipe = _set_up(tiny_model_dir, tmp_path, max_steps=40)
    assert recipe.eval_every == 40 and 32 <= len(recipe.val_examples) <= 56
    # 200 steps: budget ~240 examples, five evaluations of 48 (default spacing kept)
    recipe = _set_up(tiny_model_dir, tmp_path, max_steps=200)
    assert recipe.eval_every == 40 and 40 <= len(recipe.val_examples) <= 56
    # 80 steps: budget ~96: three evaluations of 32 would fit (5 would not)
    recipe = _set_up(tiny_model_dir, tmp_path, max_steps=80)
    assert recipe.eval_every == 27 and len(recipe.val_examples) == 32
    # an eval_every you set is kept (the subset stays at the minimum)
    recipe = _set_up(tiny_model_dir, tmp_path, max_steps=40, eval_every=8)
    assert recipe.eval_every == 8 and len(recipe.val_examples) == MIN_EVAL_EXAMPLES


def test_a_long_run_validates_on_more(tiny_model_dir, tmp_path):
    recipe = _set_up(tiny_model_dir, tmp_path, max_steps=400, eval_every=200)
    # 400 x 4 trained, 2 evaluations: 0.1 x 3 x 1600 / 2 = 240 (the lengths differ a little)
    assert 200 <= len(recipe.val_examples) <= 280


def test_eval_time_is_reported(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", _rows(48))
    recipe = TrainingRecipe(_config(tiny_model_dir, tmp_path, {"train": str(train), "val_fraction": 0.25},
                                    max_steps=4, eval_every=2))
    recipe.setup()
    recipe.fit()
    result = recipe.finish()
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(r["eval_seconds"] > 0 for r in evals)
    record = json.loads((result.run_dir / "run.json").read_text())
    # eval_base: one more pass before the first step, counted in the total
    assert record["base_eval_seconds"] > 0 and record["base_eval_loss"] > 0
    assert record["eval_time_s"] == pytest.approx(sum(r["eval_seconds"] for r in evals) + record["base_eval_seconds"],
                                                  abs=0.01)
    assert record["eval_examples"] == 12


def test_validation_in_another_format_warns(tiny_model_dir, tokenizer, tmp_path, caplog):
    train = write_jsonl(tmp_path / "t.jsonl", _rows(20))
    val = write_jsonl(tmp_path / "v.jsonl", [{"instruction": "Summarise", "input": "a text", "output": "short"}] * 4)
    config = _config(tiny_model_dir, tmp_path, {"train": str(train), "validation": str(val)})
    with caplog.at_level(logging.WARNING):
        prepare_data(config.data, tokenizer, seed=0, use_cache=False)
    assert any("t.jsonl is prompt_completion but the validation file" in r.message and "v.jsonl is alpaca" in r.message
               for r in caplog.records), [r.message for r in caplog.records]
    caplog.clear()
    same = write_jsonl(tmp_path / "v2.jsonl", _rows(5))
    with caplog.at_level(logging.WARNING):
        prepare_data(_config(tiny_model_dir, tmp_path, {"train": str(train), "validation": str(same)}).data,
                     tokenizer, seed=0, use_cache=False)
    assert not [r for r in caplog.records if "validation file" in r.message]
