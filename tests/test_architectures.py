"""Every popular decoder family (tiny random models from configs, tests/_architectures.py) x every feature.

For each family: every method trains (a finite loss, the weights move) and its run reloads with the same
logits; a packed row equals each example alone (packed attention, 1e-5); merging folds the adapter in with the
same logits; cached greedy generation scores each step as the training forward does; a mixed serving batch
gives each row what its adapter gives alone. A combination tuneforge refuses (``REFUSED``) tests, in each of
those cases, that it stops in one line. docs/guides/architectures.md is generated from this file's
results by scripts/architecture_table.py; the last test checks that the table and this parametrization agree.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from pathlib import Path

import pytest
import torch

from _architectures import FAMILIES, build, save_tiny
from _method_helpers import HAS_BNB, METHOD_SECTIONS, packed_row, perturbed, run_config
from conftest import write_jsonl
from tuneforge.config import dump_config, load_config
from tuneforge.errors import ConfigError
from tuneforge.kernels.packed_attention import NAME as PACKED_ATTENTION
from tuneforge.kernels.packed_attention import set_attention
from tuneforge.methods import apply_method, load_trained, method_forward, method_generate, save_trained

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "guides" / "architectures.md"
METHODS = ["full", "lora", "qlora", "adapter", "prefix", "prompt", "ia3"]
MERGEABLE = ["lora", "ia3"]
GENERATE = ["base", "full", "lora", "adapter", "prefix", "prompt", "ia3"]
SERVED = ["lora", "ia3", "adapter", "prefix", "prompt"]
LR = {"full": 3e-3, "lora": 1e-2, "qlora": 1e-2, "adapter": 1e-2, "ia3": 5e-2, "prefix": 5e-2, "prompt": 5e-2}

FEATURES_WITH_PREFIX = ("trains", "save_load", "packed", "generate", "serve_mixed")
# (feature, family, method) -> why, for the combinations tuneforge refuses: each such case tests the refusal
_PREFIX_REFUSED = "refused up front (ConfigError): prefix tuning on {} ({})"
REFUSED: dict[tuple[str, str, str], str] = {
    **{(f, family, "prefix"): _PREFIX_REFUSED.format(name, why) for f in FEATURES_WITH_PREFIX for family, name, why in (
        ("gemma2", "Gemma 2", "soft-capped attention needs eager, the prefix's path is SDPA"),
        ("gemma3", "Gemma 3", "sliding-window layers build their cache mask without the prefix positions"),
        ("mistral", "Mistral", "its sliding window is lost with the prefix in the KV cache: the cached and packed "
                               "paths attend past the window"))},
    ("serve_mixed", "qwen3-moe", "lora"): "refused when the server loads it (AdapterLoadError; 400 at request time): "
                                          "LoRA on the MoE experts' stacked weights (peft's ParamWrapper) cannot be "
                                          "mixed per row; serve the merged model",
    **{(f, "mistral", "prompt"): "refused up front (ConfigError): prompt tuning where every layer slides a window "
                                 "shorter than the virtual tokens plus data.max_length (the soft prompt drops out of "
                                 "the window: the tiny Mistral's is 4 tokens; Mistral v0.1's 4096)"
       for f in FEATURES_WITH_PREFIX},
}
PREFIX_REFUSAL = r"^method prefix does not support \w+ \((soft-capped|sliding-window)[^\n]*: use lora, adapter"
PROMPT_REFUSAL = r"^method prompt on mistral: its sliding window \(4 tokens\) would hide the 4 virtual tokens[^\n]*$"
REFUSAL = {"prefix": PREFIX_REFUSAL, "prompt": PROMPT_REFUSAL}
# (feature, family, method) -> reason, for the combinations that do not work (xfail, strict)
KNOWN_FAILURES: dict[tuple[str, str, str], str] = {}
# the mixed serving parity runs in float64, but transformers' eager attention takes its softmax in float32, where
# float64's mask minimum is -inf: a left-padded row's padding queries (nothing to attend to) give NaN, which the
# next layer's cache spreads to the real tokens (0 * NaN). Gemma 2 (eager only) is served in float32
SERVE_DTYPE = {"gemma2": torch.float32}


def _refuses(family: str, method: str, tokenizer) -> None:
    with pytest.raises(ConfigError, match=REFUSAL[method]):
        apply_method(build(family, tokenizer), run_config(method, METHOD_SECTIONS[method]), tokenizer)


# feature -> (test function name, the methods it runs per family); the table's columns
FEATURES = {
    "trains": ("test_every_method_trains", METHODS),
    "save_load": ("test_save_and_load_give_identical_logits", METHODS),
    "packed": ("test_packed_row_equals_each_example_alone", METHODS),
    "merge": ("test_merge_parity", MERGEABLE),
    "generate": ("test_generation_matches_the_training_forward", GENERATE),
    "serve_mixed": ("test_mixed_serving_batch_equals_each_adapter_alone", SERVED),
}


def cases(feature: str):
    """pytest params ``family-method`` for ``feature``, the known failures marked xfail(strict)."""
    out = []
    for family in FAMILIES:
        for method in FEATURES[feature][1]:
            reason = KNOWN_FAILURES.get((feature, family, method))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            if method == "qlora" and not HAS_BNB:
                marks.append(pytest.mark.skip(reason="bitsandbytes not installed"))
            out.append(pytest.param(family, method, marks=marks, id=f"{family}-{method}"))
    return out


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("families")
    return {f: save_tiny(f, tokenizer, root / f) for f in FAMILIES}


# ------------------------------------------------------------------------------------------ training


def _recipe(method: str, base_dir: str, out: str):
    """The run that trains ``method`` on the model in ``base_dir`` for 3 steps, not set up yet."""
    from tuneforge.training.trainer import TrainingRecipe

    out_dir = Path(out)
    rows = [{"prompt": f"Ticket {i}: parcel late", "completion": "shipping"} for i in range(8)]
    data = write_jsonl(out_dir.parent / f"{out_dir.name}.jsonl", rows)
    return TrainingRecipe(load_config(data={
        "model": base_dir, "method": method, "output_dir": str(out_dir), "data": {"train": str(data)},
        "max_steps": 3, "batch_size": 4, "learning_rate": LR[method], "warmup_ratio": 0.0, "lr_scheduler": "constant",
        "progress": False, "keep_best": False, "eval_every": 1000, **METHOD_SECTIONS[method]}))


@functools.cache
def _trained(family: str, method: str, base_dir: str, out: str):
    """Train ``method`` on ``family`` for 3 steps (cached: the training and save/load tests share the run)."""
    recipe = _recipe(method, base_dir, out)
    recipe.setup()
    before = {n: p.detach().clone() for n, p in recipe.model.named_parameters() if p.requires_grad}
    recipe.fit()
    result = recipe.finish()
    after = dict(recipe.model.named_parameters())
    moved = sum(not torch.equal(before[n], after[n].detach()) for n in before)
    return recipe, result, moved, len(before)


def _out(family, method, tmp_path_factory) -> str:
    out = tmp_path_factory.getbasetemp() / "arch-runs" / f"{family}-{method}"
    out.parent.mkdir(exist_ok=True)
    return str(out)


def _run(family, method, family_dirs, tmp_path_factory):
    return _trained(family, method, str(family_dirs[family]), _out(family, method, tmp_path_factory))


@pytest.mark.parametrize("family,method", cases("trains"))
def test_every_method_trains(family, method, family_dirs, tmp_path_factory):
    if ("trains", family, method) in REFUSED:        # the run stops at setup, in one line, before it trains
        recipe = _recipe(method, str(family_dirs[family]), _out(family, method, tmp_path_factory))
        with pytest.raises(ConfigError, match=REFUSAL[method]):
            recipe.setup()
        return
    _, result, moved, trainable = _run(family, method, family_dirs, tmp_path_factory)
    losses = [r["loss"] for r in result.metrics if "loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses))), losses
    assert trainable > 0 and moved == trainable, f"{moved} of {trainable} trainable tensors changed"


@pytest.mark.parametrize("family,method", cases("save_load"))
def test_save_and_load_give_identical_logits(family, method, family_dirs, tmp_path_factory, tokenizer):
    from tuneforge.runs import load_run

    if ("save_load", family, method) in REFUSED:
        return _refuses(family, method, tokenizer)
    recipe, result, _, _ = _run(family, method, family_dirs, tmp_path_factory)
    loaded = load_run(result.run_dir, device="cpu")
    ids = torch.tensor([[1, 504, 2520, 30, 1004, 28, 18, 19]])
    positions, keep = torch.arange(ids.shape[1])[None], torch.arange(ids.shape[1])
    with torch.no_grad():
        want = method_forward(recipe.model.eval(), method, ids, positions, keep, lengths=[ids.shape[1]]).float()
        got = method_forward(loaded.model, method, ids, positions, keep, lengths=[ids.shape[1]]).float()
    atol = 1e-4 if method == "qlora" else 1e-5       # qlora re-quantizes its base on load: the same rounding
    torch.testing.assert_close(got, want, rtol=0, atol=atol)


# ------------------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("family,method", cases("packed"))
def test_packed_row_equals_each_example_alone(family, method, tokenizer):
    """The training forward (tuneforge's packed attention) on a row of 3 examples, longer than the sliding
    windows, equals each example alone through transformers' own attention; and so do the per-example losses."""
    if ("packed", family, method) in REFUSED:
        return _refuses(family, method, tokenizer)
    config = run_config(method, METHOD_SECTIONS[method])
    model = perturbed(apply_method(build(family, tokenizer), config, tokenizer), max_numel=None
                      if method != "full" else 100_000)
    ids, pos, lengths = packed_row(lengths=(7, 3, 9), vocab=len(tokenizer))
    keep = torch.arange(ids.shape[1])
    with torch.no_grad():
        alone, start = [], 0
        for n in lengths:
            out = model(input_ids=ids[:, start:start + n], use_cache=False).logits[0]
            alone.append(out[-n:])   # prompt tuning returns its virtual positions too
            start += n
        reference = torch.cat(alone)
        set_attention(model, PACKED_ATTENTION)
        cu = torch.tensor([0, 7, 10, 19], dtype=torch.int32)
        packed = method_forward(model, config, ids, pos, keep, lengths=list(lengths), cu_seqlens=cu)
    torch.testing.assert_close(packed, reference, rtol=0, atol=1e-5)
    targets = torch.cat([ids[0, 1:], ids[0, :1]])
    loss = torch.nn.functional.cross_entropy(packed, targets, reduction="none")
    ref_loss = torch.nn.functional.cross_entropy(reference, targets, reduction="none")
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ merge


@pytest.mark.parametrize("family,method", cases("merge"))
def test_merge_parity(family, method, family_dirs, tokenizer, tmp_path):
    """merge_run folds a moved adapter into the base (fp32) and proves it: logits and greedy tokens."""
    from transformers import AutoModelForCausalLM

    from tuneforge.export import merge_run

    base_dir = family_dirs[family]
    config = run_config(method, {**METHOD_SECTIONS[method], "model": str(base_dir)})
    model = apply_method(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), config, tokenizer)
    run = tmp_path / "run"
    save_trained(perturbed(model, scale=0.1, seed=0), run, config)
    tokenizer.save_pretrained(run)
    (run / "config.yaml").write_text(dump_config(config))
    (run / "run.json").write_text(json.dumps({"method": method}))
    report = merge_run(run, tmp_path / "merged", dtype="fp32", check_prompts=["Hi there", "2 + 2 ="])
    assert report.passed and report.max_abs_diff <= report.tolerance


