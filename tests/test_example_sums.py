"""Per-example loss sums from a packed row: each example's summed cross-entropy equals that example run
alone, for the plain and the chunked loss, for every method; gradients match autograd's reference; the
boundaries computed when packing are the ones attention uses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _method_helpers import HAS_BNB, METHOD_SECTIONS, run_config
from tuneforge.data.packing import example_index, example_lengths, pack
from tuneforge.data.rendering import TokenizedExample
from tuneforge.kernels.cross_entropy import cross_entropy_segment_sums
from tuneforge.kernels.packed_attention import NAME, set_attention
from tuneforge.methods import apply_method
from tuneforge.methods.loss import packed_example_loss_sums, packed_loss_sum

SECTIONS = METHOD_SECTIONS


def _examples(lengths=(7, 4, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, 49152, (n,), generator=g).tolist()
        trained = [False] * (n // 2) + [True] * (n - n // 2)       # a prompt, then a trained completion
        out.append(TokenizedExample(input_ids=ids, trained=trained))
    return out


def _alone(model, examples):
    """Each example's summed cross-entropy over its trained tokens, run alone through the model (with
    transformers' SDPA: the packed attention is for packed training rows only)."""
    previous = set_attention(model, "sdpa")
    sums = []
    for ex in examples:
        ids = torch.tensor([ex.input_ids])
        logits = model(input_ids=ids, use_cache=False).logits[0, -len(ex.input_ids):].float()
        keep = [p for p in range(len(ex.input_ids) - 1) if ex.trained[p + 1]]
        sums.append(F.cross_entropy(logits[keep], ids[0, [p + 1 for p in keep]], reduction="sum"))
    set_attention(model, previous)
    return torch.stack(sums)


def test_pack_records_the_boundaries():
    examples = _examples()
    batch = pack(examples)
    assert batch.lengths == [7, 4, 9] and batch.cu_seqlens.tolist() == [0, 7, 11, 20]
    assert example_lengths(batch.position_ids) == batch.lengths
    assert torch.equal(batch.loss_example, example_index(batch.lengths)[batch.loss_positions])
    # trained tokens per example: positions p whose next token is trained, within the example
    assert torch.bincount(batch.loss_example).tolist() == [4, 2, 5]


@pytest.mark.parametrize("method", list(SECTIONS))
@pytest.mark.parametrize("chunked", ["off", "on"])
def test_example_sums_equal_each_example_alone(method, chunked, tiny_model):
    if method == "qlora" and not HAS_BNB:
        pytest.skip("bitsandbytes not installed")
    config = run_config(method, SECTIONS[method])
    model = apply_method(tiny_model, config).eval()
    set_attention(model, NAME)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.numel() < 100_000:
                p.add_(0.05 * torch.randn_like(p))
    examples = _examples()
    batch = pack(examples)
    with torch.no_grad():
        sums = packed_example_loss_sums(model, batch, method, chunked)
        total = packed_loss_sum(model, batch, method, chunked)
        reference = _alone(model, examples)
    assert sums.shape == (3,) and sums.dtype == torch.float32
    torch.testing.assert_close(sums, reference, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sums.sum(), total, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("chunked", ["off", "on"])
def test_example_sum_gradients_match_autograd(chunked, tiny_model):
    """d(w . sums)/d(params) equals autograd through F.cross_entropy(reduction='none') + index_add."""
    config = run_config("lora", SECTIONS["lora"])
    model = apply_method(tiny_model, config)
    set_attention(model, NAME)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    batch = pack(_examples())
    weights = torch.tensor([1.0, -2.0, 0.5])
    params = [p for p in model.parameters() if p.requires_grad]

    (packed_example_loss_sums(model, batch, "lora", chunked) * weights).sum().backward()
    ours = [p.grad.clone() for p in params]
    model.zero_grad()
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                   logits_to_keep=batch.loss_positions).logits[0].float()
    nll = F.cross_entropy(logits, batch.targets[0, batch.loss_positions], reduction="none")
    (torch.zeros(3).index_add(0, batch.loss_example, nll) * weights).sum().backward()
    for a, p in zip(ours, params, strict=False):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def test_segment_sums_kernel_matches_reference_value_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(10, 50, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (10,))
    segment = torch.tensor([0, 0, 1, 1, 1, 1, 3, 3, 3, 3])         # example 2 has no targets
    out = cross_entropy_segment_sums(logits.float(), targets, segment, 4)
    ref = torch.zeros(4, dtype=torch.float64).index_add(0, segment, F.cross_entropy(logits, targets, reduction="none"))
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    assert out[2] == 0
    g = torch.tensor([0.3, -1.0, 2.0, 0.7])
    leaf = logits.detach().float().requires_grad_(True)
    (cross_entropy_segment_sums(leaf, targets, segment, 4) * g).sum().backward()
    (ref * g.double()).sum().backward()
    torch.testing.assert_close(leaf.grad.double(), logits.grad, rtol=1e-5, atol=1e-6)


def test_attention_uses_the_batch_boundaries(tiny_model, monkeypatch):
    """The packed attention splits at the packed batch's cu_seqlens, not by re-reading position ids."""
    from tuneforge.kernels import packed_attention

    config = run_config("lora", SECTIONS["lora"])
    model = apply_method(tiny_model, config).eval()
    set_attention(model, NAME)
    seen = []
    original = packed_attention.packed_sdpa_attention

    def spy(module, q, k, v, mask, **kwargs):
        seen.append(kwargs.get("cu_seq_lens_q"))
        return original(module, q, k, v, mask, **kwargs)

    from transformers import AttentionInterface
    AttentionInterface.register(NAME, spy)
    try:
        batch = pack(_examples())
        with torch.no_grad():
            packed_loss_sum(model, batch, "lora", "off")
    finally:
        AttentionInterface.register(NAME, original)
    assert seen and all(c is not None and c.tolist() == [0, 7, 11, 20] for c in seen)
