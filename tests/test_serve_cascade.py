"""Cascade decode: rows that share a cached prompt prefix keep one copy of it per group and attend to it apart from
their own entries (``kernels/cascade_attention.py``). The merged softmax equals attention over the concatenated
keys (random GQA tensors, float64, 1e-12); a mixed batch (shared rows, an adapter's rows, a row without a cached
prefix, a guided row, a row joining a running group) decodes every step with the logits of the full-cache path
(tiny float64 base, 1e-10); the batch's cache holds no row's copy of the prefix; prefix-cache eviction and an
adapter unloaded and loaded again change nothing; models the kernel cannot compute (sliding windows, soft-capping)
keep the full-cache path."""

from __future__ import annotations

import queue

import pytest
import torch
import torch.nn.functional as F

from _serve_helpers import save_adapter, tiny_base
from tuneforge.kernels.cascade_attention import merge_partials, partial_attention, unsupported
from tuneforge.serving.adapters import AdapterRegistry, AdapterSet
from tuneforge.serving.engine import Engine, Request
from tuneforge.serving.prefix_cache import BLOCK

SHARED = list(range(100, 100 + 5 * BLOCK + 3))          # 5 whole blocks (80 tokens, cascaded) and 3 more
PREFIX = 5 * BLOCK


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade_adapters")
    save_adapter(root / "b", "lora", {"lora": {"r": 4, "dropout": 0.0}}, seed=2)
    return root


@pytest.fixture(scope="module")
def base_set():
    return AdapterSet(tiny_base())


def engine_for(tokenizer, adapters, cascade: bool) -> Engine:
    registry = AdapterRegistry(AdapterSet(tiny_base()))
    registry.register("b", adapters / "b")
    return Engine(registry, tokenizer, prefix_cache_bytes=1 << 26, cascade=cascade)


def req(ids: list[int], adapter: str | None = None, max_tokens: int = 6, **kw) -> Request:
    return Request(ids, adapter=adapter, max_tokens=max_tokens, ignore_eos=True, keep_logits=True, **kw)


def admit(engine: Engine, *reqs: Request) -> None:
    """Queue ``reqs`` and admit them now (prefilled together), on this thread (the engine thread is not started)."""
    for r in reqs:
        engine.submit(r)
    engine._admit()


def decode(engine: Engine, steps: int | None = None) -> None:
    """``steps`` decode steps of the running batch (None: until it is empty)."""
    n = 0
    while engine._rows and (steps is None or n < steps):
        engine._decode()
        n += 1


def row_of(engine: Engine, r: Request):
    return next(row for row in engine._rows if row.req is r)


# ------------------------------------------------------------------------------------------ the merge itself

def test_prefix_and_suffix_partials_merge_to_attention_over_both():
    """Random GQA tensors (8 query heads, 2 kv heads) in float64: one prefix for three rows, each row's own keys
    with padding masked; the merged result equals SDPA over ``[prefix; suffix]`` with the same mask."""
    torch.manual_seed(0)
    B, H, H_kv, P, L, D = 3, 8, 2, 20, 7, 16
    q = torch.randn(B, H, 1, D, dtype=torch.float64)
    kp, vp = torch.randn(1, H_kv, P, D, dtype=torch.float64), torch.randn(1, H_kv, P, D, dtype=torch.float64)
    ks, vs = torch.randn(B, H_kv, L, D, dtype=torch.float64), torch.randn(B, H_kv, L, D, dtype=torch.float64)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, :3] = False                                     # padding of a shorter row
    mask[2, :5] = False
    scale = D ** -0.5
    out_s, lse_s = partial_attention(q, ks, vs, scale, mask)
    out_p, lse_p = partial_attention(q, kp, vp, scale, None)
    out, _ = merge_partials(out_s, lse_s, out_p, lse_p)
    keys = torch.cat([kp.expand(B, -1, -1, -1), ks], 2)
    values = torch.cat([vp.expand(B, -1, -1, -1), vs], 2)
    full_mask = torch.cat([torch.ones(B, P, dtype=torch.bool), mask], 1)[:, None, None, :]
    want = F.scaled_dot_product_attention(q, keys, values, attn_mask=full_mask, scale=scale, enable_gqa=True)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    assert not torch.allclose(out_s, want, atol=1e-3)       # the prefix matters: the suffix alone is not it


