"""Many adapters on one base: each row of a mixed batch gets exactly the logits its adapter gives it alone.

The reference is each method's own loaded model (``load_trained``) generating alone through
``method_generate`` (itself tested equal to the training forward). The engine runs all adapters and the base
model in one batch, requests joining while others decode (continuous batching), in float64 so that greedy
tokens cannot flip on rounding (compared at float32 precision: generate returns float32 logits).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from _serve_helpers import SERVE_CASES, save_adapter, tiny_base
from tuneforge.methods import load_trained, method_generate
from tuneforge.serving.adapters import AdapterLoadError, AdapterRegistry, AdapterSet
from tuneforge.serving.engine import Engine, Request

PROMPTS = [[1, 504, 2520, 30, 1004, 28], [1, 9690, 314, 253, 5738, 30, 1234, 42, 7, 99, 100], [1, 18, 19]]
STEPS = 5


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-adapters")
    dirs = {}
    for seed, (name, method, sections) in enumerate(SERVE_CASES, start=10):
        save_adapter(root / name, method, sections, seed)
        dirs[name] = root / name
    return dirs


def reference_logits(adapter_dir, prompt: list[int], steps: int) -> list[torch.Tensor]:
    """Greedy logits of ``steps`` tokens from the method's own model, alone (batch of one)."""
    model = tiny_base() if adapter_dir is None else load_trained(tiny_base(), adapter_dir).eval()
    config = None if adapter_dir is None else _method_of(adapter_dir)
    out = method_generate(model, config, input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                          dtype=torch.long), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                          output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return [x[0].double() for x in out.logits]   # generate hands logits back in float32


def _method_of(folder):
    from tuneforge.methods import saved_method

    return saved_method(folder)


def _engine(adapter_dirs, max_loaded=16, max_batch=32, lora_kernel="peft"):
    registry = AdapterRegistry(AdapterSet(tiny_base(), lora_kernel=lora_kernel), max_loaded=max_loaded)
    for name, folder in adapter_dirs.items():
        registry.register(name, folder)
    from tuneforge.models.loading import load_tokenizer

    return Engine(registry, load_tokenizer("smollm2-135m-instruct"), max_batch=max_batch).start()


