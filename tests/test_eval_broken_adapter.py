"""`tuneforge eval` catches a broken adapter (integration, real SmolLM2-135M-Instruct).

A sentiment task the base model already knows: it answers "This review is negative." (right, in its own
words: ``label_named``). An adapter trained on the same kind of reviews with their labels shuffled learns the
one-word format and nothing else, so it names the right label about half the time: the report must put it
below the base with 95% intervals that do not overlap, and the paired bootstrap's tuned-minus-base interval
below zero. The control, trained on the true labels, must not be reported worse than the base: the check
cannot pass by always reporting a tuned model worse.
"""

from __future__ import annotations

import random

import pytest

from conftest import write_jsonl
from tuneforge.config import load_config
from tuneforge.evaluation.api import evaluate
from tuneforge.training.trainer import train

pytestmark = pytest.mark.integration

LABELS = ["positive", "negative"]
WORDS = {"positive": ["wonderful", "excellent", "delightful", "fantastic", "great", "lovely", "superb",
                      "brilliant", "amazing", "perfect"],
         "negative": ["terrible", "awful", "boring", "horrible", "dreadful", "poor", "disappointing", "bad",
                      "dull", "mediocre"]}
THINGS = ["film", "meal", "hotel", "book", "concert", "phone", "service", "game", "museum", "show", "laptop",
          "coffee"]
TEMPLATES = ["The {t} was {w}.", "What a {w} {t}!", "Honestly, the {t} was {w}.", "I found the {t} {w}.",
             "Our {t} was {w}, really.", "This {t} is {w}."]


def reviews(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(LABELS)
        text = rng.choice(TEMPLATES).format(t=rng.choice(THINGS), w=rng.choice(WORDS[label]))
        rows.append({"messages": [
            {"role": "user", "content": f"Review: {text}\nIs this review positive or negative? Answer with one word."},
            {"role": "assistant", "content": label}]})
    return rows


def _trained(tmp_path, name: str, rows: list[dict], model: str):
    config = load_config(data={
        "model": model, "method": "lora", "output_dir": str(tmp_path / name), "progress": False, "seed": 0,
        "data": {"train": str(write_jsonl(tmp_path / f"{name}.jsonl", rows)), "val_fraction": 0.1},
        "lora": {"r": 16, "alpha": 32}, "learning_rate": 1e-3, "batch_size": 4, "max_steps": 40,
        "warmup_ratio": 0.05, "eval_every": 40})
    return train(config).run_dir


def test_an_adapter_trained_on_shuffled_labels_is_reported_worse_than_the_base(tmp_path, real_model_path):
    test_file = write_jsonl(tmp_path / "test.jsonl", reviews(80, seed=1))
    true_rows = reviews(160, seed=0)
    shuffled = [r["messages"][1]["content"] for r in true_rows]
    random.Random(7).shuffle(shuffled)
    broken_rows = [{"messages": [r["messages"][0], {"role": "assistant", "content": label}]}
                   for r, label in zip(true_rows, shuffled, strict=True)]

    results = {}
    for name, rows in (("broken", broken_rows), ("control", true_rows)):
        run = _trained(tmp_path, name, rows, str(real_model_path))
        # the base column once: the control's report needs only its tuned column (same base, same test file)
        columns = ["base", "tuned"] if name == "broken" else ["tuned"]
        entry = evaluate(run, data=str(test_file), columns=columns, labels=LABELS, max_new_tokens=8,
                         progress=False).report["sets"]["test"]
        results[name] = {c: entry["columns"][c]["metrics"]["label_named"] for c in columns}
        paired = entry.get("paired", {}).get("tuned - base", {}).get("label_named")
        print(name, {c: round(v["value"], 3) for c, v in results[name].items()}, paired)
        if name == "broken":
            broken_paired = paired

    base, broken = results["broken"]["base"], results["broken"]["tuned"]
    assert base["value"] > 0.8                                  # the base knows the task, in its own words
    assert broken["high"] < base["low"], (broken, base)         # worse, and the intervals do not overlap
    assert broken_paired["high"] < 0, broken_paired
    control = results["control"]["tuned"]
    assert control["value"] >= base["low"], (control, base)     # a right adapter is not reported worse
