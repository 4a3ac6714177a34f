"""Generation metrics, one score per example so that every number gets a bootstrap interval.

Each metric maps ``(prediction, reference)`` to a float in [0, 1] (``None`` where it does not apply);
the column's value is the mean over examples. Definitions:

* ``exact``: ``prediction.strip() == reference.strip()``.
* ``normalised``: equal after :func:`normalise_text` (case-folded, punctuation, articles and extra
  whitespace removed: the SQuAD normalisation).
* ``label``: the normalised answer (quotes and a final period stripped, case-folded) equals the
  reference label; with a label set an answer outside it is counted as ``(other)`` in the confusion table.
* ``label_named``: the answer, in any wording, names exactly one of the labels (as whole words after
  :func:`normalise_text`) and it is the reference's: "This review is negative." counts for ``negative``,
  "positive, not negative" counts for neither. It separates knowing the label from answering in the label
  format (``label``), which a base model's sentences fail; lm-evaluation-harness's regex filters do the same.
* ``token_f1``: SQuAD token F1 between the normalised texts' whitespace tokens (multiset overlap).
* ``rouge_l``: ROUGE-L F-measure (``rouge-score``, stemming off).
* ``chrf``: sentence chrF (``sacrebleu``, character 6-grams, beta 2), divided by 100.
* ``json_valid`` / ``schema_valid``: the prediction parses as JSON / also validates against the schema
  (``jsonschema``; the schema itself is checked first, see :func:`check_schema`).
* ``regex``: ``re.fullmatch(pattern, prediction.strip())``.
* ``user``: a ``module:function`` taking ``(prediction, reference)`` and returning a number.
"""

from __future__ import annotations

import importlib
import json
import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

OTHER = "(other)"
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


class MetricError(ValueError):
    """A metric setting that cannot be used (bad schema, regex or user function); the message names it."""


