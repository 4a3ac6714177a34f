"""Preference training on the real SmolLM2-135M-Instruct (integration): a generated task whose chosen answers
follow a rule the rejected ones break (they open with "Certainly!", a register the base model does not use),
learnt to a held-out preference accuracy of at least 0.9, and greedy generations on held-out prompts that
follow the rule more often than the base model's (the counts are printed)."""

from __future__ import annotations

import json
import random

import pytest

from conftest import write_jsonl
from tuneforge.config import load_config
from tuneforge.runs import load_base, load_run
from tuneforge.training.trainer import TrainingRecipe

pytestmark = pytest.mark.integration

RULE = "Certainly!"
CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Japan": "Tokyo",
            "Egypt": "Cairo", "Canada": "Ottawa", "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo",
            "Greece": "Athens", "Cuba": "Havana", "Chile": "Santiago", "Poland": "Warsaw", "Austria": "Vienna",
            "Ireland": "Dublin", "Portugal": "Lisbon", "Sweden": "Stockholm", "Finland": "Helsinki"}
COLOURS = {"a banana": "yellow", "grass": "green", "snow": "white", "coal": "black", "the sky": "blue",
           "a tomato": "red", "an orange": "orange", "a lemon": "yellow", "milk": "white", "a carrot": "orange"}


def rule_task(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out) pairs: the chosen answer is the rejected one opened with "Certainly!"."""
    rng = random.Random(seed)
    qa = [(f"What is the capital of {c}?", f"The capital of {c} is {cap}.") for c, cap in CAPITALS.items()]
    qa += [(f"What colour is {t}?", f"{t[0].upper()}{t[1:]} is {col}.") for t, col in COLOURS.items()]
    sums = {(a, b) for a in range(2, 30) for b in range(2, 30)}
    qa += [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a, b in rng.sample(sorted(sums), 70)]
    rng.shuffle(qa)
    rows = [{"prompt": q, "chosen": f"{RULE} {a}", "rejected": a} for q, a in qa]
    return rows[:75], rows[75:]


def test_rule_is_learnt_and_followed_in_greedy_generation(tmp_path, real_model_path):
    train_rows, held_out = rule_task()
    train_file = write_jsonl(tmp_path / "train.jsonl", train_rows)
    val_file = write_jsonl(tmp_path / "val.jsonl", held_out)
    config = load_config(data={
        "task": "preference", "method": "lora", "output_dir": str(tmp_path / "run"), "progress": False,
        "data": {"train": str(train_file), "validation": str(val_file)}, "lora": {"r": 16, "alpha": 32},
        "max_steps": 8, "batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 1e-3,
        "warmup_ratio": 0.0, "eval_every": 4, "eval_share": None, "preference": {"beta": 0.1}})
    recipe = TrainingRecipe(config)
    recipe.setup()
    recipe.fit()
    # "chance": how often the base model itself prefers the chosen answer (its reference log-probs, computed once for
    # the held-out pairs at the first evaluation)
    base_prefers = sum(p.reference[0] > p.reference[1] for p in recipe.data.validation) / len(recipe.data.validation)
    print(f"\nbase model prefers the chosen answer on {base_prefers:.2f} of held-out pairs")
    result = recipe.finish()
    evals = [r for r in result.metrics if "eval_loss" in r]
    first = result.metrics[0]
    print(f"step 1: loss {first['loss']:.4f}, rewards/accuracies {first['rewards/accuracies']:.2f}")
    for r in evals:
        print(f"step {r['step']}: eval_loss {r['eval_loss']:.4f}, eval_rewards/accuracies "
              f"{r['eval_rewards/accuracies']:.3f}, eval_rewards/margins {r['eval_rewards/margins']:.3f}")
    assert abs(first["loss"] - 0.693147) < 1e-5                   # step 0: policy == reference
    assert evals[-1]["eval_rewards/accuracies"] >= 0.9
    prompts = [[{"role": "user", "content": row["prompt"]}] for row in held_out]
    counts = {}
    for name, model in (("base", load_base(config.model)), ("tuned", load_run(result.run_dir))):
        answers = model.generate_batch(prompts, max_new_tokens=8)
        counts[name] = sum(a.strip().startswith(RULE) for a in answers)
        print(f"{name}: {counts[name]} of {len(prompts)} held-out greedy answers open with {RULE!r}; e.g. "
              f"{json.dumps(answers[:2])}")
    assert counts["tuned"] > counts["base"]
