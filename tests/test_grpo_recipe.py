"""The GRPO tickets recipe (``examples/grpo_tickets.yaml``, shipped in the package): it loads, and its two rewards,
as it configures them, score each training ticket's own queue 1.5, a sentence naming that queue first 0.5, and
another queue 0 (the scores the demonstration in docs/guides/rl.md rests on)."""

from __future__ import annotations

import json
from pathlib import Path

from tuneforge.config import load_config
from tuneforge.training.grpo_rewards import BUILTINS

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "grpo_tickets.yaml"


def test_the_recipes_rewards_score_the_right_queue():
    config = load_config(RECIPE)
    assert config.task == "grpo" and [r.name for r in config.grpo.rewards] == ["label_match", "normalized_match"]
    records = [json.loads(line) for line in Path(config.data.train).read_text().splitlines()[:60]]
    answers = [r["messages"][-1]["content"] for r in records]
    labels = config.grpo.rewards[0].options["labels"]
    assert set(answers) <= set(labels)
    prompts = [r["messages"][:-1] for r in records]

    def total(completions: list[str]) -> list[float]:
        return [sum(spec.weight * score for spec, score in zip(config.grpo.rewards, scores, strict=True))
                for scores in zip(*(BUILTINS[spec.name](prompts, completions, answer=answers, **spec.options)
                                    for spec in config.grpo.rewards), strict=True)]

    assert total(answers) == [1.5] * len(answers)
    assert total([f"This goes to {a}, then {labels[0]}." for a in answers]) == [0.5] * len(answers)
    wrong = [next(x for x in labels if x != a) for a in answers]
    assert total(wrong) == [0.0] * len(answers)
