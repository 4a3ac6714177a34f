"""Prefix caching: a prompt that starts with cached blocks gets the logits a full prefill gives (tiny float64 base,
1e-9), its usage counts the cached tokens, requests admitted together share the prefix computed once, adapters
never share entries, and the cache stays within its budget, evicting leaves before their roots."""

from __future__ import annotations

import pytest
import torch

from _serve_helpers import save_adapter, tiny_base
from tuneforge.serving.adapters import AdapterRegistry, AdapterSet
from tuneforge.serving.engine import Engine, Request
from tuneforge.serving.prefix_cache import BLOCK, PrefixCache

SHARED = list(range(100, 100 + 3 * BLOCK + 5))          # 3 whole blocks and 5 tokens: what prompts share
TAILS = [[7, 8, 9], [11, 12, 13, 14, 15, 16, 17], [21], [31, 32, 33, 34]]


def kv(n: int, layers: int = 2, fill: float = 0.0) -> torch.Tensor:
    return torch.full((layers, 2, 1, n, 4), fill)


# ------------------------------------------------------------------------------------------ the cache itself

def test_match_is_whole_blocks_and_never_the_last_token():
    cache = PrefixCache(1 << 20)
    ids = list(range(2 * BLOCK))
    cache.insert("base", ids, kv(len(ids)))
    assert len(cache) == 2
    assert cache.match("base", ids) == BLOCK                  # the last token is computed: its logits answer
    assert cache.match("base", ids + [5]) == 2 * BLOCK
    assert cache.match("base", ids[:BLOCK] + [999] * BLOCK + [1]) == BLOCK
    assert cache.match("other", ids + [5]) == 0              # another adapter's entries are not this one's
    assert cache.match("base", [999] + ids) == 0


def test_lookup_returns_the_inserted_entries_in_order_and_counts():
    cache = PrefixCache(1 << 20)
    ids = list(range(3 * BLOCK))
    entries = torch.arange(3 * BLOCK, dtype=torch.float32).view(1, 1, 1, -1, 1).expand(2, 2, 1, -1, 4).clone()
    cache.insert("base", ids, entries)
    n, got = cache.lookup("base", ids + [1, 2])
    assert n == 3 * BLOCK and torch.equal(got, entries)
    assert (cache.queried_tokens, cache.hit_tokens) == (3 * BLOCK + 1, 3 * BLOCK)
    cache.lookup("base", ids, count=False)
    assert cache.queried_tokens == 3 * BLOCK + 1


def test_insert_from_a_cached_start_keeps_the_held_blocks():
    cache = PrefixCache(1 << 20)
    ids = list(range(3 * BLOCK))
    cache.insert("base", ids[:BLOCK], kv(BLOCK, fill=1.0))
    cache.insert("base", ids, kv(2 * BLOCK, fill=2.0), start=BLOCK)   # entries of the tokens after the first block
    n, got = cache.lookup("base", ids + [0])
    assert n == 3 * BLOCK
    assert got[..., :BLOCK, :].eq(1).all() and got[..., BLOCK:, :].eq(2).all()


def test_a_hash_collision_never_serves_the_wrong_entries():
    cache = PrefixCache(1 << 20)
    ids = list(range(BLOCK))
    cache.insert("base", ids, kv(BLOCK))
    (block,) = cache._blocks.values()
    block.tokens = tuple(reversed(block.tokens))            # as if another block's tokens had hashed the same
    assert cache.match("base", ids + [1]) == 0


def test_budget_evicts_least_recent_leaves_first():
    one = kv(BLOCK).numel() * 4
    cache = PrefixCache(3 * one)
    a = list(range(2 * BLOCK))
    cache.insert("base", a, kv(2 * BLOCK))                  # root a0, leaf a1
    b = list(range(1000, 1000 + BLOCK))
    cache.insert("base", b, kv(BLOCK))
    cache.lookup("base", a + [0])                           # a's chain is now the most recent, its root last
    cache.insert("base", list(range(2000, 2000 + BLOCK)), kv(BLOCK))
    assert cache.bytes == 3 * one and len(cache) == 3
    assert cache.match("base", b + [0]) == 0                # b went: least recently used
    assert cache.match("base", a + [0]) == 2 * BLOCK
    cache.insert("base", list(range(3000, 3000 + BLOCK)), kv(BLOCK))
    assert cache.match("base", a + [0]) == BLOCK            # a's leaf went before its root


