"""Scoring tool calls (evaluation/tool_calls.py): each metric and failure category on hand-built cases whose
answers are worked out by hand, and the summary's intervals against numpy's mean."""

from __future__ import annotations

import pytest

from tuneforge.evaluation.metrics import MetricError
from tuneforge.evaluation.tool_calls import (
    BAD_ARGUMENTS,
    NO_CALL,
    UNWANTED_CALL,
    WRONG_TOOL,
    Call,
    score_calls,
    summarise,
    tool_validators,
)

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
        "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "convert", "parameters": {
        "type": "object", "properties": {"value": {"type": "number"}, "from": {"type": "string"},
                                         "to": {"type": "string"}}, "required": ["value", "from", "to"]}}},
]
V = tool_validators(TOOLS)
WEATHER = Call("get_weather", {"city": "Paris", "unit": "C"})
CONVERT = Call("convert", {"value": 3, "from": "km", "to": "mi"})


def _tuple(score):
    return (score.call_rate, score.tool_name, score.args_exact, score.args_valid, score.args_f1, score.category)


@pytest.mark.parametrize("predicted,reference,expected", [
    # right call: everything 1
    ([WEATHER], [WEATHER], (1.0, 1.0, 1.0, 1.0, 1.0, None)),
    # argument order never matters; OpenAI's shape with a JSON string parses to the same call
    ([Call.of({"function": {"name": "get_weather", "arguments": '{"unit": "C", "city": "Paris"}'}})], [WEATHER],
     (1.0, 1.0, 1.0, 1.0, 1.0, None)),
    # no call where one was needed
    ([], [WEATHER], (0.0, 0.0, 0.0, None, 0.0, NO_CALL)),
    # a call where the reference answers in text; its arguments are valid
    ([WEATHER], [], (1.0, None, None, 1.0, None, UNWANTED_CALL)),
    # no call, none needed: right, and only the call rate applies
    ([], [], (0.0, None, None, None, None, None)),
    # wrong tool with valid arguments for it: leaves share nothing
    ([CONVERT], [WEATHER], (1.0, 0.0, 0.0, 1.0, 0.0, WRONG_TOOL)),
    # right tool, 1 of 2 argument leaves right: precision 1/2, recall 1/2 -> F1 0.5; unit "K" breaks the enum
    ([Call("get_weather", {"city": "Paris", "unit": "K"})], [WEATHER], (1.0, 1.0, 0.0, 0.0, 0.5, BAD_ARGUMENTS)),
    # a missing argument: precision 1, recall 1/2 -> F1 2/3; still valid (unit is optional)
    ([Call("get_weather", {"city": "Paris"})], [WEATHER], (1.0, 1.0, 0.0, 1.0, 2 / 3, BAD_ARGUMENTS)),
    # arguments that are not JSON: never equal, never valid
    ([Call.of({"name": "get_weather", "arguments": "{city: Paris"})], [WEATHER],
     (1.0, 1.0, 0.0, 0.0, 0.0, BAD_ARGUMENTS)),
    # a tool not in the list is never valid
    ([Call("book_flight", {})], [WEATHER], (1.0, 0.0, 0.0, 0.0, 0.0, WRONG_TOOL)),
    # parallel calls in another order: paired by name, all right
    ([CONVERT, WEATHER], [WEATHER, CONVERT], (1.0, 1.0, 1.0, 1.0, 1.0, None)),
    # one of two parallel calls missing: names differ (wrong tool); leaves: 2 of 5 reference leaves -> 2*1*0.4/1.4
    ([WEATHER], [WEATHER, CONVERT], (1.0, 0.0, 0.0, 1.0, 2 * 0.4 / 1.4, WRONG_TOOL)),
])
def test_each_metric_and_category_on_worked_cases(predicted, reference, expected):
    got = _tuple(score_calls(predicted, reference, V))
    assert got[:4] == expected[:4] and got[5] == expected[5], got
    assert got[4] == pytest.approx(expected[4]) if expected[4] is not None else got[4] is None


def test_two_calls_arguments_never_mix_in_the_f1():
    """Swapping the values between two calls of the same tool leaves every (path, value) leaf present in the
    multiset of all arguments: paired per call, each call gets half its leaves right."""
    a, b = Call("convert", {"value": 1, "from": "km", "to": "mi"}), Call("convert", {"value": 2, "from": "kg",
                                                                                     "to": "lb"})
    swapped = [Call("convert", {"value": 1, "from": "kg", "to": "lb"}), Call("convert", {"value": 2, "from": "km",
                                                                                          "to": "mi"})]
    score = score_calls(swapped, [a, b], V)
    assert score.args_exact == 0.0 and score.args_f1 == pytest.approx(1 / 3)


def test_the_summary_means_and_counts():
    scores = [score_calls([WEATHER], [WEATHER], V), score_calls([], [WEATHER], V), score_calls([CONVERT], [], V),
              score_calls([], [], V)]
    summary = summarise(scores)
    assert summary["call_rate"]["value"] == 0.5 and summary["call_rate"]["n"] == 4
    assert summary["tool_name"]["value"] == 0.5 and summary["tool_name"]["n"] == 2
    assert summary["args_valid"]["value"] == 1.0 and summary["args_valid"]["n"] == 2
    assert summary["args_valid"]["low"] <= 1.0 <= summary["args_valid"]["high"]
    assert summary["failures"] == {NO_CALL: 1, UNWANTED_CALL: 1, WRONG_TOOL: 0, BAD_ARGUMENTS: 0}
    assert (summary["examples"], summary["needing_a_call"]) == (4, 2)


def test_a_tool_whose_parameters_are_not_json_schema_is_named():
    with pytest.raises(MetricError, match=r"tools\[0\].function.parameters \(bad\): not a valid JSON Schema"):
        tool_validators([{"type": "function", "function": {"name": "bad", "parameters": {"type": "objekt"}}}])
