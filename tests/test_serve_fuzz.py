"""Fuzzing ``tuneforge serve``: schemathesis against the published OpenAPI schema, hypothesis against the parser.

* ``/openapi.json`` publishes every endpoint's request body and answers (errors, streams included);
* schemathesis generates valid and invalid requests for every endpoint from that schema (a bounded number:
  ``TUNEFORGE_FUZZ_EXAMPLES`` per endpoint and mode, derandomized so that a run is reproducible) and sends
  them to a real server on a tiny model: no answer is a 5xx, every answer conforms to the schema (status,
  content type, body; each event of a stream), invalid data is refused, and the server is healthy after;
* hypothesis feeds :func:`~tuneforge.serving.protocol.parse_body` and the HTTP endpoints hostile JSON (deep
  nesting, lone surrogates, huge numbers, NUL bytes, wrong types): always a 4xx naming a field or a valid
  answer, never a 5xx or an exception.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from _serve_helpers import save_adapter, tiny_base
from tuneforge.serving import protocol as P
from tuneforge.serving.server import ServeConfig, Server, ServerThread

ADMIN = "admin-key"
MAX_TOKENS = 6
EXAMPLES = int(os.environ.get("TUNEFORGE_FUZZ_EXAMPLES", "100"))
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(autouse=True)
def ieee_floats():
    """Hypothesis generates subnormal floats, which it refuses to do under flush-to-zero: the state an earlier
    test's ``load_model()`` (``flush_denormals``) may have left this thread in. Off for these tests."""
    import sys

    import torch

    flushing = sys.float_info.min / 2 == 0.0
    if flushing:
        torch.set_flush_denormal(False)
    yield
    if flushing:
        torch.set_flush_denormal(True)


@pytest.fixture(scope="module")
def served(tiny_model_dir, tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-root")
    save_adapter(root / "lora", "lora", {"lora": {"r": 4, "dropout": 0.0}}, seed=11)
    server = Server(ServeConfig(base=str(tiny_model_dir), base_name="tiny", adapters={"lora": str(root / "lora")},
                                admin_key=ADMIN, adapter_root=str(root), max_output_tokens=MAX_TOKENS,
                                max_input_tokens=256, default_max_tokens=MAX_TOKENS),
                    model=tiny_base(), tokenizer=tokenizer)
    with ServerThread(server.app) as thread:
        yield server, thread


def test_openapi_publishes_request_bodies_and_answers(served):
    _, thread = served
    schema = httpx.get(thread.url + "/openapi.json").json()
    ops = {(m.upper(), path): op for path, item in schema["paths"].items() for m, op in item.items()}
    assert set(ops) == {("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"),
                        ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                        ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter")}
    components = schema["components"]["schemas"]
    for (method, path), op in ops.items():
        if method == "POST":
            ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert ref.rsplit("/", 1)[1] in components, (path, ref)
            assert op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
    chat = components["ChatCompletionRequest"]
    assert {"model", "messages"} <= set(chat["required"]) and "seed" in chat["properties"]
    assert "text/event-stream" in ops[("POST", "/v1/chat/completions")]["responses"]["200"]["content"]


def _steer(case) -> None:
    """Point a share of the generated bodies at the served models, within the token limit, so that fuzzing
    reaches the engine and not only the 404 of a random model name (invalid parts stay invalid)."""
    body = case.body
    if not isinstance(body, dict):
        return
    pick = zlib.crc32(repr(sorted(body.items(), key=lambda kv: str(kv[0]))).encode())
    if isinstance(body.get("model"), str) and pick % 4:
        body["model"] = ("tiny", "lora")[pick % 2]
    for key in ("max_tokens", "max_completion_tokens"):
        if type(body.get(key)) is int and body[key] > MAX_TOKENS and pick % 3:
            body[key] = 1 + body[key] % MAX_TOKENS
    if body.get("lora_name") in ("lora", "tiny"):        # keep the served adapter for the checks after
        body["lora_name"] = "lora-fuzz"


@pytest.mark.timeout(600)
def test_schemathesis_every_endpoint(served):
    """Generated requests, valid and invalid, on every endpoint: never a 5xx; status, content type and body
    (each event of a stream) as the schema says; invalid data refused; the server healthy after."""
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )

    server, thread = served
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              negative_data_rejection]
    schema = schemathesis.openapi.from_url(thread.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 7
    statuses: Counter = Counter()
    t0 = time.perf_counter()
    for operation in operations:
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.method.upper() == "POST" else [])
        for mode in modes:
            @settings(max_examples=EXAMPLES if operation.method.upper() == "POST" else 3, deadline=None,
                      derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case) -> None:
                _steer(case)
                response = case.call(headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
                statuses[(case.operation.label, case.meta.generation.mode.value, response.status_code)] += 1
                case.validate_response(response, checks=checks)
            run()
    wall = time.perf_counter() - t0
    total = sum(statuses.values())
    print(f"\nschemathesis: {total} requests in {wall:.1f} s")
    for key, n in sorted(statuses.items()):
        print(f"  {key}: {n}")
    assert total >= 7 * 2                                         # every endpoint was exercised
    answered = {op for (op, mode, status), _ in statuses.items() if status == 200}
    assert {"POST /v1/chat/completions", "POST /v1/completions"} <= answered, "fuzzing never reached the model"
    _assert_healthy(server, thread)


def _assert_healthy(server, thread) -> None:
    assert httpx.get(thread.url + "/health").json()["status"] == "ok"
    r = httpx.post(thread.url + "/v1/chat/completions", json={"model": "tiny", "messages": HI, "max_tokens": 3,
                                                              "temperature": 0, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
    deadline = time.time() + 10
    while (server.engine.running or server.in_flight) and time.time() < deadline:
        time.sleep(0.01)
    assert server.engine.running == 0 and server.engine.waiting == 0 and server.in_flight == 0


# ---------------------------------------------------------------------------------- the parser


def _json_values(leaves):
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                                              inner, max_size=4),
                        max_leaves=12)


HOSTILE_TEXT = st.text(alphabet=st.characters(exclude_categories=()), max_size=12) | st.sampled_from(
    ["", "\x00", "\ud800", "a\udfffb", "\U0001f600", "\u2028", "<|im_end|>", "ö" * 50])
HOSTILE_NUMBERS = (st.integers(min_value=-(2 ** 200), max_value=2 ** 200) | st.floats(allow_subnormal=False)
                   | st.sampled_from([0, -1, 2 ** 63, 2 ** 64, 2 ** 80, 1e308, 1e-300, -0.0]))
LEAVES = st.none() | st.booleans() | HOSTILE_NUMBERS | HOSTILE_TEXT
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
          "stream", "stream_options", "stop", "seed", "ignore_eos", "echo", "logprobs", "tools", "lora_name",
          "lora_path", "pinned", "role", "content"]