def test_off_holds_nothing_and_drop_owners_forgets():
    off = PrefixCache(0)
    off.insert("base", list(range(BLOCK)), kv(BLOCK))
    assert len(off) == 0 and off.lookup("base", list(range(BLOCK + 1))) == (0, None)
    cache = PrefixCache(1 << 20)
    cache.insert("tf1", list(range(BLOCK)), kv(BLOCK))
    cache.insert("base", list(range(BLOCK)), kv(BLOCK))
    cache.drop_owners({"base"})
    assert len(cache) == 1 and cache.bytes == kv(BLOCK).numel() * 4


# ------------------------------------------------------------------------------------------ in the engine

@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix_adapters")
    save_adapter(root / "a", "lora", {"lora": {"r": 4, "dropout": 0.0}}, seed=1)
    save_adapter(root / "b", "lora", {"lora": {"r": 4, "dropout": 0.0}}, seed=2)
    return root


def make_engine(tokenizer, adapters, cache_bytes: int) -> Engine:
    registry = AdapterRegistry(AdapterSet(tiny_base()))
    registry.register("a", adapters / "a")
    registry.register("b", adapters / "b")
    return Engine(registry, tokenizer, prefix_cache_bytes=cache_bytes)


def run_together(engine: Engine, reqs: list[Request]) -> list[tuple[str, str, dict]]:
    """Submit ``reqs`` before the engine starts (one admission: prefilled together), then collect them."""
    import queue

    boxes = []
    for req in reqs:
        box: queue.Queue = queue.Queue()
        req.sink = box.put
        req.keep_logits = True
        engine.submit(req)
        boxes.append(box)
    engine.start()
    out = []
    for box in boxes:
        text = []
        while (ev := box.get(timeout=120))[0] == "token":
            text.append(ev[1])
        assert ev[0] == "done", ev
        out.append(("".join(text), ev[1], ev[2]))
    engine.stop()
    return out


def requests(adapter=None) -> list[Request]:
    return [Request(SHARED + tail, adapter=adapter, max_tokens=6, ignore_eos=True) for tail in TAILS]


