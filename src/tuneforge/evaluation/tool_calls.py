"""Scoring tool calls: did the model call when it should, the right tool, with the right arguments?

Per example, from the predicted calls (parsed from the model's answer) and the reference calls (the record's
assistant ``tool_calls``; none: the reference answers in text), each a :class:`Call` ``(name, arguments)``:

============== ===================================================================================
``call_rate``   1 when the prediction calls at least one tool (reported over every example)
``tool_name``   the multiset of called tool names equals the reference's (examples that need a call)
``args_exact``  the calls, paired by name (in order within a name), have equal arguments as JSON values,
                and there are as many calls as the reference makes (examples that need a call)
``args_valid``  every predicted call names a known tool and its arguments validate against that tool's
                ``parameters`` schema (``jsonschema``; examples with a predicted call)
``args_f1``     F1 of the (argument path, value) leaves of the paired calls' arguments: partial credit for
                a call that gets 3 of 4 arguments right (examples that need a call)
============== ===================================================================================

A wrong example gets one failure category, the first that applies: ``no call where one was needed``,
``call where none was``, ``wrong tool`` (names differ), ``bad arguments`` (names right, arguments not).
:func:`summarise` gives each metric's mean with a bootstrap interval over the examples it applies to.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tuneforge.evaluation.bootstrap import RESAMPLES, interval

NO_CALL = "no call where one was needed"
UNWANTED_CALL = "call where none was"
WRONG_TOOL = "wrong tool"
BAD_ARGUMENTS = "bad arguments"
CATEGORIES = (NO_CALL, UNWANTED_CALL, WRONG_TOOL, BAD_ARGUMENTS)
METRICS = ("call_rate", "tool_name", "args_exact", "args_valid", "args_f1")


@dataclass(frozen=True)
class Call:
    """One tool call: the function's ``name`` and its ``arguments`` (a JSON value; a string that is not JSON is
    kept as given and never equals or validates)."""

    name: str
    arguments: Any = field(default_factory=dict)

    @classmethod
    def of(cls, call: Any) -> Call:
        """From OpenAI's shape (``{"function": {"name", "arguments"}}``, arguments a JSON string or an object) or the
        flat ``{"name", "arguments"}``."""
        inner = call.get("function", call) if isinstance(call, dict) else {}
        arguments = inner.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                pass
        return cls(str(inner.get("name", "")), arguments)


@dataclass(frozen=True)
class CallScore:
    """One example's scores (None: the metric does not apply to it) and its failure category (None: right)."""

    call_rate: float
    tool_name: float | None
    args_exact: float | None
    args_valid: float | None
    args_f1: float | None
    category: str | None


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _leaves(value: Any, path: str = "") -> Counter:
    """The (path, value) leaves of a JSON value, as a multiset (list items by position)."""
    if isinstance(value, dict):
        out: Counter = Counter()
        for k, v in value.items():
            out += _leaves(v, f"{path}/{k}")
        return out if value else Counter({(path, "{}"): 1})
    if isinstance(value, list):
        out = Counter()
        for i, v in enumerate(value):
            out += _leaves(v, f"{path}/{i}")
        return out if value else Counter({(path, "[]"): 1})
    return Counter({(path, _canonical(value)): 1})


def _f1(predicted: Counter, reference: Counter) -> float:
    if not predicted and not reference:
        return 1.0
    common = sum((predicted & reference).values())
    if not common:
        return 0.0
    p, r = common / sum(predicted.values()), common / sum(reference.values())
    return 2 * p * r / (p + r)


def _paired(predicted: Sequence[Call], reference: Sequence[Call]) -> list[tuple[Call | None, Call | None]]:
    """Calls paired by name, in order within a name; an unpaired call is paired with None."""
    pairs: list[tuple[Call | None, Call | None]] = []
    left = list(predicted)
    for ref in reference:
        match = next((i for i, p in enumerate(left) if p.name == ref.name), None)
        pairs.append((left.pop(match) if match is not None else None, ref))
    pairs += [(p, None) for p in left]
    return pairs


def score_calls(predicted: Sequence[Call], reference: Sequence[Call],
                validators: dict[str, Callable[[Any], bool]] | None = None) -> CallScore:
    """The scores of one example. ``validators``: ``{tool name: arguments -> valid}`` (:func:`tool_validators`);
    a call to a tool not in it is not valid."""
    validators = validators or {}
    called, needed = bool(predicted), bool(reference)
    valid = (float(all(c.name in validators and validators[c.name](c.arguments) for c in predicted))
             if called else None)
    if not needed:
        return CallScore(float(called), None, None, valid, None, UNWANTED_CALL if called else None)
    names = Counter(c.name for c in predicted) == Counter(c.name for c in reference)
    pairs = _paired(predicted, reference)
    exact = names and all(p is not None and r is not None and _canonical(p.arguments) == _canonical(r.arguments)
                          for p, r in pairs)
    predicted_leaves: Counter = Counter()
    reference_leaves: Counter = Counter()
    for i, (p, r) in enumerate(pairs):      # leaves keyed by the pair, so that two calls' arguments never mix
        if p is not None:
            predicted_leaves += Counter({(i, *k): v for k, v in _leaves(p.arguments).items()})
        if r is not None:
            reference_leaves += Counter({(i, *k): v for k, v in _leaves(r.arguments).items()})
    category = None if exact else NO_CALL if not called else WRONG_TOOL if not names else BAD_ARGUMENTS
    return CallScore(float(called), float(names), float(exact), valid, _f1(predicted_leaves, reference_leaves),
                     category)


def tool_validators(tools: Sequence[dict[str, Any]]) -> dict[str, Callable[[Any], bool]]:
    """``{name: arguments -> valid}`` for OpenAI-shaped tool definitions (``{"type": "function", "function":
    {"name", "parameters"}}`` or the flat ``{"name", "parameters"}``); a tool without ``parameters`` takes an
    object. Raises :class:`~tuneforge.evaluation.metrics.MetricError` for a schema that is not JSON Schema."""
    from tuneforge.evaluation.metrics import check_schema

    out = {}
    for i, tool in enumerate(tools):
        spec = tool.get("function", tool)
        name = spec.get("name")
        schema = spec.get("parameters") or {"type": "object"}
        out[str(name)] = check_schema(schema, where=f"tools[{i}].function.parameters ({name})")
    return out


def summarise(scores: Sequence[CallScore], seed: int = 0, resamples: int = RESAMPLES) -> dict[str, Any]:
    """Each metric's mean and 95% bootstrap interval over the examples it applies to, and the failure counts."""
    out: dict[str, Any] = {}
    for metric in METRICS:
        values = [v for s in scores if (v := getattr(s, metric)) is not None]
        out[metric] = interval(values, resamples, seed=seed).to_dict() if values else None
    out["failures"] = {c: sum(s.category == c for s in scores) for c in CATEGORIES}
    out["examples"] = len(scores)
    out["needing_a_call"] = sum(s.tool_name is not None for s in scores)
    return out
