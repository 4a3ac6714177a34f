"""The chunked LM-head cross-entropy equals the plain one (value and gradients), and the trainer's loss
switches to it only when the logits would be large."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _method_helpers import run_config
from tuneforge.kernels import chunked_loss
from tuneforge.kernels.chunked_loss import chunked_cross_entropy_sum, use_chunked_loss
from tuneforge.methods import apply_method
from tuneforge.methods.loss import packed_loss_sum


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_cross_entropy_equals_the_plain_one(chunk, bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    ours = chunked_cross_entropy_sum(hidden, head, targets, chunk=chunk)
    (ours * 0.5).backward()
    got = [hidden.grad.clone()] + [p.grad.clone() for p in head.parameters()]
    hidden.grad = None
    head.zero_grad()
    ref = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    (ref * 0.5).backward()
    want = [hidden.grad] + [p.grad for p in head.parameters()]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-6)
    for a, b in zip(got, want, strict=False):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _row():
    from tuneforge.data.packing import pack
    from tuneforge.data.rendering import TokenizedExample

    g = torch.Generator().manual_seed(0)
    return pack([TokenizedExample(torch.randint(0, 49152, (n,), generator=g).tolist(), [i % 3 != 0 for i in range(n)])
                 for n in (9, 5, 12)])


@pytest.mark.parametrize("method", ["lora", "full", "prompt"])
def test_packed_loss_is_the_same_chunked_or_not(tiny_model, method):
    sections = {"lora": {"lora": {"r": 4, "dropout": 0.0}}, "full": {}, "prompt": {"prompt": {"num_virtual_tokens": 3}}}
    model = apply_method(tiny_model, run_config(method, sections[method]))
    model.train()
    row = _row()
    results = []
    for mode in ("off", "on"):
        model.zero_grad()
        loss = packed_loss_sum(model, row, method, chunked=mode)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (plain, plain_grads), (chunked, chunked_grads) = results
    torch.testing.assert_close(chunked, plain, atol=1e-4, rtol=1e-6)
    assert plain_grads.keys() == chunked_grads.keys() and plain_grads
    for name in plain_grads:
        torch.testing.assert_close(chunked_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert type(tiny_model.lm_head) is torch.nn.Linear      # the head is back after the forward


def test_auto_chunks_only_large_logits(tiny_model, monkeypatch):
    vocab = tiny_model.config.vocab_size
    assert not use_chunked_loss(tiny_model, 10)
    assert use_chunked_loss(tiny_model, chunked_loss.DEFAULT_BUDGET_BYTES // (4 * vocab) + 1)
    assert use_chunked_loss(tiny_model, 1, "on") and not use_chunked_loss(tiny_model, 10 ** 9, "off")
    monkeypatch.setattr(tiny_model.config, "model_type", "gemma2")       # soft-capped logits: never chunked
    assert not use_chunked_loss(tiny_model, 10 ** 9, "on")


def test_a_chunk_holds_at_most_the_budgets_logits():
    from tuneforge.kernels.chunked_loss import chunk_positions

    assert chunk_positions(49152) == 1024          # SmolLM2: 192 MiB of logits in a chunk of the default size
    assert chunk_positions(262144) == 256          # Gemma 3: 256 MiB
    assert chunk_positions(10 ** 8) == 64


def test_the_estimator_models_the_same_chunking():
    from tuneforge.estimate.memory import CHUNKED_LOSS_BUDGET, CHUNKED_LOSS_CHUNK  # torch-free copies

    assert (CHUNKED_LOSS_BUDGET, CHUNKED_LOSS_CHUNK) == (chunked_loss.DEFAULT_BUDGET_BYTES, chunked_loss.DEFAULT_CHUNK)


@pytest.mark.parametrize("head_trains", [False, True])
def test_per_example_sums_and_their_gradients_equal_the_plain_ones(head_trains):
    """Per-example sums under unequal upstream weights: the hidden states' gradient computed in the forward and scaled
    per example (head frozen), or the head's recomputed in backward (head trained: its gradient needs the weights)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True).requires_grad_(head_trains)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    segment = torch.tensor([0] * 9 + [1] * 5 + [2] * 9)
    weights = torch.tensor([0.5, -2.0, 3.0])
    results = []
    for chunked in (True, False):
        hidden.grad = None
        head.zero_grad()
        if chunked:
            sums = chunked_cross_entropy_sum(hidden, head, targets, chunk=4, segment=segment, n=3)
        else:
            per_token = F.cross_entropy(head(hidden).float(), targets, reduction="none")
            sums = torch.zeros(3).index_add(0, segment, per_token)
        (sums * weights).sum().backward()
        results.append([sums.detach(), hidden.grad.clone()] + [p.grad.clone() for p in head.parameters()
                                                                 if p.grad is not None])
    assert len(results[0]) == (4 if head_trains else 2)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_the_gradients_come_from_the_forward_without_a_second_head_matmul(monkeypatch):
    """A plain sum's backward only scales what the forward computed: the LM head runs once per chunk in all."""
    calls = []
    original = chunked_loss._logits
    monkeypatch.setattr(chunked_loss, "_logits", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50)
    hidden = torch.randn(23, 16, requires_grad=True)
    loss = chunked_cross_entropy_sum(hidden, head, torch.randint(0, 50, (23,)), chunk=8)
    assert len(calls) == 3
    loss.backward()
    assert len(calls) == 3 and hidden.grad is not None and head.weight.grad is not None
