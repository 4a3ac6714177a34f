"""Tools in chat completions for models that write calls in another format than Hermes, through the official
``openai`` client on the tiny random model: a tokenizer carrying the real Mistral Nemo or Llama 3.2 chat template
(tests/fixtures/chat_templates/) is detected, its forced calls come back as ``tool_calls`` that validate, streamed
the same as plain, and an agent loop sends the call back through that template (Mistral's take only 9-character
ids); ``tool_call_format`` overrides the detection."""

from __future__ import annotations

import contextlib
import copy
import json
import re

import jsonschema
import openai
import pytest

from _serve_helpers import tiny_base
from test_serve_tools import ASK, SCHEMAS, TOOLS
from test_tool_formats import fixture
from tuneforge.serving.server import ServeConfig, Server, ServerThread


@contextlib.contextmanager
def serving(tiny_model_dir, tokenizer, template: str | None = None, **config):
    tok = copy.deepcopy(tokenizer)
    if template is not None:
        tok.chat_template = fixture(template)
    server = Server(ServeConfig(base=str(tiny_model_dir), base_name="tiny", **config), model=tiny_base(),
                    tokenizer=tok)
    with ServerThread(server.app) as thread:
        yield server, openai.OpenAI(base_url=thread.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def mistral(tiny_model_dir, tokenizer):
    with serving(tiny_model_dir, tokenizer, "mistral") as served:
        yield served


def forced(client, stream: bool = False, **kwargs):
    body = {"model": "tiny", "messages": ASK, "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False,
            "max_tokens": 80, "temperature": 0.0, **kwargs}
    return client.chat.completions.create(stream=stream, **body)


def test_a_mistral_template_is_detected_and_its_forced_call_validates(mistral):
    server, client = mistral
    assert server.tool_format(None).name == "mistral"
    choice = forced(client).choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls
    assert re.fullmatch(r"[0-9a-f]{9}", call.id)          # the kind of id Mistral's templates take back
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_parallel_mistral_calls_and_the_stream_equal_plain(mistral):
    _, client = mistral
    calls = forced(client, parallel_tool_calls=True, temperature=1.0, seed=5, max_tokens=120).choices[0]
    for call in calls.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    [plain] = forced(client).choices[0].message.tool_calls
    names, arguments, contents = {}, {}, []
    for chunk in forced(client, stream=True):
        for c in chunk.choices:
            contents.append(c.delta.content or "")
            for d in c.delta.tool_calls or []:
                names[d.index] = names.get(d.index, "") + (d.function.name or "")
                arguments[d.index] = arguments.get(d.index, "") + (d.function.arguments or "")
    assert names == {0: plain.function.name}
    assert json.loads(arguments[0]) == json.loads(plain.function.arguments)
    assert "".join(contents) == ""                          # no marker, whole or begun, streamed as content


def test_an_agent_loop_through_the_mistral_template(mistral):
    server, client = mistral
    first = forced(client, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    message = first.choices[0].message
    [call] = message.tool_calls
    result = {"temperature": 4}
    history = ASK + [message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)}]
    second = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=4,
                                            temperature=0.0)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens     # the call and its result were rendered


def test_a_llama_template_forces_bare_json_calls(tiny_model_dir, tokenizer):
    with serving(tiny_model_dir, tokenizer, "llama3") as (server, client):
        assert server.tool_format(None).name == "llama3_json"
        choice = forced(client, tool_choice={"type": "function", "function": {"name": "add"}}).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.function.name == "add"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["add"])


def test_tool_call_format_overrides_the_detection(tiny_model_dir, tokenizer):
    with serving(tiny_model_dir, tokenizer, tool_call_format="granite") as (server, client):
        assert server.tool_format(None).name == "granite"     # SmolLM2's own template would give hermes
        [call] = forced(client).choices[0].message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
