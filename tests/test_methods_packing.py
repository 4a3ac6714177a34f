"""``method_forward`` on a packed row equals running each example alone, for every method.

Prefix tuning passes a KV cache (which turns off transformers' packed-row detection) and prompt tuning
prepends virtual tokens once per row; both have their own forward. The reference here is peft's plain
forward on each example separately, so a mask that lets examples see each other fails.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from _method_helpers import HAS_BNB, METHOD_SECTIONS, packed_row, perturbed, run_config
from tuneforge.methods import apply_method, method_forward, method_generate

SECTIONS = METHOD_SECTIONS
_perturbed = perturbed


@pytest.mark.parametrize("method", list(SECTIONS))
def test_packed_row_equals_each_example_alone(method, tiny_model):
    if method == "qlora" and not HAS_BNB:
        pytest.skip("bitsandbytes not installed")
    config = run_config(method, SECTIONS[method])
    model = _perturbed(apply_method(tiny_model, config))
    ids, pos, lengths = packed_row(lengths=(5, 3, 6))
    keep = torch.tensor([0, 2, 4, 5, 7, 8, 13])  # positions in all three examples
    with torch.no_grad():
        packed = method_forward(model, config, ids, pos, keep)
        alone = []
        start = 0
        for n in lengths:
            out = model(input_ids=ids[:, start:start + n], use_cache=False).logits[0]
            alone.append(out[-n:])  # prompt tuning returns the virtual positions too
            start += n
        reference = torch.cat(alone)[keep]
    assert packed.shape == (len(keep), tiny_model.config.vocab_size)
    torch.testing.assert_close(packed, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", list(SECTIONS))
def test_generation_matches_the_training_forward(method, tiny_model):
    """Cached generation (tuneforge's generate path, any transformers release we support) scores each step
    exactly as the training forward does: a method whose virtual tokens or adapters generation drops fails here."""
    if method == "qlora" and not HAS_BNB:
        pytest.skip("bitsandbytes not installed")
    config = run_config(method, SECTIONS[method])
    model = _perturbed(apply_method(tiny_model, config))
    ids = torch.randint(0, 49152, (1, 6), generator=torch.Generator().manual_seed(2))
    out = method_generate(model, config, input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                          do_sample=False, output_scores=True, return_dict_in_generate=True)
    seq = out.sequences
    assert seq.shape == (1, 10)
    assert torch.equal(seq[:, :6], ids)
    with torch.no_grad():
        for step, scores in enumerate(out.scores):
            T = 6 + step
            logits = method_forward(model, config, seq[:, :T], torch.arange(T)[None], torch.tensor([T - 1]))
            torch.testing.assert_close(scores[0], logits[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("method", ["prefix", "prompt", "adapter"])
def test_generation_ignores_nothing_the_method_learned(method, tiny_model):
    """The perturbed (trained-looking) model generates different scores from the base model: the check above
    would pass trivially if both paths dropped the method."""
    config = run_config(method, SECTIONS[method])
    model = _perturbed(apply_method(tiny_model, config))
    ids = torch.randint(0, 49152, (1, 6), generator=torch.Generator().manual_seed(2))
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                  output_scores=True, return_dict_in_generate=True)
    tuned = method_generate(model, config, **kwargs).scores[0]
    base = model.get_base_model()
    with model.disable_adapter() if method == "adapter" else contextlib.nullcontext():
        plain = base.generate(**kwargs).scores[0]
    assert (tuned - plain).abs().max() > 1e-2


@pytest.mark.parametrize("method", ["prefix", "prompt", "lora"])
def test_batched_left_padded_generation_equals_each_prompt_alone(method, tiny_model):
    config = run_config(method, SECTIONS[method])
    model = _perturbed(apply_method(tiny_model, config))
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 49152, (n,), generator=g) for n in (7, 4)]
    alone = [method_generate(model, config, input_ids=p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=3, do_sample=False)[0, len(p):] for p in prompts]
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), torch.ones(len(p), dtype=torch.long)])
                        for p in prompts])
    batched = method_generate(model, config, input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    for row, expected in zip(batched[:, width:], alone, strict=False):
        assert torch.equal(row, expected)
