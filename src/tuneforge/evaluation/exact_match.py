"""Held-out generation accuracy: exact match of the generated answer, and the valid-format rate.

Each test record is a conversation whose last turn is the reference assistant answer; the model is
given everything before it and generates greedily. ``exact_match`` compares the normalised answer
(stripped, case-folded, surrounding quotes/period removed) to the reference. ``valid_format`` is the
share of answers that are one of ``labels`` (when labels are given) or parse as JSON (when every
reference is JSON).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from tuneforge.serving.inference import LoadedModel


def normalise_answer(text: str) -> str:
    return text.strip().strip("\"'`").rstrip(".").strip().casefold()


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except (ValueError, TypeError):
        return False


@dataclass
class GenerationEval:
    n: int
    exact_match: float
    valid_format: float | None
    predictions: list[dict] = field(default_factory=list)


def evaluate_generation(loaded: LoadedModel, conversations: list[list[dict]], labels: list[str] | None = None,
                        max_new_tokens: int = 16, batch_size: int = 16) -> GenerationEval:
    prompts = [conv[:-1] for conv in conversations]
    references = [conv[-1]["content"] for conv in conversations]
    answers = loaded.generate_batch(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    correct, valid, rows = 0, 0, []
    label_set = {normalise_answer(label) for label in labels} if labels else None
    json_refs = labels is None and all(_is_json(r) for r in references)
    for answer, reference in zip(answers, references, strict=True):
        hit = normalise_answer(answer) == normalise_answer(reference)
        correct += hit
        if label_set is not None:
            valid += normalise_answer(answer) in label_set
        elif json_refs:
            valid += _is_json(answer)
        rows.append({"reference": reference, "answer": answer, "correct": hit})
    n = max(len(conversations), 1)
    has_format = label_set is not None or json_refs
    return GenerationEval(len(conversations), correct / n, valid / n if has_format else None, rows)
