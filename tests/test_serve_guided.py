"""Guided decoding (``response_format`` json_object / json_schema): on the tiny random model, whose free output is
junk, every constrained answer parses and validates against its schema, greedy and sampled, in batches shared
with free rows, which stay token for token what they are alone; max_tokens cuts a constrained answer with
``length``; EOS is taken only where the grammar accepts; streaming gives the same text; the official ``openai``
client's ``response_format`` works; bad schemas are 400s naming ``response_format.json_schema.schema``."""

from __future__ import annotations

import contextlib
import json
import queue

import httpx
import jsonschema
import openai
import pytest

from _serve_helpers import tiny_base
from tuneforge.serving.adapters import AdapterRegistry, AdapterSet
from tuneforge.serving.engine import Engine, Request
from tuneforge.serving.guided import JSON_OBJECT_SCHEMA, MAX_SCHEMA_BYTES, Grammars, json_schema_grammar
from tuneforge.serving.server import ServeConfig, Server, ServerThread

NESTED = {"type": "object", "additionalProperties": False, "required": ["user", "active"], "properties": {
    "user": {"type": "object", "additionalProperties": False, "required": ["name", "age"], "properties": {
        "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120}}},
    "active": {"type": "boolean"}}}
ENUMS_ARRAYS = {"type": "object", "additionalProperties": False, "required": ["tags", "level"], "properties": {
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
    "level": {"enum": ["low", "mid", "high"]}}}
NUMBERS = {"type": "object", "additionalProperties": False, "required": ["x", "n", "ids"], "properties": {
    # a number's digits are unbounded without multipleOf: the random model, greedy, writes 9s until max_tokens
    "x": {"type": "number", "minimum": -10, "maximum": 10, "multipleOf": 0.25},
    "n": {"type": "integer", "minimum": -50, "maximum": 50},
    "ids": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 4}}}
OPTIONAL = {"type": "object", "additionalProperties": False, "required": ["id"], "properties": {
    "id": {"type": "integer", "minimum": 1, "maximum": 9}, "note": {"type": "string", "maxLength": 6}}}
SCHEMAS = {"nested": NESTED, "enums_arrays": ENUMS_ARRAYS, "numbers": NUMBERS, "optional": OPTIONAL}
# unbounded strings and keys (json_object, free-form strings): the random model, left alone, never closes them, so
# these run with a model leaning towards closing them (logits of '"' and, less, '}' raised); the grammar decides
UNBOUNDED = {"json_object": JSON_OBJECT_SCHEMA, "free_strings": {
    "type": "object", "required": ["title", "items"], "properties": {
        "title": {"type": "string"}, "items": {"type": "array", "items": {"type": "string"}}}}}
PROMPTS = ["Hello there", "Give me the JSON", "name and age please", "x"]


@pytest.fixture(scope="module")
def model_set():
    return AdapterSet(tiny_base())


@pytest.fixture(scope="module")
def grammars(model_set, tokenizer):
    engine = Engine(AdapterRegistry(model_set), tokenizer)
    return Grammars(tokenizer, engine.vocab_size, engine.eos_ids)


def run(model_set, tokenizer, reqs: list[Request], boost: dict[int, float] | None = None,
        ) -> list[tuple[str, str, list[str]]]:
    """``reqs`` admitted together (one batch from the first step): ``(text, finish_reason, pieces)`` of each (or
    ``("<error>", message, pieces)``); ``boost``: logits added to these tokens at every step (a model's leaning)."""
    engine = Engine(AdapterRegistry(model_set), tokenizer)
    if boost:
        original = model_set.forward

        def forward(*args, **kwargs):
            out = original(*args, **kwargs)
            for token, value in boost.items():
                out.logits[..., token] += value
            return out

        model_set.forward = forward
    events = [queue.Queue() for _ in reqs]
    for req, q in zip(reqs, events, strict=True):
        req.sink = q.put
        engine.submit(req)
    engine.start()
    results = []
    try:
        for q in events:
            pieces = []
            while (ev := q.get(timeout=120))[0] == "token":
                pieces.append(ev[1])
            results.append(("".join(pieces), ev[1], pieces) if ev[0] == "done" else ("<error>", ev[1], pieces))
    finally:
        engine.stop()
        if boost:
            del model_set.forward
    return results


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def guided(grammars, tokenizer, schema, prompt="Hello there", **kw) -> Request:
    return Request(ids(tokenizer, prompt), guide=grammars.guide(json_schema_grammar(schema), "schema"), **kw)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_every_constrained_answer_parses_and_validates(model_set, tokenizer, grammars, temperature):
    reqs, expected = [], []
    for name, schema in SCHEMAS.items():
        for k, prompt in enumerate(PROMPTS[:2]):
            reqs.append(guided(grammars, tokenizer, schema, prompt, max_tokens=400, temperature=temperature,
                               seed=k))
            expected.append((name, schema))
    free = run(model_set, tokenizer, [Request(ids(tokenizer, p), max_tokens=40, ignore_eos=True) for p in PROMPTS])
    assert not any(_is_json(text) for text, _, _ in free)           # the model alone writes no JSON
    for (text, reason, _), (name, schema) in zip(run(model_set, tokenizer, reqs), expected, strict=True):
        assert reason == "stop", (name, text)
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_unbounded_strings_and_json_object(model_set, tokenizer, grammars, temperature):
    leaning = {tokenizer.convert_tokens_to_ids('"'): 6.0, tokenizer.convert_tokens_to_ids("}"): 3.0}
    free = run(model_set, tokenizer, [Request(ids(tokenizer, p), max_tokens=40, ignore_eos=True) for p in PROMPTS],
               boost=leaning)
    assert not any(_is_json(text) for text, _, _ in free)
    reqs, expected = [], []
    for name, schema in UNBOUNDED.items():
        for k, prompt in enumerate(PROMPTS):
            reqs.append(guided(grammars, tokenizer, schema, prompt, max_tokens=400, temperature=temperature,
                               seed=k))
            expected.append((name, schema))
    for (text, reason, _), (name, schema) in zip(run(model_set, tokenizer, reqs, boost=leaning), expected,
                                                 strict=True):
        assert reason == "stop", (name, text)
        jsonschema.validate(json.loads(text), schema)
        assert isinstance(json.loads(text), dict)


def _is_json(text):
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def test_free_row_in_a_guided_batch_is_what_it_is_alone(model_set, tokenizer, grammars):
    free = lambda: Request(ids(tokenizer, "tell me a story"), max_tokens=24, ignore_eos=True)   # noqa: E731
    (alone,) = run(model_set, tokenizer, [free()])
    batch = run(model_set, tokenizer, [guided(grammars, tokenizer, NESTED, max_tokens=60), free(),
                                        guided(grammars, tokenizer, ENUMS_ARRAYS, "x", max_tokens=60),
                                        guided(grammars, tokenizer, NUMBERS, "Hello", temperature=0.9, seed=3)])
    assert batch[1][:2] == alone[:2] and alone[1] == "length"
    assert ids(tokenizer, batch[1][0]) == ids(tokenizer, alone[0])
    for text, reason, _ in batch[::2]:
        assert reason == "stop" and _is_json(text)


def test_max_tokens_cuts_a_constrained_answer_with_length(model_set, tokenizer, grammars):
    (full,) = run(model_set, tokenizer, [guided(grammars, tokenizer, NESTED, max_tokens=400)])
    n = len(ids(tokenizer, full[0]))
    assert full[1] == "stop" and n > 4
    (cut,) = run(model_set, tokenizer, [guided(grammars, tokenizer, NESTED, max_tokens=n - 2)])
    assert cut[1] == "length" and full[0].startswith(cut[0]) and not _is_json(cut[0])


def test_eos_only_where_the_grammar_accepts(model_set, tokenizer, grammars):
    """With EOS made the likeliest token everywhere, a free row ends at once; a guided one ends only where its
    grammar accepts (an integer after its first digit; an object once closed)."""
    reqs = [Request(ids(tokenizer, "hi"), max_tokens=20), guided(grammars, tokenizer, {"type": "integer"}),
            guided(grammars, tokenizer, OPTIONAL)]
    free, number, obj = run(model_set, tokenizer, reqs, boost=dict.fromkeys(grammars.eos_ids, 50.0))
    assert free == ("", "stop", [])
    assert number[1] == "stop" and isinstance(json.loads(number[0]), int)
    assert obj[1] == "stop"
    jsonschema.validate(json.loads(obj[0]), OPTIONAL)


def test_grammars_are_compiled_once_per_schema(model_set, tokenizer):
    g = Grammars(tokenizer, 49152, {2})
    first = g.guide(json_schema_grammar(NESTED), "s")
    again = g.guide(json_schema_grammar(json.loads(json.dumps(NESTED))), "s")
    g.guide(json_schema_grammar(OPTIONAL), "s")
    assert g.compiled == 2 and first.matcher is not again.matcher      # one compile each; a matcher per request
    small = Grammars(tokenizer, 49152, {2}, cache_size=1)
    for schema in (NESTED, OPTIONAL, NESTED):
        small.guide(json_schema_grammar(schema), "s")
    assert small.compiled == 3                                        # LRU of one: NESTED was evicted


# ------------------------------------------------------------------------------------------- the server

def _format(schema, name="answer"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def served(tiny_model_dir, tokenizer):
    server = Server(ServeConfig(base=str(tiny_model_dir), base_name="tiny"), model=tiny_base(), tokenizer=tokenizer)
    with ServerThread(server.app) as thread:
        yield server, thread


@contextlib.contextmanager
def leaning(server):
    original, tok = server.registry.set.forward, server.tokenizer

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        out.logits[..., tok.convert_tokens_to_ids('"')] += 6.0
        out.logits[..., tok.convert_tokens_to_ids("}")] += 3.0
        return out

    server.registry.set.forward = forward
    try:
        yield
    finally:
        server.registry.set.forward = original


def client(thread):
    return openai.OpenAI(base_url=thread.url + "/v1", api_key="none", max_retries=0, timeout=120)


HI = [{"role": "user", "content": "hi"}]


def test_openai_client_response_format_and_streaming(served):
    server, thread = served
    c = client(thread)
    for schema in (NESTED, ENUMS_ARRAYS):
        r = c.chat.completions.create(model="tiny", messages=HI, max_tokens=300, temperature=0,
                                      response_format=_format(schema))
        text = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(text), schema)
        assert list(json.loads(text)) == list(schema["properties"])     # in the schema's order, as OpenAI's
        stream = c.chat.completions.create(model="tiny", messages=HI, max_tokens=300, temperature=0, stream=True,
                                           response_format=_format(schema))
        chunks = list(stream)
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    with leaning(server):                    # json_object's keys are unbounded: see UNBOUNDED
        r = c.chat.completions.create(model="tiny", messages=HI, max_tokens=300, temperature=0.9, seed=5,
                                      response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    free = c.chat.completions.create(model="tiny", messages=HI, max_tokens=20, temperature=0)
    text = c.chat.completions.create(model="tiny", messages=HI, max_tokens=20, temperature=0,
                                     response_format={"type": "text"}).choices[0].message.content
    assert text == free.choices[0].message.content and not _is_json(text)
    r = c.completions.create(model="tiny", prompt=["a", "b"], max_tokens=300, temperature=0,
                             extra_body={"response_format": _format(OPTIONAL)})
    for choice in r.choices:
        jsonschema.validate(json.loads(choice.text), OPTIONAL)


BIG = {"enum": [f"value-{i:06d}" for i in range(MAX_SCHEMA_BYTES // 10)]}


@pytest.mark.parametrize("schema, says", [
    ({"type": "nonsense"}, "not a valid JSON Schema"),                 # fails the meta-schema
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "cannot be used"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),           # a keyword llguidance does not implement
    ({"type": "string", "pattern": "(?<=a)b"}, "look-around"),
    (BIG, "over the limit"),
])
def test_bad_schemas_are_400_naming_the_field(served, schema, says):
    _, thread = served
    r = httpx.post(thread.url + "/v1/chat/completions", timeout=60,
                   json={"model": "tiny", "messages": HI, "response_format": _format(schema)})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format.json_schema.schema" and says in error["message"], error


def test_bad_response_formats_are_400(served):
    _, thread = served
    for fmt, param in [({"type": "xml"}, "response_format"), ({"type": "json_schema"}, "response_format"),
                       ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "response_format")]:
        r = httpx.post(thread.url + "/v1/chat/completions", timeout=60,
                       json={"model": "tiny", "messages": HI, "response_format": fmt})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith(param), (fmt, r.text)
    with pytest.raises(openai.BadRequestError):
        client(thread).chat.completions.create(model="tiny", messages=HI, response_format=_format({"type": "bogus"}))


def test_guided_decoding_off_refuses_json_formats(tiny_model_dir, tokenizer):
    server = Server(ServeConfig(base=str(tiny_model_dir), base_name="tiny", guided_decoding=False),
                    model=tiny_base(), tokenizer=tokenizer)
    with ServerThread(server.app) as thread:
        for fmt in (_format(OPTIONAL), {"type": "json_object"}):
            r = httpx.post(thread.url + "/v1/chat/completions", timeout=60,
                           json={"model": "tiny", "messages": HI, "response_format": fmt, "max_tokens": 4})
            assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
            assert "guided decoding" in r.json()["error"]["message"]
        r = httpx.post(thread.url + "/v1/chat/completions", timeout=60,
                       json={"model": "tiny", "messages": HI, "response_format": {"type": "text"}, "max_tokens": 4})
        assert r.status_code == 200


def test_serve_flag_sets_the_default():
    import argparse

    from tuneforge.serving.commands import add_serve_command, serve_config_from_args

    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    on = serve_config_from_args(parser.parse_args(["serve", "--base", "tiny"]))
    off = serve_config_from_args(parser.parse_args(["serve", "--base", "tiny", "--guided-decoding", "off"]))
    assert on.guided_decoding is True and off.guided_decoding is False


def test_a_failing_guide_fails_its_row_alone(model_set, tokenizer, grammars):
    story = lambda: Request(ids(tokenizer, "tell me a story"), max_tokens=12, ignore_eos=True)   # noqa: E731
    bad = guided(grammars, tokenizer, NESTED, max_tokens=30)
    bad.guide.fill = lambda row: (_ for _ in ()).throw(RuntimeError("boom"))
    (alone,) = run(model_set, tokenizer, [story()])
    failed, other, fine = run(model_set, tokenizer, [bad, story(), guided(grammars, tokenizer, OPTIONAL)])
    assert failed[0] == "<error>" and "boom" in failed[1]
    assert other[:2] == alone[:2] and fine[1] == "stop" and _is_json(fine[0])
