"""``tuneforge serve`` over HTTP with the official ``openai`` client: endpoints, streaming, chat templates,
keys, limits and bad input (always 4xx, never 5xx), admin load/unload, metrics."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from _serve_helpers import ADMIN, USER, keyed_server, save_adapter, slow_steps, tiny_base
from tuneforge.serving.server import ServeConfig, Server, ServerThread

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-root")
    save_adapter(root / "lora", "lora", {"lora": {"r": 4, "dropout": 0.0}}, seed=11)
    save_adapter(root / "ia3", "ia3", {}, seed=12, scale=2.0)
    save_adapter(root / "extra", "lora", {"lora": {"r": 2, "dropout": 0.0}}, seed=13)
    return root


def make_server(tiny_model_dir, tokenizer, folders, **overrides) -> Server:
    return keyed_server(tiny_model_dir, tokenizer, folders, ["lora", "ia3"], **overrides)


@pytest.fixture(scope="module")
def served(tiny_model_dir, tokenizer, folders):
    server = make_server(tiny_model_dir, tokenizer, folders)
    with ServerThread(server.app) as thread:
        yield server, thread


def client(thread, key=USER) -> openai.OpenAI:
    return openai.OpenAI(base_url=thread.url + "/v1", api_key=key, max_retries=0, timeout=60)


def post(thread, path, body=None, key=USER, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(thread.url + path, content=raw, headers={**headers, "Content-Type": "application/json"},
                          timeout=60)
    return httpx.post(thread.url + path, json=body, headers=headers, timeout=60)


def test_models_lists_base_and_adapters_with_parent(served):
    _, thread = served
    models = {m.id: m for m in client(thread).models.list().data}
    assert set(models) >= {"tiny", "lora", "ia3"}
    assert models["lora"].parent == "tiny" and models["ia3"].parent == "tiny" and models["tiny"].parent is None


def test_chat_and_completions_name_the_adapter_that_answered(served):
    server, thread = served
    c = client(thread)
    answers = {}
    for model in ("tiny", "lora", "ia3"):
        r = c.chat.completions.create(model=model, messages=HI, max_tokens=6, temperature=0, extra_body={
            "ignore_eos": True})
        assert r.model == model and r.usage.completion_tokens == 6
        answers[model] = r.choices[0].message.content
        # the same answer as the engine gives the same prompt tokens directly
        from tuneforge.serving.engine import Request

        ids = server.chat_prompt_ids(None if model == "tiny" else model, HI)
        assert r.usage.prompt_tokens == len(ids)
        text, _, _ = server.engine.generate(Request(ids, None if model == "tiny" else model, 6, ignore_eos=True))
        assert text == answers[model]
    assert len(set(answers.values())) == 3, answers            # each adapter answers differently
    r = c.completions.create(model="lora", prompt="Once upon", max_tokens=4, temperature=0,
                             extra_body={"ignore_eos": True})
    assert r.model == "lora" and r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"


def test_streaming_chunks_arrive_before_the_answer_is_complete(served):
    server, thread = served
    with slow_steps(server, 0.02):
        stream = client(thread).chat.completions.create(model="lora", messages=HI, max_tokens=30, temperature=0,
                                                        stream=True, stream_options={"include_usage": True},
                                                        extra_body={"ignore_eos": True})
        pieces, running_at_first, usage, finish = [], None, None, None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    if running_at_first is None:
                        running_at_first = server.engine.running
                    pieces.append(choice.delta.content)
                finish = choice.finish_reason or finish
    assert running_at_first == 1, "the first chunk came only after generation had finished"
    assert len(pieces) > 5 and finish == "length" and usage.completion_tokens == 30
    full = client(thread).chat.completions.create(model="lora", messages=HI, max_tokens=30, temperature=0,
                                                  extra_body={"ignore_eos": True})
    assert "".join(pieces) == full.choices[0].message.content


def test_chat_template_saved_with_the_run_is_used(tiny_model_dir, tokenizer, folders, tmp_path):
    """A run folder carries its own chat template: the server's prompt tokens equal training's for it."""
    import shutil

    from transformers import AutoTokenizer

    from tuneforge.data.formats import Example
    from tuneforge.data.rendering import tokenize_example

    run = tmp_path / "run"
    shutil.copytree(folders / "lora", run)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] | upper }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>ASSISTANT\n{% endif %}")
    tok.save_pretrained(run)
    server = make_server(tiny_model_dir, tokenizer, folders)
    server.registry.register("run", run)
    msgs = [{"role": "system", "content": "Route tickets."}, {"role": "user", "content": "I was charged twice"}]
    served_ids = server.chat_prompt_ids("run", msgs)
    trained = tokenize_example(Example(messages=[*msgs, {"role": "assistant", "content": "billing"}]),
                               AutoTokenizer.from_pretrained(run)).input_ids
    assert trained[:len(served_ids)] == served_ids
    assert tokenizer.decode(served_ids).endswith("<|im_start|>ASSISTANT\n")
    assert served_ids != server.chat_prompt_ids(None, msgs)     # the base template differs: it was not used


def test_keys_401_403_in_openai_error_shape(served):
    _, thread = served
    for key in (None, "wrong"):
        r = post(thread, "/v1/chat/completions", {"model": "tiny", "messages": HI}, key=key)
        assert r.status_code == 401
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.AuthenticationError):
        client(thread, "wrong").models.list()
    r = post(thread, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "extra"}, key=USER)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert post(thread, "/v1/unload_lora_adapter", {"lora_name": "lora"}, key=None).status_code == 401


BAD_BODIES = [
    (b"{not json", "body"),
    (b"[1, 2]", "body"),
    (json.dumps({"messages": HI}).encode(), "model"),
    (json.dumps({"model": "tiny"}).encode(), "messages"),
    (json.dumps({"model": "tiny", "messages": []}).encode(), "messages"),
    (json.dumps({"model": "tiny", "messages": "hi"}).encode(), "messages"),
    (json.dumps({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}).encode(), "messages.0.role"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user"}]}).encode(), "messages.0.content"),
    (json.dumps({"model": "tiny", "messages": HI, "max_tokens": "5"}).encode(), "max_tokens"),
    (json.dumps({"model": "tiny", "messages": HI, "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({"model": "tiny", "messages": HI, "temperature": "hot"}).encode(), "temperature"),
    (json.dumps({"model": "tiny", "messages": HI, "temperature": 7}).encode(), "temperature"),
    (json.dumps({"model": "tiny", "messages": HI, "stream": "yes"}).encode(), "stream"),
    (json.dumps({"model": "tiny", "messages": HI, "n": 3}).encode(), "n"),
    (json.dumps({"model": "tiny", "messages": HI, "stop": ["a", "b", "c", "d", "e"]}).encode(), "stop"),
    (json.dumps({"model": 5, "messages": HI}).encode(), "model"),
    (json.dumps({"model": "tiny", "messages": HI, "logprobs": True}).encode(), "logprobs"),
    (json.dumps({"model": "nope", "messages": HI}).encode(), "model"),
    (json.dumps({"model": "../lora", "messages": HI}).encode(), "model"),
    (json.dumps({"model": "tiny", "messages": HI, "max_tokens": 10**6}).encode(), "max_tokens"),
]


@pytest.mark.parametrize("raw,param", BAD_BODIES, ids=[p for _, p in BAD_BODIES])
def test_bad_requests_are_4xx_naming_the_field(served, raw, param):
    _, thread = served
    r = post(thread, "/v1/chat/completions", raw=raw)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert err["param"] == param and param.split(".")[0] in err["message"], err


def test_bad_completions_requests(served):
    _, thread = served
    for body, param in (({"model": "tiny"}, "prompt"), ({"model": "tiny", "prompt": 5}, "prompt"),
                        ({"model": "tiny", "prompt": []}, "prompt"), ({"model": "tiny", "prompt": "x", "echo": 1},
                                                                      "echo")):
        r = post(thread, "/v1/completions", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_limits_input_tokens_body_size_concurrency(tiny_model_dir, tokenizer, folders):
    server = make_server(tiny_model_dir, tokenizer, folders, max_input_tokens=40, max_output_tokens=20,
                         max_body_bytes=4096, max_concurrent=1)
    with ServerThread(server.app) as thread:
        long = [{"role": "user", "content": "word " * 100}]
        r = post(thread, "/v1/chat/completions", {"model": "tiny", "messages": long})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        r = post(thread, "/v1/chat/completions", {"model": "tiny", "messages": HI, "max_tokens": 21})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        r = post(thread, "/v1/chat/completions", raw=b'{"model": "tiny", "messages": [], "x": "' + b"a" * 5000 + b'"}')
        assert r.status_code == 413
        with slow_steps(server, 0.05):
            first = threading.Thread(target=lambda: post(thread, "/v1/chat/completions", {
                "model": "tiny", "messages": HI, "max_tokens": 20, "ignore_eos": True}))
            first.start()
            while server.in_flight == 0:
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError):
                client(thread).chat.completions.create(model="tiny", messages=HI, max_tokens=2)
            first.join(60)
        assert client(thread).chat.completions.create(model="tiny", messages=HI, max_tokens=2).model == "tiny"


def test_admin_load_unload_and_path_root(tiny_model_dir, tokenizer, folders, tmp_path):
    server = make_server(tiny_model_dir, tokenizer, folders)
    with ServerThread(server.app) as thread:
        c = client(thread)
        for path in ("../x", str(tmp_path), "/etc"):
            r = post(thread, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path}, key=ADMIN)
            assert r.status_code == 403 and r.json()["error"]["param"] == "lora_path", r.text
        (folders / "not-an-adapter").mkdir(exist_ok=True)
        r = post(thread, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "not-an-adapter"}, key=ADMIN)
        assert r.status_code == 400 and "no adapter_config.json" in r.json()["error"]["message"]
        r = post(thread, "/v1/load_lora_adapter", {"lora_name": "extra", "lora_path": "extra"}, key=ADMIN)
        assert r.status_code == 200, r.text
        assert "extra" in {m.id for m in c.models.list().data}
        assert c.chat.completions.create(model="extra", messages=HI, max_tokens=2).model == "extra"
        r = post(thread, "/v1/load_lora_adapter", {"lora_name": "extra", "lora_path": "extra"}, key=ADMIN)
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"
        # unloading waits for the adapter's in-flight request, which completes
        with slow_steps(server, 0.02):
            result = {}
            t = threading.Thread(target=lambda: result.update(r=c.chat.completions.create(
                model="extra", messages=HI, max_tokens=15, extra_body={"ignore_eos": True})))
            t.start()
            while server.engine.running == 0:
                time.sleep(0.005)
            r = post(thread, "/v1/unload_lora_adapter", {"lora_name": "extra"}, key=ADMIN)
            t.join(60)
        assert r.status_code == 200 and result["r"].usage.completion_tokens == 15
        assert "extra" not in {m.id for m in c.models.list().data} and "extra" not in server.registry.loaded
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model="extra", messages=HI, max_tokens=2)
        assert post(thread, "/v1/unload_lora_adapter", {"lora_name": "extra"}, key=ADMIN).status_code == 404


def test_package_for_another_base_is_refused_and_server_keeps_serving(tiny_model_dir, tokenizer, folders):
    import shutil

    pkg = folders / "pkg-other-base"
    if not pkg.exists():
        shutil.copytree(folders / "extra", pkg)
        (pkg / "tuneforge.json").write_text(json.dumps({"base_model": {"name": "other", "sha256": "ab" * 32}}))
    server = make_server(tiny_model_dir, tokenizer, folders)
    with ServerThread(server.app) as thread:
        r = post(thread, "/v1/load_lora_adapter", {"lora_name": "pkg", "lora_path": "pkg-other-base"}, key=ADMIN)
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert "ab" * 32 in message and "\n" not in message
        assert client(thread).chat.completions.create(model="lora", messages=HI, max_tokens=2).model == "lora"


def test_metrics_and_health(served):
    server, thread = served
    client(thread).chat.completions.create(model="ia3", messages=HI, max_tokens=3, extra_body={"ignore_eos": True})
    assert httpx.get(thread.url + "/health").json()["status"] == "ok"
    text = httpx.get(thread.url + "/metrics").text
    for line in ('tuneforge_requests_total{model="ia3",status="length"}',
                 'tuneforge_generation_tokens_total{model="ia3"}',
                 'tuneforge_time_to_first_token_seconds_count{model="ia3"}',
                 'tuneforge_request_latency_seconds_count{model="ia3"}', "tuneforge_loaded_adapters"):
        assert line in text, line
    value = float(next(x for x in text.splitlines()
                       if x.startswith('tuneforge_generation_tokens_total{model="ia3"}')).split()[-1])
    assert value >= 3


def test_client_that_goes_away_frees_its_row_and_slot(served):
    """A stream closed by the client is cancelled: its row leaves the batch and it no longer counts as in flight."""
    server, thread = served
    with slow_steps(server, 0.02):
        body = {"model": "lora", "messages": HI, "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", thread.url + "/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {USER}"}, timeout=60) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 4:
                    break
        deadline = time.time() + 30
        while (server.engine.running or server.in_flight) and time.time() < deadline:
            time.sleep(0.02)
    assert server.engine.running == 0 and server.in_flight == 0


def test_admin_endpoints_are_off_without_an_admin_key(tiny_model_dir, tokenizer, folders):
    server = Server(ServeConfig(base=str(tiny_model_dir), base_name="tiny", adapter_root=str(folders)),
                    model=tiny_base(), tokenizer=tokenizer)
    with ServerThread(server.app) as thread:
        r = post(thread, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "extra"}, key="anything")
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
        # no user keys configured: the API is open (loopback use)
        answer = client(thread, "whatever").chat.completions.create(model="tiny", messages=HI, max_tokens=1)
        assert answer.model == "tiny"


def test_serve_config_yaml_and_flags(tmp_path, folders, monkeypatch):
    from tuneforge.cli import build_parser
    from tuneforge.serving.commands import serve_config_from_args

    (tmp_path / "serve.yaml").write_text(f"base: tiny\nadapters:\n  lora: {folders / 'lora'}\npinned: [lora]\n"
                                         "max_batch: 4\napi_keys: [a]\n")
    monkeypatch.setenv("TUNEFORGE_API_KEYS", "b,c")
    args = build_parser().parse_args(["serve", "--config", str(tmp_path / "serve.yaml"), "--adapter",
                                      f"ia3={folders / 'ia3'}", "--max-batch", "8", "--api-key", "d",
                                      "--graceful-timeout", "5"])
    config = serve_config_from_args(args)
    assert config.base == "tiny" and config.max_batch == 8 and config.pinned == ["lora"]
    assert config.graceful_timeout == 5
    assert config.adapters == {"lora": str(folders / "lora"), "ia3": str(folders / "ia3")}
    assert config.api_keys == ["a", "d", "b", "c"]
    (tmp_path / "bad.yaml").write_text("base: tiny\nmax_bacth: 4\n")
    with pytest.raises(ValueError, match="max_bacth"):
        serve_config_from_args(build_parser().parse_args(["serve", "--config", str(tmp_path / "bad.yaml")]))


@pytest.mark.integration
def test_real_model_answers_as_tuneforge_generate(tmp_path):
    """SmolLM2-135M-Instruct served with a LoRA adapter: the base and the adapter answer over HTTP exactly as
    `tuneforge generate`'s path (LoadedModel.generate: same chat template, greedy) answers alone."""
    from peft import LoraConfig, get_peft_model

    from tuneforge.models.loading import load_model
    from tuneforge.runs import LoadedModel, load_base

    torch = pytest.importorskip("torch")
    base = load_base("smollm2-135m-instruct", dtype="fp32", device="cpu")
    torch.manual_seed(0)
    lora = get_peft_model(load_model("smollm2-135m-instruct"), LoraConfig(r=8, target_modules=["q_proj", "v_proj"],
                                                                           init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    question = [{"role": "user", "content": "What is the capital of France?"}]
    expected = {"lora": LoadedModel(lora.eval(), base.tokenizer).generate(question, max_new_tokens=12)}
    expected["smollm2"] = base.generate(question, max_new_tokens=12)
    server = Server(ServeConfig(base="smollm2-135m-instruct", base_name="smollm2",
                                adapters={"lora": str(tmp_path / "lora")}), model=base.model, tokenizer=base.tokenizer)
    with ServerThread(server.app) as thread:
        c = openai.OpenAI(base_url=thread.url + "/v1", api_key="none", max_retries=0, timeout=300)
        for model, answer in expected.items():
            r = c.chat.completions.create(model=model, messages=question, max_tokens=12, temperature=0)
            assert r.model == model and r.choices[0].message.content.strip() == answer, (model, answer)
    assert expected["lora"] != expected["smollm2"]