# ------------------------------------------------------------------------------------------ in the engine

def script(engine: Engine, grammars) -> dict[str, Request]:
    """One serving story, step by step: a mixed batch admitted together, decode, a row joining the running group,
    the prefix cache emptied (eviction), adapter ``b`` unloaded once its row finished and loaded again."""
    warm = req(SHARED + [1], max_tokens=1)
    admit(engine, warm)                                      # the shared blocks, cached
    decode(engine)
    r = {"s1": req(SHARED + [4, 5]), "s2": req(SHARED + [6], max_tokens=9), "s3": req(SHARED + [7, 8, 9, 10]),
         "b": req(SHARED + [4, 5], adapter="b", max_tokens=3),    # the same tokens, another owner: its own group
         "bb": req(SHARED + [6], adapter="b", max_tokens=3),
         "alone": req([9, 10, 11, 12], max_tokens=8),
         "guided": req(SHARED + [20, 21], max_tokens=5, guide=grammars.guide(_json_object(), "schema"))}
    admit(engine, *r.values())
    decode(engine, 2)
    r["late"] = req(SHARED + [30, 31, 32])                   # joins the running base group
    admit(engine, r["late"])
    decode(engine, 2)
    engine.prefix_cache.clear()                              # every block evicted while the group decodes
    r["evicted"] = req(SHARED + [40])                        # prefilled in full: no group
    admit(engine, r["evicted"])
    decode(engine, 1)
    assert not any(row.req.adapter == "b" for row in engine._rows)
    engine._commands.put((lambda: engine.registry.unload("b"), queue.Queue()))
    engine._run_commands()                                   # as between two steps: b's cached blocks go too
    assert {key[0] for key in engine.prefix_cache._blocks} <= {"base"}
    r["b2"] = req(SHARED + [4, 5], adapter="b", max_tokens=4)  # b loaded again: a new owner, nothing cached
    r["rewarm"] = req(SHARED + [50, 51])                       # hits the blocks "evicted" cached again
    admit(engine, r["b2"])
    admit(engine, r["rewarm"])
    decode(engine)
    return r


def _json_object() -> str:
    from tuneforge.serving.guided import JSON_OBJECT_SCHEMA, json_schema_grammar

    return json_schema_grammar(JSON_OBJECT_SCHEMA)


@pytest.fixture(scope="module")
def grammars(tokenizer, base_set):
    from tuneforge.serving.guided import Grammars

    engine = Engine(AdapterRegistry(base_set), tokenizer)
    return Grammars(tokenizer, engine.vocab_size, engine.eos_ids)


def test_cascade_decode_gives_every_row_the_logits_of_the_full_cache(tokenizer, adapters, grammars, monkeypatch):
    """Every decode step of every row of the story equals the full-cache path (float64, 1e-10), and the rows
    were grouped as the story says (one group per owner and prefix; no group for a row prefilled in full)."""
    groups = {}
    original = Engine._prefill_plain

    def spy(self, reqs):                                     # record each row's group as it joins the batch
        out = original(self, reqs)
        groups.update({id(row.req): row.shared for row in out[0]})
        return out

    monkeypatch.setattr(Engine, "_prefill_plain", spy)
    got = script(engine_for(tokenizer, adapters, cascade=True), grammars)
    want = script(engine_for(tokenizer, adapters, cascade=False), grammars)
    for name in got:
        assert len(got[name].logits) == len(want[name].logits), name
        assert name == "guided" or len(got[name].logits) == got[name].max_tokens, name
        for a, b in zip(got[name].logits, want[name].logits, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)
    g = {name: groups[id(r)] for name, r in got.items()}
    assert g["s1"] is g["s2"] is g["s3"] is g["guided"] is g["late"] is not None and g["s1"].length == PREFIX
    assert g["alone"] is None and g["evicted"] is None       # no cached prefix: the row holds its whole prompt
    assert g["rewarm"] is g["s1"]                            # cached again while s2 still decodes: the same group
    assert g["b"] is g["bb"] is not None and g["b"] is not g["s1"] and g["b"].key[0] != "base"
    assert g["b2"] is None                                   # b loaded again: its old blocks are gone with the old load


