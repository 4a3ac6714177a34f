"""``tuneforge serve`` under hostile input and faults (issue #31): one bad row fails alone.

* bad input is refused with a 4xx naming the field before it reaches the batch (empty prompts, seeds torch
  cannot take, token ids outside the vocabulary, JSON nested too deep, lone surrogates, NUL bytes);
* a fault while computing one row (prefill, decode, sampling, detokenization) fails that request alone, and
  the other rows of the batch finish with exactly the tokens they get alone;
* a client that closes its socket cancels its request, streaming or not, and frees its concurrency slot;
* the adapter root checks every file of an adapter folder, not only the folder.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time

import httpx
import pytest

from _serve_helpers import ADMIN, USER, keyed_server, save_adapter, slow_steps, tiny_base
from tuneforge.serving import engine as engine_module
from tuneforge.serving.adapters import AdapterRegistry, AdapterSet
from tuneforge.serving.engine import Engine, Request
from tuneforge.serving.server import Server, ServerThread

HI = [{"role": "user", "content": "hi"}]
PROMPTS = [[1, 504, 2520, 30, 1004, 28], [1, 9690, 314, 253, 5738, 30, 1234, 42, 7, 99, 100], [1, 18, 19],
           [1, 42, 43, 44, 45, 46, 47]]
POISON = 4242                    # a prompt token the fault injection below reacts to
STEPS = 6


# ------------------------------------------------------------------------------------------ the engine


@pytest.fixture(scope="module")
def engine(tokenizer):
    eng = Engine(AdapterRegistry(AdapterSet(tiny_base())), tokenizer, max_batch=8).start()
    yield eng
    eng.stop()


def alone(engine, prompt, **kw):
    return engine.generate(Request(list(prompt), max_tokens=STEPS, ignore_eos=True, **kw))


@pytest.mark.parametrize("kwargs,param", [
    ({"prompt_ids": []}, "prompt"),
    ({"seed": 2 ** 80, "temperature": 0.5}, "seed"),
    ({"seed": -2 ** 63 - 1, "temperature": 0.5}, "seed"),
    ({"prompt_ids": [1, 10 ** 6]}, "prompt"),
    ({"prompt_ids": [1, -3]}, "prompt"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": math.nan}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"stop": [""]}, "stop"),
])
def test_engine_refuses_bad_requests_before_admission(engine, kwargs, param):
    req = Request(**{"prompt_ids": [1, 2, 3], **kwargs})
    with pytest.raises(engine_module.InvalidRequest) as e:
        engine.submit(req)
    assert e.value.param == param and param in str(e.value)
    assert engine.waiting == 0 and engine.running == 0


def _run_together(engine, reqs):
    """Submit ``reqs`` while the engine waits, so that they are admitted (and prefilled) in one step."""
    results: dict[int, object] = {}

    def run(i, req):
        try:
            results[i] = engine.generate(req, timeout=60)
        except RuntimeError as e:
            results[i] = e
    threads = [threading.Thread(target=run, args=(i, r)) for i, r in enumerate(reqs)]

    def queue_all():                # on the engine thread, between two steps: all are admitted together
        for t in threads:
            t.start()
        while engine.waiting < len(reqs):
            time.sleep(0.005)
    engine.call(queue_all)
    for t in threads:
        t.join(60)
    return [results[i] for i in range(len(reqs))]


@pytest.mark.parametrize("stage", ["prefill", "decode", "detokenize", "sample"])
def test_fault_in_one_row_fails_it_alone(engine, stage, monkeypatch):
    """A row whose computation raises (in the batched prefill, the batched decode forward, its sampling or its
    detokenization) fails alone with an error; the other rows finish with exactly their tokens alone."""
    expected = [alone(engine, p) for p in PROMPTS]
    expected.append(alone(engine, PROMPTS[0], temperature=0.8, seed=7))
    poison_prompt = [1, POISON] + list(range(100, 138))          # 40 tokens: decode positions >= 40 are its own
    poison = Request(poison_prompt, max_tokens=STEPS, ignore_eos=True, temperature=0.9 if stage == "sample" else 0)
    forward = engine.set.forward

    def faulty_forward(rows, **kw):
        ids = kw.get("input_ids")
        if stage == "prefill" and ids is not None and ids.shape[1] > 1 and bool((ids == POISON).any()):
            raise RuntimeError("injected prefill fault")
        if stage == "decode" and ids is not None and ids.shape[1] == 1 and bool((kw["position_ids"] >= 42).any()):
            raise RuntimeError("injected decode fault")
        return forward(rows, **kw)
    monkeypatch.setattr(engine.set, "forward", faulty_forward)
    if stage == "detokenize":
        detok = engine._detokenize

        def faulty_detok(row, final=False):
            if row.req is poison and len(row.tokens) == 3:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected detokenize fault")
            return detok(row, final)
        monkeypatch.setattr(engine, "_detokenize", faulty_detok)
    if stage == "sample":           # the poison's sampler (its seed: 99) raises
        import torch

        multinomial = torch.multinomial

        def faulty_multinomial(probs, n, generator=None):
            if generator is not None and generator.initial_seed() == 99:
                raise RuntimeError("injected sampling fault")
            return multinomial(probs, n, generator=generator)
        poison.seed = 99
        monkeypatch.setattr(torch, "multinomial", faulty_multinomial)
    good = [Request(list(p), max_tokens=STEPS, ignore_eos=True) for p in PROMPTS]
    good.append(Request(list(PROMPTS[0]), max_tokens=STEPS, ignore_eos=True, temperature=0.8, seed=7))
    results = _run_together(engine, [*good[:2], poison, *good[2:]])
    failed = results.pop(2)
    assert isinstance(failed, RuntimeError) and "injected" in str(failed), failed
    assert results == expected
    assert engine.running == 0 and engine.waiting == 0
    monkeypatch.undo()
    assert alone(engine, PROMPTS[1]) == expected[1]                 # the engine keeps serving


# -------------------------------------------------------------------------------------------- the server



@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening-root")
    save_adapter(root / "lora", "lora", {"lora": {"r": 4, "dropout": 0.0}}, seed=11)
    return root


def make_server(tiny_model_dir, tokenizer, root, **overrides) -> Server:
    return keyed_server(tiny_model_dir, tokenizer, root, ["lora"], **overrides)


@pytest.fixture(scope="module")
def served(tiny_model_dir, tokenizer, root):
    server = make_server(tiny_model_dir, tokenizer, root)
    with ServerThread(server.app) as thread:
        yield server, thread


def post(url, path, body=None, key=USER, raw=None, timeout=60):
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(url + path, content=content, headers=headers, timeout=timeout)


def chat(url, **kw):
    return post(url, "/v1/chat/completions", {"model": "lora", "messages": HI, "max_tokens": 8, "temperature": 0,
                                              "ignore_eos": True, **kw})


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"model": "tiny", "prompt": "", "max_tokens": 3}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": ["ok", ""], "max_tokens": 3}, "prompt"),
    ("/v1/chat/completions", {"model": "tiny", "messages": HI, "seed": 2 ** 80}, "seed"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "seed": -2 ** 70}, "seed"),
])
def test_bad_row_is_4xx_and_the_batch_goes_on(served, path, body, param):
    """The issue's repro: an empty prompt (or a seed of 2**80) in a busy batch answered 500 to every request in it."""
    server, thread = served
    expected = chat(thread.url).json()["choices"][0]["message"]["content"]
    with slow_steps(server, 0.01):
        answers: list = []
        threads = [threading.Thread(target=lambda: answers.append(chat(thread.url))) for _ in range(3)]
        for t in threads:
            t.start()
        while server.engine.running == 0:
            time.sleep(0.005)
        r = post(thread.url, path, body)
        for t in threads:
            t.join(60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(param), err
    assert [a.status_code for a in answers] == [200] * 3
    assert all(a.json()["choices"][0]["message"]["content"] == expected for a in answers)


HOSTILE = [
    (b"[" * 10_000 + b"]" * 10_000, "body"),
    (b'{"model": "tiny", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", "body"),
    (b'{"model": "tiny", "prompt": "\\ud800 lone"}', "prompt"),
    (b'{"model": "tiny", "prompt": ["ok", "\\udfff"]}', "prompt.1"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud83d"}]}', "messages.0.content"),
    (b'{"model": "tiny", "prompt": "x", "stop": "\\udc80"}', "stop"),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "body"),
    (b'{"model": "tiny", "prompt": "x", "temperature": NaN}', "temperature"),
    (b'{"model": "tiny", "prompt": "x", "top_p": Infinity}', "top_p"),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": 1e999}', "max_tokens"),
    (b'\xff\xfe{"model": 1}', "body"),
]


@pytest.mark.parametrize("raw,param", HOSTILE, ids=[f"{p}-{i}" for i, (_, p) in enumerate(HOSTILE)])
def test_malformed_json_is_400_not_500(served, raw, param):
    _, thread = served
    path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
    r = post(thread.url, path, raw=raw)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("lora_path", ["lora\x00", "\x00/etc/passwd", "a" * 5000, "\ud800", "lora/" + "x/" * 3000],
                         ids=["nul", "nul-absolute", "too-long", "lone-surrogate", "too-deep"])
def test_hostile_lora_path_is_4xx(served, lora_path):
    _, thread = served
    raw = json.dumps({"lora_name": "x", "lora_path": lora_path}).encode()
    r = post(thread.url, "/v1/load_lora_adapter", raw=raw, key=ADMIN)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["param"] == "lora_path", r.text


def test_adapter_root_refuses_a_file_linked_outside(tiny_model_dir, tokenizer, root, tmp_path):
    """A folder inside the root whose weights are a symbolic link to a file outside it is refused, naming the file."""
    import shutil

    outside = tmp_path / "outside"
    shutil.copytree(root / "lora", outside)
    evil = root / "evil"
    evil.mkdir(exist_ok=True)
    shutil.copy(root / "lora" / "adapter_config.json", evil / "adapter_config.json")
    (evil / "adapter_model.safetensors").unlink(missing_ok=True)
    (evil / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    sub = root / "evil-dir"
    if not sub.exists():
        sub.symlink_to(outside, target_is_directory=True)
    server = make_server(tiny_model_dir, tokenizer, root)
    with ServerThread(server.app) as thread:
        for name in ("evil", "evil-dir"):
            r = post(thread.url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": name}, key=ADMIN)
            assert r.status_code == 403, r.text
            err = r.json()["error"]
            assert err["param"] == "lora_path" and err["code"] == "path_outside_root", err
        assert "adapter_model.safetensors" in post(thread.url, "/v1/load_lora_adapter", {
            "lora_name": "evil", "lora_path": "evil"}, key=ADMIN).json()["error"]["message"]
        assert server.registry.get("evil") is None
        # a link that stays inside the root is fine
        inside = root / "linked-inside"
        if not inside.exists():
            inside.mkdir()
            (inside / "adapter_config.json").symlink_to(root / "lora" / "adapter_config.json")
            (inside / "adapter_model.safetensors").symlink_to(root / "lora" / "adapter_model.safetensors")
        r = post(thread.url, "/v1/load_lora_adapter", {"lora_name": "inside", "lora_path": "linked-inside"}, key=ADMIN)
        assert r.status_code == 200, r.text


def _raw_request(port: int, body: dict) -> socket.socket:
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {USER}\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def test_abandoned_non_streaming_request_frees_its_slot(tiny_model_dir, tokenizer, root):
    """The issue's repro: a non-streaming request whose client closed the socket kept generating to max_tokens and
    held its slot (every new request 429). Now it is cancelled within a few decode steps."""
    server = make_server(tiny_model_dir, tokenizer, root, max_concurrent=1)
    with ServerThread(server.app) as thread, slow_steps(server, 0.02):
        sock = _raw_request(thread.port, {"model": "lora", "messages": HI, "max_tokens": 1000, "ignore_eos": True})
        while server.engine.running == 0:
            time.sleep(0.005)
        assert chat(thread.url).status_code == 429                  # the slot is taken
        sock.close()
        t0 = time.perf_counter()
        while (server.engine.running or server.in_flight) and time.perf_counter() - t0 < 20:
            time.sleep(0.01)
        freed = time.perf_counter() - t0
        assert server.engine.running == 0 and server.in_flight == 0
        assert freed < 2.0, f"freed after {freed:.1f} s (1000 tokens take 20 s)"
        assert chat(thread.url).status_code == 200
    text = server.metrics.render().decode()
    assert 'status="cancelled"' in text


@pytest.mark.parametrize("sampling", [{"top_p": 1e-300}, {"temperature": 1e-300}, {"temperature": 2, "top_p": 1e-9}],
                         ids=["top_p-below-float32", "temperature-tiny", "top_p-tiny"])
def test_extreme_sampling_values_answer(served, sampling):
    """Found by the schema fuzzing: a top_p below float32's range kept no token, and a temperature near 0
    overflowed the logits (multinomial refused both: a 500). Both now sample the likeliest token."""
    _, thread = served
    greedy = chat(thread.url).json()["choices"][0]["message"]["content"]
    r = chat(thread.url, seed=3, **sampling)
    assert r.status_code == 200, r.text
    if "top_p" in sampling or sampling["temperature"] < 1e-6:
        assert r.json()["choices"][0]["message"]["content"] == greedy