@pytest.mark.parametrize("lora_kernel", ["peft", "stacked"])
def test_mixed_batch_logits_equal_each_adapter_alone(adapter_dirs, lora_kernel):
    """Every method (and the base model), every prompt, all in one running batch: logits == alone; LoRA rows
    mixed by peft's ``adapter_names`` or by tuneforge's stacked kernel."""
    if lora_kernel == "stacked":    # the stacked kernel changes only the LoRA family: run it with IA3 beside
        adapter_dirs = {k: v for k, v in adapter_dirs.items() if k in ("lora", "lora_qv", "dora", "rslora", "ia3",
                                                                         "qlora")}
    engine = _engine(adapter_dirs, lora_kernel=lora_kernel)
    jobs = [(name, p) for name in [None, *adapter_dirs] for p in (PROMPTS if lora_kernel == "peft" else PROMPTS[:2])]
    reqs = [Request(list(p), adapter=name, max_tokens=STEPS, ignore_eos=True, keep_logits=True) for name, p in jobs]
    threads = [threading.Thread(target=engine.generate, args=(r,)) for r in reqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    engine.stop()
    assert engine.max_rows_seen >= len(adapter_dirs) + 1, "the adapters never shared a batch"
    assert bool(engine.set.serving["lora"].stacked_hooks) == (lora_kernel == "stacked")
    for (name, prompt), req in zip(jobs, reqs, strict=True):
        ref = reference_logits(adapter_dirs.get(name), prompt, STEPS)
        assert len(req.logits) == STEPS
        for step, (got, want) in enumerate(zip(req.logits, ref, strict=True)):
            assert torch.allclose(got, want, atol=1e-5, rtol=0), (name, prompt, step, (got - want).abs().max())
    base = reference_logits(None, PROMPTS[0], 1)[0]
    for name in adapter_dirs:      # each adapter really changes the model (a silently dropped one would not)
        assert (reference_logits(adapter_dirs[name], PROMPTS[0], 1)[0] - base).abs().max() > 1e-3, name


def test_lora_mixed_batch_uses_peft_adapter_names(adapter_dirs):
    """LoRA-family rows are mixed by peft's ``adapter_names`` in one forward (not by switching adapters)."""
    lora = {k: v for k, v in adapter_dirs.items() if k in ("lora", "lora_qv", "dora", "rslora")}
    engine = _engine(lora)
    calls = []
    peft_forward = None

    def spy(**kwargs):
        calls.append(kwargs.get("adapter_names"))
        return peft_forward(**kwargs)

    engine.call(lambda: [engine.registry.acquire(n) for n in lora])
    peft_model = engine.set.serving["lora"].peft_model     # held by LoRA's serving hook (methods/lora/serving.py)
    peft_forward = peft_model.forward
    peft_model.forward = spy
    # 16 tokens each: requests that arrive a few steps apart (a loaded machine) still overlap in the running batch
    reqs = [Request(list(PROMPTS[0]), adapter=n, max_tokens=16, ignore_eos=True) for n in lora]
    threads = [threading.Thread(target=engine.generate, args=(r,)) for r in reqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    engine.stop()
    assert any(c is not None and len(set(c)) == len(lora) for c in calls), calls


def test_request_joins_running_batch_between_steps(adapter_dirs):
    """A request arriving while another decodes joins the running batch (continuous batching), finishes first,
    and both get the tokens they get alone."""
    engine = _engine({"lora": adapter_dirs["lora"]})
    original = engine.set.forward

    def slow(*a, **k):
        time.sleep(0.01)
        return original(*a, **k)

    engine.set.forward = slow
    long_req = Request(list(PROMPTS[1]), adapter="lora", max_tokens=40, ignore_eos=True, keep_logits=True)
    short_req = Request(list(PROMPTS[0]), adapter=None, max_tokens=4, ignore_eos=True, keep_logits=True)
    order = []
    t1 = threading.Thread(target=lambda: (engine.generate(long_req), order.append("long")))
    t1.start()
    while len(long_req.logits) < 5:
        time.sleep(0.005)
    engine.generate(short_req)
    order.append("short")
    t1.join(60)
    engine.stop()
    assert order == ["short", "long"]
    assert engine.max_rows_seen == 2
    assert engine.steps < 40 + 4, "the two requests never shared a decode step"
    for req, folder in ((long_req, adapter_dirs["lora"]), (short_req, None)):
        ref = reference_logits(folder, req.prompt_ids, len(req.logits))
        assert all(torch.allclose(g, w, atol=1e-5, rtol=0) for g, w in zip(req.logits, ref, strict=True))


@pytest.mark.parametrize("lora_kernel", ["peft", "stacked"])
def test_lru_eviction_and_pinning(adapter_dirs, lora_kernel):
    names = ["lora", "ia3", "adapter"]
    engine = _engine({n: adapter_dirs[n] for n in names}, max_loaded=2, lora_kernel=lora_kernel)
    reg = engine.registry
    for n in names:
        engine.generate(Request(list(PROMPTS[2]), adapter=n, max_tokens=2))
    assert reg.loaded == ["ia3", "adapter"] and reg.evictions == 1       # lora was least recently used
    reg.entries["ia3"].pinned = True
    engine.generate(Request(list(PROMPTS[2]), adapter="lora", max_tokens=2))
    assert reg.loaded == ["ia3", "lora"]                                 # adapter evicted, pinned ia3 kept
    reg.entries["lora"].pinned = True                                    # every slot pinned: refused, not stuck
    with pytest.raises(RuntimeError, match="all 2 adapter slots hold pinned adapters"):
        engine.generate(Request(list(PROMPTS[2]), adapter="adapter", max_tokens=2), timeout=30)
    reg.entries["lora"].pinned = False
    # evicted and reloaded adapters still answer as they do alone
    reqs = [Request(list(PROMPTS[0]), adapter=n, max_tokens=3, ignore_eos=True, keep_logits=True)
            for n in ("adapter", "lora")]
    for req in reqs:
        engine.generate(req)
    engine.stop()
    for req in reqs:
        ref = reference_logits(adapter_dirs[req.adapter], PROMPTS[0], 3)
        assert all(torch.allclose(g, w, atol=1e-5, rtol=0) for g, w in zip(req.logits, ref, strict=True))


def test_bad_adapter_folders_fail_with_one_line(adapter_dirs, tmp_path):
    aset = AdapterSet(tiny_base())
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterLoadError, match="no adapter_config.json"):
        aset.load("x", tmp_path / "empty")
    tiny_base().save_pretrained(tmp_path / "full")                     # a full fine-tune is served as --base
    with pytest.raises(AdapterLoadError, match="holds a full model, not an adapter: serve it with --base"):
        aset.load("full", tmp_path / "full")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    (tmp_path / "broken" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterLoadError, match="not valid JSON"):
        aset.load("broken", tmp_path / "broken")
    # an adapter trained on another base (hidden size 32 instead of 64)
    from peft import LoraConfig, get_peft_model

    from tuneforge.models.loading import build_tiny_model

    other = get_peft_model(build_tiny_model(seed=0, hidden_size=32, intermediate_size=64), LoraConfig(r=2))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(AdapterLoadError) as e:
        aset.load("other", tmp_path / "other")
    assert "does not load onto this base model" in str(e.value) and "\n" not in str(e.value)
    # nothing half-loaded: a good adapter still loads and the failed name is free
    aset.load("lora", adapter_dirs["lora"])
    assert list(aset.adapters) == ["lora"]