# ------------------------------------------------------------------------------------------ generation


@pytest.mark.parametrize("family,method", cases("generate"))
def test_generation_matches_the_training_forward(family, method, tokenizer):
    """Greedy cached generation (4 tokens) scores each step as the uncached training forward does."""
    if ("generate", family, method) in REFUSED:
        return _refuses(family, method, tokenizer)
    model = build(family, tokenizer)
    config = "base" if method == "base" else run_config(method, METHOD_SECTIONS[method])
    if method != "base":
        model = perturbed(apply_method(model, config, tokenizer))
    ids = torch.randint(0, len(tokenizer), (1, 6), generator=torch.Generator().manual_seed(2))
    out = method_generate(model, config, input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                          min_new_tokens=4, do_sample=False, output_scores=True, output_logits=True,
                          return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
    seq = out.sequences
    assert seq.shape == (1, 10) and torch.equal(seq[:, :6], ids)
    with torch.no_grad():
        for step, (raw, scores) in enumerate(zip(out.logits, out.scores, strict=True)):
            T = 6 + step
            logits = method_forward(model, config, seq[:, :T], torch.arange(T)[None], torch.tensor([T - 1]))
            torch.testing.assert_close(raw[0], logits[0], rtol=0, atol=1e-4)
            assert int(seq[0, T]) == int(scores[0].argmax())   # greedy (scores: EOS held back by min_new_tokens)


# ------------------------------------------------------------------------------------------ serving

PROMPTS = [[1, 504, 2520, 30, 1004, 28], [1, 9690, 314, 253, 5738, 30, 1234, 42, 7, 99, 100]]
STEPS = 3


def _served_adapter(family: str, method: str, seed: int, tokenizer, root: Path) -> Path:
    """A moved adapter of ``method`` on ``family``, saved in ``root / method``."""
    model = apply_method(build(family, tokenizer), run_config(method, METHOD_SECTIONS[method]), tokenizer)
    save_trained(perturbed(model, scale=0.3, seed=seed), root / method)
    return root / method


def _refused_when_served(family: str, method: str, tokenizer, root: Path) -> None:
    """The server refuses the adapter in one line when it loads it (a request for it: 400), and the base it was
    being loaded onto serves on as before."""
    import queue

    from tuneforge.serving.adapters import AdapterLoadError, AdapterRegistry, AdapterSet
    from tuneforge.serving.engine import Engine, Request

    folder = _served_adapter(family, method, 10, tokenizer, root)
    adapters = AdapterSet(build(family, tokenizer))
    with pytest.raises(AdapterLoadError, match=r"MoE experts' stacked weights\), which peft cannot mix per row") as e:
        adapters.load(method, folder)
    assert "\n" not in str(e.value) and not adapters.adapters
    registry = AdapterRegistry(adapters, max_loaded=4)
    registry.register(method, folder)
    engine = Engine(registry, tokenizer, max_batch=4).start()
    try:
        events: queue.Queue = queue.Queue()
        engine.submit(Request(list(PROMPTS[0]), adapter=method, max_tokens=2, sink=events.put))
        kind, message, status = events.get(timeout=120)
        assert (kind, status) == ("error", 400) and "peft cannot mix" in message, (kind, message, status)
        base = Request(list(PROMPTS[0]), max_tokens=STEPS, ignore_eos=True, keep_logits=True)
        engine.generate(base)
    finally:
        engine.stop()
    alone = build(family, tokenizer)(input_ids=torch.tensor([PROMPTS[0]])).logits[0, -1]
    torch.testing.assert_close(base.logits[0].float(), alone, rtol=0, atol=1e-4)


@functools.cache
def _serving_results(family: str, base_dir: str, root: str):
    """Each served method's adapter (and the base) run in one mixed engine batch, and alone (float64)."""
    from tuneforge.models.loading import load_tokenizer
    from tuneforge.serving.adapters import AdapterRegistry, AdapterSet
    from tuneforge.serving.engine import Engine, Request

    tokenizer = load_tokenizer(base_dir)
    dirs = {}
    for seed, method in enumerate(SERVED, start=10):
        if ("serve_mixed", family, method) in REFUSED:
            continue        # refused on this family: the others are served without it
        dirs[method] = _served_adapter(family, method, seed, tokenizer, Path(root))

    def base():
        return build(family, tokenizer, dtype=SERVE_DTYPE.get(family, torch.float64))

    registry = AdapterRegistry(AdapterSet(base()), max_loaded=16)
    for name, folder in dirs.items():
        registry.register(name, folder)
    engine = Engine(registry, tokenizer, max_batch=32).start()
    jobs = [(name, p) for name in [None, *dirs] for p in PROMPTS]
    reqs = [Request(list(p), adapter=name, max_tokens=STEPS, ignore_eos=True, keep_logits=True) for name, p in jobs]
    threads = [threading.Thread(target=engine.generate, args=(r,)) for r in reqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    engine.stop()
    results: dict = {}
    for (name, prompt), req in zip(jobs, reqs, strict=True):
        model = base() if name is None else load_trained(base(), dirs[name]).eval()
        config = None if name is None else run_config(name, METHOD_SECTIONS[name])
        out = method_generate(model, config, input_ids=torch.tensor([prompt]), attention_mask=torch.ones(
            1, len(prompt), dtype=torch.long), max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
            output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        results.setdefault(name, []).append((req.logits, [x[0].double() for x in out.logits]))
    return engine.max_rows_seen, results


@pytest.mark.parametrize("family,method", cases("serve_mixed"))
def test_mixed_serving_batch_equals_each_adapter_alone(family, method, family_dirs, tmp_path_factory, tokenizer):
    root = tmp_path_factory.getbasetemp() / "arch-serve" / family
    root.mkdir(parents=True, exist_ok=True)
    if ("serve_mixed", family, method) in REFUSED:
        if method in REFUSAL:
            return _refuses(family, method, tokenizer)
        return _refused_when_served(family, method, tokenizer, root)
    rows_seen, results = _serving_results(family, str(family_dirs[family]), str(root))
    assert rows_seen >= 2, "the adapters never shared a batch"
    for name in (None, method):
        for got_steps, want_steps in results[name]:
            assert len(got_steps) == STEPS
            for step, (got, want) in enumerate(zip(got_steps, want_steps, strict=True)):
                assert torch.allclose(got.double(), want, atol=1e-5, rtol=0), (name, step, (got - want).abs().max())
    base_first = results[None][0][1][0]
    assert (results[method][0][1][0] - base_first).abs().max() > 1e-3, "the adapter changes nothing"


# ------------------------------------------------------------------------------------------ the docs table


def test_the_table_in_the_docs_matches_this_parametrization():
    """Every (feature, family, method) cell of docs/guides/architectures.md is a test id here, and back; a cell
    marked ✗ is a known failure or a refusal here (regenerate with ``python scripts/architecture_table.py``)."""
    text = TABLE.read_text()
    cells, marked = set(), set()
    for feature, (_, methods) in FEATURES.items():
        section = text.split(f"<!-- feature: {feature} -->", 1)[1].split("<!-- end -->", 1)[0]
        header = [c.strip() for c in section.strip().splitlines()[0].strip("|").split("|")]
        assert header[1:] == methods, (feature, header)
        for line in section.strip().splitlines()[2:]:
            row = [c.strip() for c in line.strip().strip("|").split("|")]
            family = row[0].strip("`")
            for method, cell in zip(methods, row[1:], strict=True):
                cells.add((feature, family, method))
                if cell.startswith("✗"):
                    marked.add((feature, family, method))
                else:
                    assert re.match(r"^(✓|–)", cell), (feature, family, method, cell)
    expected = {(f, fam, m) for f, (_, methods) in FEATURES.items() for fam in FAMILIES for m in methods}
    assert cells == expected
    assert marked == set(KNOWN_FAILURES) | set(REFUSED), marked ^ (set(KNOWN_FAILURES) | set(REFUSED))


@pytest.mark.parametrize("max_length, refused", [(60, False), (61, True)])
def test_prompt_tuning_is_refused_only_where_the_window_would_hide_the_soft_prompt(tokenizer, max_length, refused):
    """A window of 64 tokens shows 4 virtual tokens to the first 60 positions: data.max_length 60 trains, 61 stops."""
    from transformers import AutoModelForCausalLM

    from _architectures import mistral

    config = mistral()
    config.sliding_window, config.vocab_size = 64, len(tokenizer)
    model = AutoModelForCausalLM.from_config(config)
    run = run_config("prompt", {**METHOD_SECTIONS["prompt"], "data": {"train": "x.jsonl", "max_length": max_length}})
    if refused:
        with pytest.raises(ConfigError, match=r"^method prompt on mistral: its sliding window \(64 tokens\) would "
                                              r"hide the 4 virtual tokens from positions past 60; set data.max_length "
                                              r"to at most 60 or use lora, adapter or ia3$"):
            apply_method(model, run, tokenizer)
    else:
        apply_method(model, run, tokenizer)


def test_lora_dropout_on_moe_experts_is_refused_in_one_line_naming_the_key(tokenizer):
    """peft adapts an MoE's stacked expert weights as parameters (``ParamWrapper``), which cannot have dropout: the
    default ``lora.dropout`` 0.05 is refused with the key and the fix, not peft's traceback; 0 trains the experts."""
    from tuneforge.methods.lora.config import LoraConfig
    from tuneforge.methods.lora.model import apply_lora

    with pytest.raises(ConfigError, match=r"lora\.dropout: 0\.05 .*qwen3_moe.*set lora\.dropout: 0"):
        apply_lora(build("qwen3-moe", tokenizer), LoraConfig(dropout=0.05))
    model = apply_lora(build("qwen3-moe", tokenizer), LoraConfig(dropout=0.0))
    assert any("experts" in n and p.requires_grad for n, p in model.named_parameters())
