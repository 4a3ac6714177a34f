"""GRPO's ``tool_call`` reward: the tool call(s) a completion writes against the record's reference call(s).

The completion is read with the run's tool-call format's parser (:mod:`tuneforge.data.tool_formats`: the format
of ``data.tool_call_format``, ``auto`` detected from the chat template; ``options.format`` overrides), the
reference from the record's ``tool_calls`` (``options.field``): a list of calls, each ``{"name", "arguments"}`` or
OpenAI's ``{"type": "function", "function": {"name", "arguments"}}`` (arguments an object or a JSON string of one);
a record given as ``messages`` ending with an assistant turn with ``tool_calls`` has them there. An empty list
means the right answer calls no tool.

The score in [0, 1] is a weighted mean of three parts (``options.weights``, defaults shown; a weight of 0 drops
the part):

=============== ====== ======================================================================================
part            weight what it measures, for predicted calls P and reference calls R
=============== ====== ======================================================================================
``name``        0.3    F1 of the called names (as multisets): 1 when P calls exactly R's tools
``arguments``   0.5    P and R paired in order by name; each pair's arguments scored ``options.arguments``:
                       ``f1`` (default: F1 over (key, value) items, values compared as JSON) or ``exact``
                       (1 when equal); summed over pairs and divided by ``max(|P|, |R|)``
``schema``      0.2    share of P valid against the record's ``tools`` (``options.tools_field``): a tool of
                       that name exists and the arguments validate against its ``parameters`` JSON Schema;
                       a record without tools: share of P whose arguments parsed as an object (always 1)
=============== ====== ======================================================================================

When R is empty the score is 1 if P is empty, else 0. When P is empty and R is not, it is 0.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from tuneforge.data.tool_formats import Call, ToolCallFormat, call_of
from tuneforge.errors import RewardError

WEIGHTS = {"name": 0.3, "arguments": 0.5, "schema": 0.2}


def reference_calls(value: Any) -> list[Call] | None:
    """A record's reference calls as ``{"name", "arguments"}`` (module docstring), or None when unreadable."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return None
    out = []
    for call in value:
        one = call_of(call.get("function", call)) if isinstance(call, dict) else None
        if one is None:
            return None
        out.append(one)
    return out


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def arguments_f1(predicted: dict[str, Any], reference: dict[str, Any]) -> float:
    """F1 over (key, value) items; two empty argument sets score 1."""
    if not predicted and not reference:
        return 1.0
    hits = sum(k in reference and _same(v, reference[k]) for k, v in predicted.items())
    if not hits:
        return 0.0
    precision, recall = hits / len(predicted), hits / len(reference)
    return 2 * precision * recall / (precision + recall)


def name_f1(predicted: list[Call], reference: list[Call]) -> float:
    hits = sum((Counter(c["name"] for c in predicted) & Counter(c["name"] for c in reference)).values())
    if not hits:
        return 0.0
    precision, recall = hits / len(predicted), hits / len(reference)
    return 2 * precision * recall / (precision + recall)


def pairs(predicted: list[Call], reference: list[Call]) -> list[tuple[Call, Call]]:
    """Each reference call with the first unpaired predicted call of its name, in order."""
    free = list(predicted)
    out = []
    for ref in reference:
        match = next((p for p in free if p["name"] == ref["name"]), None)
        if match is not None:
            free.remove(match)
            out.append((match, ref))
    return out


def schema_valid(call: Call, tools: Any) -> bool:
    """Whether ``call`` names one of ``tools`` (OpenAI definitions) and its arguments validate against that tool's
    ``parameters``; without tools, whether the arguments are an object."""
    if not isinstance(tools, list) or not tools:
        return isinstance(call["arguments"], dict)
    from jsonschema.validators import validator_for

    for tool in tools:
        fn = tool.get("function", tool) if isinstance(tool, dict) else {}
        if isinstance(fn, dict) and fn.get("name") == call["name"]:
            schema = fn.get("parameters") or {"type": "object"}
            return bool(validator_for(schema)(schema).is_valid(call["arguments"]))
    return False


def score_calls(predicted: list[Call], reference: list[Call], tools: Any = None,
                weights: dict[str, float] | None = None, arguments: str = "f1") -> float:
    """One completion's score (module docstring)."""
    if not reference:
        return float(not predicted)
    if not predicted:
        return 0.0
    w = {**WEIGHTS, **(weights or {})}
    compare = arguments_f1 if arguments == "f1" else lambda p, r: float(_same(p, r))
    parts = {"name": name_f1(predicted, reference),
             "arguments": sum(compare(p["arguments"], r["arguments"]) for p, r in pairs(predicted, reference))
             / max(len(predicted), len(reference)),
             "schema": sum(schema_valid(c, tools) for c in predicted) / len(predicted)}
    total = sum(w.values())
    return sum(w[k] * parts[k] for k in parts) / total


class ToolCallReward:
    """The ``tool_call`` reward function (module docstring), for the run's tool-call format ``fmt``."""

    def __init__(self, options: dict[str, Any], fmt: ToolCallFormat) -> None:
        known = {"field", "tools_field", "weights", "arguments", "format"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise RewardError(f"grpo.rewards: tool_call: unknown option {unknown[0]!r}; the options are "
                              f"{', '.join(sorted(known))}")
        self.fmt = fmt
        self.field = str(options.get("field", "tool_calls"))
        self.tools_field = str(options.get("tools_field", "tools"))
        self.arguments = options.get("arguments", "f1")
        if self.arguments not in ("f1", "exact"):
            raise RewardError(f"grpo.rewards: tool_call options.arguments is {self.arguments!r}; write f1 or exact")
        weights = options.get("weights", {})
        if not isinstance(weights, dict) or set(weights) - set(WEIGHTS) or any(
                not isinstance(v, (int, float)) or v < 0 for v in weights.values()):
            raise RewardError(f"grpo.rewards: tool_call options.weights is {weights!r}; write a mapping of name, "
                              "arguments and schema to weights >= 0")
        self.weights = {**WEIGHTS, **weights}
        if sum(self.weights.values()) <= 0:
            raise RewardError("grpo.rewards: tool_call options.weights are all 0: give one part a weight")
        self.needs = (self.field,)

    def __call__(self, prompts: list[list[dict[str, Any]]], completions: list[str], **fields: Any) -> list[float]:
        references = fields[self.field]
        tools = fields.get(self.tools_field, [None] * len(completions))
        out = []
        for i, (completion, value) in enumerate(zip(completions, references, strict=True)):
            reference = reference_calls(value)
            if reference is None:
                raise RewardError(f"grpo.rewards: tool_call: the record's {self.field} of completion {i} is not a "
                                  f"list of calls ({str(value)[:80]!r}); write "
                                  '[{"name": ..., "arguments": {...}}]')
            _, predicted = self.fmt.parse(completion)
            out.append(score_calls(predicted, reference, tools[i], self.weights, self.arguments))
        return out