def test_a_group_holds_the_prefix_once_and_the_rows_hold_none_of_it(tokenizer, adapters):
    """Four rows admitted together with an 80-token cached prefix: one :class:`SharedPrefix` (every layer's keys and
    values ``[layers, 2, H_kv, 80, D]``); the batch's cache keeps only the columns after it, and its storage is
    smaller than one prefix per row (the full-cache path's storage is not: the check can fail)."""
    storage = {}
    for cascade in (True, False):
        engine = engine_for(tokenizer, adapters, cascade)
        admit(engine, req(SHARED + [1], max_tokens=1))
        decode(engine)
        reqs = [req(SHARED + [t]) for t in (2, 3, 4, 5)]
        admit(engine, *reqs)
        layers = engine._cache.layers
        k = layers[0].keys
        per_row_prefix = len(reqs) * k.shape[1] * PREFIX * k.shape[3] * k.element_size()
        storage[cascade] = [la.keys.untyped_storage().nbytes() for la in layers]
        shared = {id(row_of(engine, r).shared) for r in reqs}
        if cascade:
            group = row_of(engine, reqs[0]).shared
            assert len(shared) == 1 and group is not None
            assert group.kv.shape == (len(layers), 2, k.shape[1], PREFIX, k.shape[3])
            assert all(la.keys.shape[2] < PREFIX for la in layers)
            assert all(s < per_row_prefix for s in storage[True])
            assert not any(group.kv.untyped_storage().data_ptr() == la.keys.untyped_storage().data_ptr()
                           for la in layers)
        else:
            assert shared == {id(None)}
            assert all(s >= per_row_prefix for s in storage[False])
        decode(engine)


@pytest.mark.parametrize("family, reason", [("llama3", None), ("qwen3", None), ("phi3", None), ("gpt-neox", None),
                                            ("qwen3-moe", None), ("qwen2.5", None),
                                            ("mistral", "sliding window"), ("gemma2", "soft-capped"),
                                            ("gemma3", "layer types")])
def test_models_the_kernel_cannot_compute_keep_the_full_cache(tokenizer, family, reason):
    """Sliding windows and soft-capped scores are refused by name (their rows keep the whole prompt, no groups);
    the other families use the cascade (their attention is plain scaled dot-product over the cache)."""
    from _architectures import build

    model = build(family, tokenizer)
    said = unsupported(model)
    assert (said is None) if reason is None else (reason in said), said
    if reason is not None:
        assert Engine(AdapterRegistry(AdapterSet(model)), tokenizer, cascade=True).cascade_off == said


@pytest.mark.parametrize("family", ["qwen3", "gpt-neox", "phi3"])
def test_other_families_decode_the_same_with_the_cascade(tokenizer, family):
    """Query/key norms (Qwen3), partial rotary and fused attention (GPT-NeoX), fused qkv (Phi-3): three rows sharing
    the prefix and one without decode with the full-cache logits (float64, 1e-10)."""
    from _architectures import build

    logits = {}
    for cascade in (True, False):
        engine = Engine(AdapterRegistry(AdapterSet(build(family, tokenizer, dtype=torch.float64))), tokenizer,
                        prefix_cache_bytes=1 << 26, cascade=cascade)
        admit(engine, req(SHARED + [1], max_tokens=1))
        decode(engine)
        reqs = [req(SHARED + [2, 3], max_tokens=4), req(SHARED + [4], max_tokens=4), req([5, 6, 7], max_tokens=4),
                req(SHARED + [8, 9, 10], max_tokens=4)]
        admit(engine, *reqs)
        if cascade:
            assert row_of(engine, reqs[0]).shared is row_of(engine, reqs[3]).shared is not None
        decode(engine)
        logits[cascade] = [r.logits for r in reqs]
    for got, want in zip(logits[True], logits[False], strict=True):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
