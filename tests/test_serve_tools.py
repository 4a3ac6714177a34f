"""Tools in chat completions (serving/tool_calls.py): the output splitter against the whole-answer parse at every
chunking, forced calls (``tool_choice`` required / named) that parse and validate on the tiny random model, the
stream's tool-call deltas equal to the plain answer's calls, an agent loop with the official ``openai`` client
(call, tool result, answer), and the 400s naming the field."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from _serve_helpers import tiny_base
from tuneforge.serving.server import ServeConfig, Server, ServerThread
from tuneforge.serving.tool_calls import OutputSplitter, split_answer

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]

ANSWERS = [
    "plain text, no call",
    "<think>the user wants weather</think>\nLet me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": "
    "{\"city\": \"Oslo\", \"unit\": \"C\"}}\n</tool_call>",
    "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}\n</tool_call>\n<tool_call>\n{\"name\": "
    "\"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Lima\\\", \\\"unit\\\": \\\"F\\\"}\"}\n</tool_call>",
    "a <tool_ that is not a call, and <tool_call>not json</tool_call> either",
    "<think>unfinished reasoning",
    "x < y and <thinking> is not a think block",
]


@pytest.mark.parametrize("text", ANSWERS)
def test_the_stream_splits_like_the_whole_answer_at_every_chunking(text):
    whole = split_answer(text, tools=True)
    for cut in range(1, len(text)):
        for step in (cut, 1):                   # two pieces at every cut; and one character at a time
            splitter = OutputSplitter(tools=True)
            deltas = [d for i in range(0, len(text), step) for d in splitter.feed(text[i:i + step])]
            rest, calls = splitter.finish()
            reasoning = "".join(d.get("reasoning_content", "") for d in deltas + rest) or None
            content = "".join(d.get("content", "") for d in deltas + rest)
            assert (reasoning, content.strip() if calls else content, calls) == whole, (cut, step)
            if step == 1:
                break


def test_what_the_splitter_makes_of_each_answer():
    assert split_answer(ANSWERS[0], True) == (None, "plain text, no call", [])
    assert split_answer(ANSWERS[1], True) == ("the user wants weather", "Let me look.",
                                              [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}])
    assert [c["name"] for c in split_answer(ANSWERS[2], True)[2]] == ["add", "get_weather"]
    assert split_answer(ANSWERS[3], True) == (None, ANSWERS[3], [])          # junk stays content, never an error
    assert split_answer(ANSWERS[4], True) == ("unfinished reasoning", "", [])
    assert split_answer(ANSWERS[5], True) == (None, ANSWERS[5], [])
    assert split_answer(ANSWERS[1], False)[2] == []                          # tool_choice none: nothing parsed


@pytest.fixture(scope="module")
def served(tiny_model_dir, tokenizer):
    server = Server(ServeConfig(base=str(tiny_model_dir), base_name="tiny"), model=tiny_base(), tokenizer=tokenizer)
    with ServerThread(server.app) as thread:
        yield server, openai.OpenAI(base_url=thread.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_forced_call_parses_and_validates(served, choice, temperature):
    _, client = served
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice,
                                       parallel_tool_calls=False, max_tokens=80, temperature=temperature, seed=3)
    choice_out = r.choices[0]
    assert choice_out.finish_reason == "tool_calls", choice_out
    [call] = choice_out.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    if isinstance(choice, dict):
        assert call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_parallel_forced_calls_each_validate(served):
    _, client = served
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                       max_tokens=120, temperature=1.0, seed=5)
    calls = r.choices[0].message.tool_calls
    assert calls
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_the_streamed_call_is_the_plain_answers_call(served):
    _, client = served
    kwargs = {"model": "tiny", "messages": ASK, "tools": TOOLS, "tool_choice": "required",
              "parallel_tool_calls": False, "max_tokens": 80, "temperature": 0.0}
    plain = client.chat.completions.create(**kwargs).choices[0]
    names, arguments, reasons = {}, {}, []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            reasons.append(c.finish_reason)
            for d in c.delta.tool_calls or []:
                names[d.index] = names.get(d.index, "") + (d.function.name or "")
                arguments[d.index] = arguments.get(d.index, "") + (d.function.arguments or "")
    [call] = plain.message.tool_calls
    assert names == {0: call.function.name}
    assert json.loads(arguments[0]) == json.loads(call.function.arguments)
    assert reasons[-1] == "tool_calls"


def test_an_agent_loop_with_the_openai_client(served):
    """Call, tool result, answer: the second request carries the assistant's call and the tool's result."""
    server, client = served
    first = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           parallel_tool_calls=False, max_tokens=80, temperature=0.0)
    message = first.choices[0].message
    [call] = message.tool_calls
    result = {"temperature": 4, "unit": json.loads(call.function.arguments)["unit"]}
    history = ASK + [message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)}]
    second = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=8,
                                            temperature=0.0)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the result is in the prompt the model answered: more prompt tokens than without it
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + len(server.tokenizer(json.dumps(result))[
        "input_ids"])


def test_tools_are_rendered_and_none_hides_them(served):
    _, client = served
    with_tools = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=2)
    hidden = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="none",
                                            max_tokens=2)
    bare = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=2)
    assert hidden.usage.prompt_tokens == bare.usage.prompt_tokens < with_tools.usage.prompt_tokens


@pytest.mark.parametrize("kwargs,param,words", [
    ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "objekt"}}}]}, "tools",
     "not a valid JSON Schema"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "book_flight"}}},
     "tool_choice.function.name", "'book_flight' is not among the tools"),
    ({"tool_choice": "required"}, "tool_choice", "no tools"),
    ({"tools": TOOLS, "messages": ASK + [{"role": "tool", "tool_call_id": "nope", "content": "4 C"}]}, "messages.1",
     "answers no call"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "forced tool call"),
])
def test_bad_tool_requests_are_400_naming_the_field(served, kwargs, param, words):
    _, client = served
    body = {"model": "tiny", "messages": ASK, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**body)
    error = e.value.body
    assert error["param"] == param and words in error["message"], error
