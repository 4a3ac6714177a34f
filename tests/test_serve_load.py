"""Load: 8 adapters of different methods, 200 concurrent requests (40 of them malformed) against one server.

No answer is a 5xx; every good request is answered by the adapter it named, with exactly the greedy answer that
adapter gives alone (its own method's model and generate path; float64, so batching cannot flip a token).
Prints p50 / p95 latency and tokens/s (not asserted: speed belongs to benchmarks/serve_throughput.py).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections import Counter

import httpx
import openai
import pytest
import torch

from _serve_helpers import save_adapter, tiny_base
from tuneforge.methods import load_trained, method_generate, saved_method
from tuneforge.serving.server import ServeConfig, Server, ServerThread

ADAPTERS = [  # (name, method, sections, perturbation scale)
    ("lora-a", "lora", {"lora": {"r": 4, "dropout": 0.0}}, 0.3),
    ("lora-b", "lora", {"lora": {"r": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}, 0.5),
    ("lora-c", "lora", {"lora": {"r": 4, "dropout": 0.0, "use_rslora": True}}, 0.3),
    ("lora-d", "lora", {"lora": {"r": 2, "dropout": 0.0}}, 0.4),
    ("dora", "lora", {"lora": {"r": 4, "dropout": 0.0, "use_dora": True}}, 0.3),
    ("ia3", "ia3", {}, 4.0),
    ("bottleneck", "adapter", {"adapter": {"bottleneck": 8}}, 0.5),
    ("prefix", "prefix", {"prefix": {"num_virtual_tokens": 4}}, 1.0),
]
QUESTION = [{"role": "user", "content": "Which queue handles a double charge?"}]
TOKENS = 6
GOOD, BAD = 160, 40


def reference_answer(folder, prompt_ids) -> str:
    """Greedy answer of the adapter in ``folder`` (None: the base model) alone."""
    from tuneforge.models.loading import load_tokenizer

    model = tiny_base() if folder is None else load_trained(tiny_base(), folder).eval()
    out = method_generate(model, None if folder is None else saved_method(folder), input_ids=torch.tensor([prompt_ids]),
                          attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long), max_new_tokens=TOKENS,
                          min_new_tokens=TOKENS, do_sample=False, pad_token_id=0)
    return load_tokenizer("smollm2-135m-instruct").decode(out[0, len(prompt_ids):], skip_special_tokens=True)


MALFORMED = [
    b"{oops", b'{"model": "lora-a"}', b'{"model": "lora-a", "messages": "hi"}', b'{"model": "ghost", "messages": []}',
    json.dumps({"model": "nope", "messages": QUESTION}).encode(),
    json.dumps({"model": "lora-a", "messages": QUESTION, "max_tokens": "six"}).encode(),
    json.dumps({"model": "lora-a", "messages": QUESTION, "temperature": -1}).encode(),
    json.dumps({"model": "ia3", "messages": [{"role": "robot", "content": "x"}]}).encode(),
]


@pytest.mark.timeout(600)
def test_200_concurrent_requests_mixed_with_malformed(tmp_path, tiny_model_dir, tokenizer):
    folders = {}
    for seed, (name, method, sections, scale) in enumerate(ADAPTERS, start=21):
        save_adapter(tmp_path / name, method, sections, seed=seed, scale=scale)
        folders[name] = str(tmp_path / name)
    server = Server(ServeConfig(base=str(tiny_model_dir), base_name="tiny", adapters=folders, api_keys=["k"],
                                max_loaded_adapters=8), model=tiny_base(), tokenizer=tokenizer)
    prompt_ids = server.chat_prompt_ids(None, QUESTION)
    expected = {name: reference_answer(folder, prompt_ids) for name, folder in folders.items()}
    assert len(set(expected.values())) == len(expected), expected      # each adapter has its own signature

    async def run(url: str):
        ai = openai.AsyncOpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=300)
        raw = httpx.AsyncClient(timeout=300)
        names = [ADAPTERS[i % len(ADAPTERS)][0] for i in range(GOOD)]

        async def good(name: str):
            t0 = time.perf_counter()
            r = await ai.chat.completions.create(model=name, messages=QUESTION, max_tokens=TOKENS, temperature=0,
                                                 extra_body={"ignore_eos": True})
            return ("good", name, r, time.perf_counter() - t0)

        async def bad(i: int):
            headers = {"Authorization": "Bearer k"} if i % 5 else {"Authorization": "Bearer wrong"}
            r = await raw.post(url + "/v1/chat/completions", content=MALFORMED[i % len(MALFORMED)], headers=headers)
            return ("bad", i, r, 0.0)

        jobs = [good(n) for n in names] + [bad(i) for i in range(BAD)]
        order = torch.randperm(len(jobs), generator=torch.Generator().manual_seed(0)).tolist()
        t0 = time.perf_counter()
        results = await asyncio.gather(*(jobs[i] for i in order), return_exceptions=True)
        wall = time.perf_counter() - t0
        await raw.aclose()
        return results, wall

    with ServerThread(server.app) as thread:
        results, wall = asyncio.run(run(thread.url))
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    latencies = []
    for kind, key, response, latency in results:
        if kind == "good":
            assert response.model == key
            assert response.choices[0].message.content == expected[key], key
            latencies.append(latency)
        else:
            assert 400 <= response.status_code < 500, (key, response.status_code, response.text)
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert len(latencies) == GOOD
    assert server.engine.max_rows_seen > 1                    # requests were batched together
    q = statistics.quantiles(latencies, n=20)
    print(f"\n{GOOD} good + {BAD} malformed requests in {wall:.2f} s: p50 {statistics.median(latencies):.3f} s, "
          f"p95 {q[18]:.3f} s, {GOOD * TOKENS / wall:.1f} generated tokens/s, largest batch "
          f"{server.engine.max_rows_seen} rows")


POISON_WORD = " xyzzy"        # a prompt holding it fails in the engine (injected fault), in sampling or in decode


@pytest.mark.timeout(600)
def test_load_with_rows_that_fail_inside_the_engine(tmp_path, tiny_model_dir, tokenizer):
    """60 concurrent requests: 36 good ones (3 adapters and the base), 12 made to fail inside the engine (half in
    their sampling step, half in the batched decode forward, found by running the rows one by one), 12
    malformed. The good ones are answered 200 with exactly their answers alone; the failing ones 500 alone;
    the malformed ones 4xx; the engine ends empty and keeps serving."""
    names = ["lora-a", "ia3", "prefix"]
    folders = {}
    for seed, (name, method, sections, scale) in enumerate(ADAPTERS, start=21):
        if name in names:
            save_adapter(tmp_path / name, method, sections, seed=seed, scale=scale)
            folders[name] = str(tmp_path / name)
    server = Server(ServeConfig(base=str(tiny_model_dir), base_name="tiny", adapters=folders, max_batch=64),
                    model=tiny_base(), tokenizer=tokenizer)
    prompt_ids = server.chat_prompt_ids(None, QUESTION)
    expected = {name: reference_answer(folder, prompt_ids) for name, folder in folders.items()}
    expected["tiny"] = reference_answer(None, prompt_ids)
    poison = tokenizer(POISON_WORD, add_special_tokens=False)["input_ids"]
    long_prompt = "Tell me about queues" + " and refunds" * 30              # decode positions no good row reaches
    threshold = len(tokenizer(long_prompt)["input_ids"]) + 2
    assert threshold > len(prompt_ids) + TOKENS + 2
    injected = Counter()
    engine = server.engine
    forward, advance = engine.set.forward, engine._advance

    def faulty_forward(rows, **kw):
        ids = kw.get("input_ids")
        if ids is not None and ids.shape[1] == 1 and bool((kw["position_ids"] >= threshold).any()):
            injected["forward"] += 1
            raise RuntimeError("injected decode fault")
        return forward(rows, **kw)

    def faulty_advance(row, *args):
        if any(row.req.prompt_ids[i:i + len(poison)] == poison for i in range(len(row.req.prompt_ids))):
            injected["sample"] += 1
            raise RuntimeError("injected sampling fault")
        return advance(row, *args)
    engine.set.forward, engine._advance = faulty_forward, faulty_advance
    bad_bodies = [*MALFORMED[:6], b'{"model": "tiny", "prompt": "", "max_tokens": 3}',
                  json.dumps({"model": "tiny", "messages": QUESTION, "seed": 2 ** 80}).encode(),
                  b"[" * 10_000 + b"]" * 10_000, b'{"model": "tiny", "prompt": "\\ud800"}',
                  json.dumps({"model": "ia3", "prompt": [1, 2]}).encode(),
                  json.dumps({"model": "tiny", "messages": QUESTION, "top_p": 0}).encode()]

    async def run(url: str):
        client = httpx.AsyncClient(base_url=url, timeout=300)
        models = [*names, "tiny"]

        async def good(i: int):
            r = await client.post("/v1/chat/completions", json={
                "model": models[i % 4], "messages": QUESTION, "max_tokens": TOKENS, "temperature": 0,
                "ignore_eos": True})
            return ("good", models[i % 4], r)

        async def failing(i: int):
            prompt = f"Route this{POISON_WORD} ticket" if i % 2 else long_prompt
            r = await client.post("/v1/completions", json={"model": models[i % 4], "prompt": prompt,
                                                           "max_tokens": TOKENS, "ignore_eos": True})
            return ("failing", i, r)

        async def bad(i: int):
            path = "/v1/completions" if b"prompt" in bad_bodies[i] else "/v1/chat/completions"
            r = await client.post(path, content=bad_bodies[i], headers={"Content-Type": "application/json"})
            return ("bad", i, r)

        jobs = [good(i) for i in range(36)] + [failing(i) for i in range(12)] + [bad(i) for i in range(12)]
        order = torch.randperm(len(jobs), generator=torch.Generator().manual_seed(1)).tolist()
        results = await asyncio.gather(*(jobs[i] for i in order))
        await client.aclose()
        return results

    with ServerThread(server.app) as thread:
        results = asyncio.run(run(thread.url))
        engine.set.forward, engine._advance = forward, advance
        after = httpx.post(thread.url + "/v1/chat/completions", json={
            "model": "ia3", "messages": QUESTION, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True})
    for kind, key, r in results:
        if kind == "good":
            assert r.status_code == 200, (key, r.text)
            assert r.json()["choices"][0]["message"]["content"] == expected[key], key
        elif kind == "failing":
            assert r.status_code == 500, (key, r.text)
            assert "injected" in r.json()["error"]["message"] and "not affected" in r.json()["error"]["message"]
        else:
            assert 400 <= r.status_code < 500, (key, r.status_code, r.text)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert injected["forward"] >= 6 and injected["sample"] >= 6, injected
    assert engine.max_rows_seen > 4
    assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == expected["ia3"]
    assert engine.running == 0 and engine.waiting == 0 and server.in_flight == 0