def _encode(value) -> bytes:
    """JSON as a client could send it: Python's encoder writes lone surrogates as escapes, NaN as ``NaN``."""
    return json.dumps(value).encode()


RAW_BODIES = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda n, open_, close: (open_ * n + close * n).encode(), st.integers(1, 5000),
              st.sampled_from(["[", '{"a":']), st.sampled_from(["]", "}"])),
    st.builds(lambda digits: b'{"model": "tiny", "max_tokens": ' + b"9" * digits + b"}", st.integers(1, 6000)),
    _json_values(LEAVES).map(_encode),
    st.dictionaries(st.sampled_from(FIELDS), _json_values(LEAVES), max_size=6).map(_encode),
)


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(raw=RAW_BODIES, model=st.sampled_from(P.SCHEMA_MODELS[:4]))
def test_parse_body_is_a_request_or_a_400_naming_a_field(raw, model):
    try:
        parsed = P.parse_body(model, raw)
    except P.APIError as e:
        assert e.status == 400 and e.param and e.message.startswith(e.param), e.body()
        assert "\n" not in e.message
        json.dumps(e.body(), ensure_ascii=False).encode()           # an error body always encodes
    else:
        assert isinstance(parsed, model)
        json.dumps(parsed.model_dump(), ensure_ascii=False).encode()   # no lone surrogate got through


def _requests():
    base = {"messages": HI, "prompt": "Once upon"}
    good_model = st.sampled_from(["tiny", "lora"])
    fields = st.dictionaries(st.sampled_from(FIELDS), _json_values(LEAVES), max_size=3)
    small = st.fixed_dictionaries({"max_tokens": st.integers(1, 3), "ignore_eos": st.just(True)})
    return st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions"]), good_model, fields, small).map(
        lambda t: (t[0], {**base, "model": t[1], **t[3], **t[2]}))


@pytest.mark.timeout(600)
def test_endpoints_answer_hostile_fields_with_4xx_or_an_answer(served):
    """Valid requests with a few fields replaced by hostile values, over HTTP: a 4xx naming a field, or 200."""
    server, thread = served
    client = httpx.Client(base_url=thread.url, timeout=60)
    seen: Counter = Counter()

    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(request=_requests())
    def run(request):
        path, body = request
        r = client.post(path, content=_encode(body), headers={"Content-Type": "application/json"})
        seen[r.status_code] += 1
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            err = r.json()["error"]
            assert err["param"] and err["message"].startswith(err["param"].split(".")[0]), err
        elif body.get("stream") is True:
            assert r.text.rstrip().endswith("data: [DONE]"), r.text[-200:]
        else:
            assert r.json()["choices"], r.text
    run()
    client.close()
    print(f"\nhostile fields: {dict(seen)}")
    assert seen[200] > 0 and sum(n for s, n in seen.items() if 400 <= s < 500) > 0
    _assert_healthy(server, thread)
