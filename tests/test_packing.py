"""Packing is exact: a packed row gives the same per-example losses as running each example alone."""

import torch
import torch.nn.functional as F

from tuneforge.data.formats import Example
from tuneforge.data.packing import IGNORE, pack
from tuneforge.data.rendering import tokenize_example
from tuneforge.methods.loss import packed_loss_sum


def _examples(tokenizer):
    convs = [("Where is my order #B77?", "shipping"), ("I was charged twice for the Pro plan.", "billing"),
             ("App crashes on start", "bug"), ("Please add dark mode to the dashboard, it would be great.", "feature")]
    out = [tokenize_example(Example(messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}]),
                            tokenizer) for q, a in convs]
    hello = Example(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    out.append(tokenize_example(hello, tokenizer, train_on="all"))
    return out


def _unpacked_loss(model, ex):
    """Reference: the example alone, no packing, standard shifted cross-entropy."""
    ids = torch.tensor([ex.input_ids])
    labels = torch.tensor([[t if m else IGNORE for t, m in zip(ex.input_ids, ex.trained, strict=True)]])
    logits = model(input_ids=ids, use_cache=False).logits
    loss = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=IGNORE, reduction="sum")
    return loss, int((labels[0, 1:] != IGNORE).sum())


def test_positions_restart_and_targets_stay_inside_each_example(tokenizer):
    exs = _examples(tokenizer)
    batch = pack(exs)
    assert batch.input_ids.shape == (1, sum(len(e) for e in exs))
    starts = [0]
    for e in exs[:-1]:
        starts.append(starts[-1] + len(e))
    pos = batch.position_ids[0].tolist()
    assert [pos[s] for s in starts] == [0] * len(exs)
    for s, e in zip(starts, exs, strict=False):  # the last token of each example predicts nothing
        assert batch.targets[0, s + len(e) - 1] == IGNORE
    assert batch.num_loss_tokens == sum(sum(e.trained[1:]) for e in exs)


def test_packed_loss_equals_unpacked_losses(tiny_model, tokenizer):
    exs = _examples(tokenizer)
    with torch.no_grad():
        ref = [_unpacked_loss(tiny_model, e) for e in exs]
        packed_total = packed_loss_sum(tiny_model, pack(exs)).item()
        # per example: pack each example with different neighbours, recover its own loss
        for i, e in enumerate(exs):
            others = exs[:i] + exs[i + 1:]
            with_neighbours = packed_loss_sum(tiny_model, pack(others[:2] + [e] + others[2:])).item()
            without = packed_loss_sum(tiny_model, pack(others)).item()
            assert abs((with_neighbours - without) - ref[i][0].item()) < 1e-3  # sums of ~10 token losses
    ref_sum = sum(r[0].item() for r in ref)
    ref_count = sum(r[1] for r in ref)
    # the packed token-mean loss equals the token-weighted mean of the unpacked per-example losses
    assert abs(packed_total / ref_count - ref_sum / ref_count) < 1e-5


def test_packed_logits_equal_unpacked_logits(tiny_model, tokenizer):
    exs = _examples(tokenizer)[:3]
    batch = pack(exs)
    with torch.no_grad():
        packed = tiny_model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits[0]
        offset = 0
        for e in exs:
            alone = tiny_model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0]
            assert torch.allclose(packed[offset:offset + len(e)], alone, atol=1e-5)
            offset += len(e)


def test_cross_attention_would_change_the_loss(tiny_model, tokenizer):
    """Guard that the test above can fail: without restarting positions examples see each other."""
    exs = _examples(tokenizer)[:3]
    batch = pack(exs)
    with torch.no_grad():
        packed = tiny_model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits[0]
        leaky = tiny_model(input_ids=batch.input_ids, use_cache=False).logits[0]
    n0 = len(exs[0])
    assert torch.allclose(packed[:n0], leaky[:n0], atol=1e-5)
    assert not torch.allclose(packed[n0:], leaky[n0:], atol=1e-3)


def test_packed_attention_equals_unpacked_and_skips_cross_example_work(tiny_model, tokenizer):
    from tuneforge.kernels.packed_attention import NAME, set_attention

    exs = _examples(tokenizer)
    batch = pack(exs)
    with torch.no_grad():
        dense = tiny_model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits[0]
        assert set_attention(tiny_model, NAME) == "sdpa"
        varlen = tiny_model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits[0]
        offset = 0
        for e in exs:
            set_attention(tiny_model, "sdpa")
            alone = tiny_model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0]
            assert torch.allclose(varlen[offset:offset + len(e)], alone, atol=1e-5)
            offset += len(e)
            set_attention(tiny_model, NAME)
    assert torch.allclose(dense, varlen, atol=1e-5)
    # the loss and its gradient agree with the dense block-causal path
    set_attention(tiny_model, NAME)
    loss_v = packed_loss_sum(tiny_model, batch)
    loss_v.backward()
    grad_v = tiny_model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    tiny_model.zero_grad()
    set_attention(tiny_model, "sdpa")
    loss_d = packed_loss_sum(tiny_model, batch)
    loss_d.backward()
    assert abs(loss_v.item() - loss_d.item()) < 1e-4
    assert torch.allclose(grad_v, tiny_model.model.layers[0].self_attn.q_proj.weight.grad, atol=1e-5)


def test_examples_and_pairs_train_in_the_one_epoch_order():
    """Examples and preference pairs draw their micro-batches from one generator (epoch_order): the same indices
    for the same (seed, epoch), a resumed stream (start) continues it, another epoch reshuffles."""
    from tuneforge.data.packing import epoch_order, micro_batches
    from tuneforge.data.preference import TokenizedPair
    from tuneforge.data.rendering import TokenizedExample
    from tuneforge.training.objectives.preference import pair_micro_batches

    examples = [TokenizedExample([1, 2 + i, 3], [False, True, True]) for i in range(10)]
    pairs = [TokenizedPair.of(e, TokenizedExample([1, 9, 3], [False, True, True])) for e in examples]
    order = list(epoch_order(10, 3, seed=7, epoch=2))
    assert sorted(i for ids in order for i in ids) == list(range(10)) and [len(ids) for ids in order] == [3, 3, 3, 1]
    assert [b.example_ids for b in micro_batches(examples, 3, 7, 2)] == order
    assert [b.example_ids for b in pair_micro_batches(pairs, 3, 7, 2)] == order
    assert [b.example_ids for b in micro_batches(examples, 3, 7, 2, start=2)] == order[2:]
    assert order != list(epoch_order(10, 3, seed=7, epoch=3))
    assert list(epoch_order(10, 3, seed=7, epoch=2, shuffle=False))[0] == [0, 1, 2]