@pytest.mark.parametrize("adapter", [None, "a"])
def test_requests_admitted_together_compute_the_shared_prefix_once(tokenizer, adapters, adapter):
    cached = make_engine(tokenizer, adapters, 1 << 26)
    reqs = requests(adapter)
    results = run_together(cached, reqs)
    plain_reqs = requests(adapter)
    plain = run_together(make_engine(tokenizer, adapters, 0), plain_reqs)
    shared = len(SHARED) - len(SHARED) % BLOCK
    for (text, _, usage), (ref_text, _, ref_usage), req, ref in zip(results, plain, reqs, plain_reqs, strict=True):
        assert text == ref_text
        assert usage["prompt_tokens_details"]["cached_tokens"] == shared
        assert ref_usage["prompt_tokens_details"]["cached_tokens"] == 0
        for got, want in zip(req.logits, ref.logits, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    assert cached.prefix_cache.hit_tokens == shared * len(TAILS)


def test_a_later_request_reuses_an_earlier_prompt_and_adapters_never_share(tokenizer, adapters):
    engine = make_engine(tokenizer, adapters, 1 << 26).start()
    first = Request(SHARED + [5, 6], max_tokens=3)
    _, _, usage = engine.generate(first)
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    later = Request(SHARED + [5, 6, 7, 8], max_tokens=3, keep_logits=True)
    _, _, usage = engine.generate(later)
    assert usage["prompt_tokens_details"]["cached_tokens"] == len(SHARED) - len(SHARED) % BLOCK
    other = Request(SHARED + [5, 6, 7, 8], adapter="b", max_tokens=3, keep_logits=True)
    _, _, usage = engine.generate(other)
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0      # the base's entries are not adapter b's
    engine.call(lambda: engine.registry.unload("b"))
    owners = {key[0] for key in engine.prefix_cache._blocks}
    assert owners == {"base"}                                          # an unloaded adapter's entries are gone
    engine.stop()
    reference = make_engine(tokenizer, adapters, 0).start()
    for req in (later, other):
        again = Request(req.prompt_ids, adapter=req.adapter, max_tokens=3, keep_logits=True)
        reference.generate(again)
        for got, want in zip(req.logits, again.logits, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    reference.stop()


def test_cached_and_uncached_rows_decode_together_as_alone(tokenizer, adapters):
    """A row with cached blocks (holes in its mask between them and its computed tokens) beside rows without:
    every row's tokens equal its tokens alone."""
    warm = make_engine(tokenizer, adapters, 1 << 26).start()
    warm.generate(Request(SHARED + [3], max_tokens=1))               # the shared blocks, cached
    warm.stop()
    engine = make_engine(tokenizer, adapters, 1 << 26)
    engine.prefix_cache = warm.prefix_cache                          # the same tiny base (seed 0): the same KV
    mixed = [Request(SHARED + [4, 5], max_tokens=8, ignore_eos=True),
             Request([9, 10, 11], max_tokens=8, ignore_eos=True),
             Request(SHARED[:BLOCK] + [77] * 30, adapter="a", max_tokens=8, ignore_eos=True)]
    results = run_together(engine, mixed)
    assert [r[2]["prompt_tokens_details"]["cached_tokens"] for r in results] == [len(SHARED) - 5, 0, 0]
    for req, (text, _, _) in zip(mixed, results, strict=True):
        alone = make_engine(tokenizer, adapters, 0).start()
        ref_text, _, _ = alone.generate(Request(req.prompt_ids, adapter=req.adapter, max_tokens=8, ignore_eos=True))
        alone.stop()
        assert text == ref_text


def test_the_server_reports_cached_prompt_tokens_as_openai_does(tiny_model_dir, tokenizer, adapters):
    """A chat request repeating an earlier one's system turn and tools: ``usage.prompt_tokens_details.cached_tokens``
    counts the tokens not computed again, and /metrics adds them up; ``--prefix-cache-mb 0`` caches nothing."""
    import httpx
    import openai

    from _serve_helpers import USER, keyed_server
    from tuneforge.serving.server import ServerThread

    tools = [{"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string"}}, "required": ["city"]}}}]
    system = {"role": "system", "content": "You are a helpful assistant. " * 8}
    cached = {}
    for megabytes in (64, 0):
        server = keyed_server(tiny_model_dir, tokenizer, adapters, ["a"], prefix_cache_mb=megabytes)
        with ServerThread(server.app) as thread:
            client = openai.OpenAI(base_url=thread.url + "/v1", api_key=USER, max_retries=0, timeout=60)
            for content in ("weather in Oslo?", "and in Lima, please?"):
                r = client.chat.completions.create(model="a", messages=[system, {"role": "user", "content": content}],
                                                   tools=tools, max_tokens=2)
            cached[megabytes] = r.usage.prompt_tokens_details.cached_tokens
            metrics = httpx.get(thread.url + "/metrics", headers={"Authorization": f"Bearer {USER}"}).text
        server.shutdown()
        line = next(x for x in metrics.splitlines() if x.startswith('tuneforge_prompt_cached_tokens_total{model="a"}'))
        assert float(line.split()[-1]) == cached[megabytes]
    assert cached[0] == 0
    assert cached[64] >= 100 and cached[64] % BLOCK == 0 and cached[64] < r.usage.prompt_tokens


def test_the_roomy_cache_layer_appends_in_place_and_equals_concatenation():
    """Decode appends one column per step into spare room (no copy of the whole cache per token) and holds exactly
    what transformers' concatenating layer holds, through the engine's own edits (cut back, rows re-indexed)."""
    from transformers.cache_utils import DynamicLayer

    from tuneforge.serving.engine import _RoomyLayer

    torch.manual_seed(0)
    roomy, plain = _RoomyLayer(), DynamicLayer()
    steps = [torch.randn(3, 2, 5, 4)] + [torch.randn(3, 2, 1, 4) for _ in range(10)]
    ptrs = set()
    for i, k in enumerate(steps):
        rk, rv = roomy.update(k, -k)
        pk, pv = plain.update(k, -k)
        assert torch.equal(rk, pk) and torch.equal(rv, pv)
        if i:
            ptrs.add(rk.data_ptr())
    assert len(ptrs) == 1                                   # every decode step wrote into the same buffer
    roomy.keys, roomy.values = roomy.keys[:, :, :12], roomy.values[:, :, :12]     # a failed step cut back
    plain.keys, plain.values = plain.keys[:, :, :12], plain.values[:, :, :12]
    index = torch.tensor([2, 0])                            # some rows decoded apart: a copy, not a view
    roomy.keys, roomy.values = roomy.keys[index], roomy.values[index]
    plain.keys, plain.values = plain.keys[index], plain.values[index]
    for _ in range(70):                                     # past the room: the buffer grows once, content kept
        k = torch.randn(2, 2, 1, 4)
        rk, _ = roomy.update(k, -k)
        pk, _ = plain.update(k, -k)
        assert torch.equal(rk, pk)