def normalise_text(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.casefold().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalise_label(text: str) -> str:
    """A one-word answer as a label: stripped, surrounding quotes and a final period removed, case-folded."""
    return text.strip().strip("\"'`").rstrip(".").strip().casefold()


def exact(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def normalised(prediction: str, reference: str) -> float:
    return float(normalise_text(prediction) == normalise_text(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall over the multiset of normalised tokens."""
    pred, ref = normalise_text(prediction).split(), normalise_text(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


_rouge_scorer: Any = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure from ``rouge-score`` (its default tokenizer: lower-cased alphanumeric tokens)."""
    global _rouge_scorer
    if _rouge_scorer is None:
        import logging

        from rouge_score import rouge_scorer

        logging.getLogger("absl").setLevel(logging.WARNING)      # "Using default tokenizer." on every scorer
        _rouge_scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(_rouge_scorer.score(reference, prediction)["rougeL"].fmeasure)


def chrf(prediction: str, reference: str) -> float:
    """Sentence chrF (sacrebleu's defaults: char 6-grams, beta 2) on a 0-1 scale."""
    from sacrebleu.metrics import CHRF

    return float(CHRF().sentence_score(prediction, [reference]).score) / 100.0


def parse_json(text: str) -> Any:
    """The JSON value of ``text`` (surrounding whitespace and a ```json fence allowed); raises ValueError."""
    body = text.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, flags=re.S)
    if fence:
        body = fence.group(1)
    return json.loads(body)


def json_valid(prediction: str, reference: str = "") -> float:
    try:
        parse_json(prediction)
        return 1.0
    except ValueError:
        return 0.0


def check_schema(schema: Any, where: str = "eval.json_schema") -> Callable[[Any], bool]:
    """A validator for ``schema``, or :class:`MetricError` naming ``where`` when it is not valid JSON Schema."""
    import jsonschema

    if isinstance(schema, str):
        try:
            with open(schema) as f:
                schema = json.load(f)
        except OSError as e:
            raise MetricError(f"{where}: cannot read the schema file: {e}") from None
        except ValueError as e:
            raise MetricError(f"{where}: the schema file is not JSON: {e}") from None
    try:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
    except jsonschema.exceptions.SchemaError as e:
        raise MetricError(f"{where}: not a valid JSON Schema: {e.message} (at {'/'.join(map(str, e.path)) or 'top'})"
                          ) from None
    validator = cls(schema)
    return lambda value: validator.is_valid(value)


def schema_valid_metric(schema: Any) -> Callable[[str, str], float]:
    is_valid = check_schema(schema)

    def schema_valid(prediction: str, reference: str = "") -> float:
        try:
            return float(is_valid(parse_json(prediction)))
        except ValueError:
            return 0.0
    return schema_valid


def regex_metric(pattern: str) -> Callable[[str, str], float]:
    try:
        compiled = re.compile(pattern, flags=re.S)
    except re.error as e:
        raise MetricError(f"eval.regex: {pattern!r} is not a valid regular expression: {e}") from None

    def regex(prediction: str, reference: str = "") -> float:
        return float(compiled.fullmatch(prediction.strip()) is not None)
    return regex


def user_metric(spec: str) -> Callable[[str, str], float]:
    """Import ``module:function``; it is called as ``function(prediction, reference) -> float``."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise MetricError(f"eval.user_metric: {spec!r}: write module:function, e.g. mypkg.metrics:score")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise MetricError(f"eval.user_metric: cannot import {spec!r}: {e}") from None
    if not callable(fn):
        raise MetricError(f"eval.user_metric: {spec!r} is not callable")

    def user(prediction: str, reference: str) -> float:
        return float(fn(prediction, reference))
    return user


TEXT_METRICS: dict[str, Callable[[str, str], float]] = {
    "exact": exact, "normalised": normalised, "token_f1": token_f1, "rouge_l": rouge_l, "chrf": chrf,
}


@dataclass
class MetricSet:
    """Which metrics a column is scored with (built once from the eval settings)."""
    metrics: dict[str, Callable[[str, str], float]] = field(default_factory=lambda: dict(TEXT_METRICS))
    labels: list[str] | None = None

    @classmethod
    def build(cls, labels: list[str] | None = None, json_schema: Any = None, regex: str | None = None,
              user: str | None = None, json_metrics: bool = False) -> "MetricSet":
        metrics = dict(TEXT_METRICS)
        if json_metrics or json_schema is not None:
            metrics["json_valid"] = json_valid
        if json_schema is not None:
            metrics["schema_valid"] = schema_valid_metric(json_schema)
        if regex:
            metrics["regex"] = regex_metric(regex)
        if user:
            metrics["user"] = user_metric(user)
        return cls(metrics, labels)

    def score(self, predictions: list[str], references: list[str]) -> dict[str, list[float]]:
        """Per-example scores: ``{metric: [score per example]}`` (``label`` too when labels are set)."""
        out = {name: [fn(p, r) for p, r in zip(predictions, references, strict=True)]
               for name, fn in self.metrics.items()}
        if self.labels:
            out["label"] = [float(normalise_label(p) == normalise_label(r))
                            for p, r in zip(predictions, references, strict=True)]
            label_set = {normalise_label(x) for x in self.labels}
            out["valid_label"] = [float(normalise_label(p) in label_set) for p in predictions]
            out["label_named"] = [float(named_label(p, self.labels) == normalise_label(r))
                                  for p, r in zip(predictions, references, strict=True)]
        return out


def named_label(prediction: str, labels: list[str]) -> str | None:
    """The one label (normalised) that ``prediction`` names as whole words, or None when it names none or
    several."""
    text = f" {normalise_text(prediction)} "
    found = {normalise_label(x) for x in labels if normalise_text(x) and f" {normalise_text(x)} " in text}
    return found.pop() if len(found) == 1 else None


def predicted_label(prediction: str, labels: list[str]) -> str:
    """The label the answer names (normalised), or ``(other)`` when it names none of ``labels``."""
    answer = normalise_label(prediction)
    return answer if answer in {normalise_label(x) for x in labels} else OTHER


def confusion(predictions: list[str], references: list[str], labels: list[str]) -> dict[str, dict[str, int]]:
    """``{reference label: {predicted label or (other): count}}`` with every label present as a row and column."""
    names = [normalise_label(x) for x in labels]
    table = {ref: dict.fromkeys([*names, OTHER], 0) for ref in names}
    for p, r in zip(predictions, references, strict=True):
        row = table.setdefault(normalise_label(r), dict.fromkeys([*names, OTHER], 0))
        row[predicted_label(p, labels)] += 1
    return table


def per_label(table: dict[str, dict[str, int]]) -> dict[str, dict[str, float]]:
    """Precision, recall and F1 of each label from a :func:`confusion` table."""
    out = {}
    for label in table:
        tp = table[label].get(label, 0)
        predicted = sum(row.get(label, 0) for row in table.values())
        actual = sum(table[label].values())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[label] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    return out
