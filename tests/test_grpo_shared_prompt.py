"""GRPO's shared-prompt rows (``grpo.share_prompt``): each prompt once, followed by its completions, computes what a
copy of the prompt per completion computes: the layout, the attention kernel, log-probabilities and gradients, and a
whole run."""

from __future__ import annotations

import pytest
import torch

from test_grpo import grpo_config, reward_module  # noqa: F401  (the fixture)
from tuneforge.data.packing import IGNORE, pack, pack_shared_prompts
from tuneforge.data.rendering import TokenizedExample
from tuneforge.kernels.packed_attention import packed_sdpa_attention
from tuneforge.training.trainer import TrainingRecipe, train

PROMPTS = [[5, 6, 7], [8, 9]]
COMPLETIONS = [[[10, 11], [12], [13, 14, 15]], [[16, 17, 18, 19], [20]]]


def test_the_layout():
    b = pack_shared_prompts(list(zip(PROMPTS, COMPLETIONS, strict=True)))
    assert b.input_ids[0].tolist() == [5, 6, 7, 10, 11, 12, 13, 14, 15, 8, 9, 16, 17, 18, 19, 20]
    assert b.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 3, 4, 5, 0, 1, 2, 3, 4, 5, 2]
    assert b.lengths == [9, 7] and b.cu_seqlens.tolist() == [0, 9, 16]
    # each completion's first token is predicted at its prompt's last position (2, then 10)
    assert b.loss_positions.tolist() == [2, 3, 2, 2, 6, 7, 10, 11, 12, 13, 10]
    assert b.loss_targets.tolist() == [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    assert b.loss_example.tolist() == [0, 0, 1, 2, 2, 2, 3, 3, 3, 3, 4]
    assert b.num_examples == 5 and b.num_loss_tokens == 11 and bool((b.targets == IGNORE).all())
    allowed, positions = b.tree[0]
    assert positions.tolist() == [0, 1, 2, 3, 4, 3, 3, 4, 5]
    assert allowed.int().tolist() == [           # rows: queries, columns: keys
        [1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0],             # completion 1 sees the prompt and itself
        [1, 1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 1, 0, 0, 0],             # completion 2: not completion 1
        [1, 1, 1, 0, 0, 0, 1, 0, 0],
        [1, 1, 1, 0, 0, 0, 1, 1, 0],
        [1, 1, 1, 0, 0, 0, 1, 1, 1]]
    moved = b.to("cpu")
    assert moved.loss_targets is not None and moved.tree is not None and len(moved.tree) == 2


@pytest.mark.parametrize("window,softcap,kv_heads", [(None, None, 4), (None, None, 2), (3, None, 2), (None, 5.0, 2),
                                                     (2, 5.0, 4)])
def test_the_kernel_computes_each_copy(window, softcap, kv_heads):
    """Attention of a shared-prompt segment equals causal attention over ``prompt + completion`` for each
    completion (GQA, a sliding window counted in positions, Gemma 2's soft cap)."""
    torch.manual_seed(0)
    b = pack_shared_prompts([(PROMPTS[0], COMPLETIONS[0])])
    n, H, D = b.num_tokens, 4, 8
    q, k, v = torch.randn(1, H, n, D), torch.randn(1, kv_heads, n, D), torch.randn(1, kv_heads, n, D)
    module = torch.nn.Module().eval()
    kwargs = {"sliding_window": window, "softcap": softcap}
    out, _ = packed_sdpa_attention(module, q, k, v, None, position_ids=b.position_ids, cu_seq_lens_q=b.cu_seqlens,
                                   tuneforge_tree=b.tree, **kwargs)           # [1, n, H, D]
    P = start = len(PROMPTS[0])
    rows = list(range(P))
    for c in COMPLETIONS[0]:
        own = list(range(start, start + len(c)))
        idx = torch.tensor(rows + own)
        alone, _ = packed_sdpa_attention(module, q[:, :, idx], k[:, :, idx], v[:, :, idx], None,
                                         position_ids=torch.arange(len(idx))[None], **kwargs)
        torch.testing.assert_close(out[0, own], alone[0, P:], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out[0, :P], alone[0, :P], atol=1e-6, rtol=1e-5)
        start += len(c)


def _recipe(tiny_model_dir, tmp_path, ids_file, name, **grpo):
    config = grpo_config(tiny_model_dir, tmp_path, ids_file, name=name, gradient_checkpointing=True,
                         lora={"dropout": 0.0}, grpo={"temperature": 1.0, **grpo})
    recipe = TrainingRecipe(config)
    recipe.setup()
    return recipe, config


def test_log_probabilities_and_gradients_equal_a_copy_per_completion(tiny_model_dir, tmp_path, reward_module):  # noqa: F811
    """On the tiny model with LoRA and gradient checkpointing (the masks must reach the recomputed forward):
    the shared row's per-token log-probabilities and the adapter's gradients equal those of one sequence per
    completion."""
    from tuneforge.training.grpo_rollout import completion_logps, completion_mask

    recipe, config = _recipe(tiny_model_dir, tmp_path, reward_module, "grads")
    assert recipe.objective.share_prompt
    model = recipe.model
    model.train()
    with torch.no_grad():                   # B = 0 at first would leave A without a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
    groups = list(zip(PROMPTS, COMPLETIONS, strict=True))
    shared = pack_shared_prompts(groups)
    copies = pack([TokenizedExample(p + c, [False] * len(p) + [True] * len(c)) for p, cs in groups for c in cs])
    weights = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    results = []
    for batch in (shared, copies):
        model.zero_grad(set_to_none=True)
        logps = completion_logps(model, batch, config)
        (logps * weights[:, :logps.shape[1]] * completion_mask(batch)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logps.detach(), completion_mask(batch), grads))
    (a, mask_a, grads_a), (b, mask_b, grads_b) = results
    assert torch.equal(mask_a, mask_b) and grads_a.keys() == grads_b.keys() and grads_a
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_a_run_with_shared_prompts_trains_as_one_with_copies(tiny_model_dir, tmp_path, reward_module):  # noqa: F811
    """Three steps with and without ``share_prompt``: the same samples, rewards, losses and gradient norms (to
    float rounding), and fewer tokens in the trained row."""
    common = {"max_steps": 3, "lora": {"dropout": 0.0},       # dropout would draw other masks for other shapes
              "grpo": {"temperature": 0.3, "loss_type": "grpo", "beta": 0.04}}
    runs = {}
    for share in (True, False):
        config = grpo_config(tiny_model_dir, tmp_path, reward_module, name=f"share-{share}", **common)
        config.grpo.share_prompt = share
        runs[share] = train(config)
    for a, b in zip(runs[True].metrics, runs[False].metrics, strict=True):
        assert a["reward"] == b["reward"] and a["completions/mean_length"] == b["completions/mean_length"]
        for key in ("loss", "grad_norm", "kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a, b)
    assert sum(r["tokens"] for r in runs[True].metrics) < sum(r["tokens"] for r in runs[False].metrics)


def test_methods_with_their_own_forward_keep_a_copy_per_completion(tiny_model_dir, tmp_path, reward_module):  # noqa: F811
    recipe, _ = _recipe(tiny_model_dir, tmp_path, reward_module, "prefix")
    assert recipe.objective.share_prompt
    config = grpo_config(tiny_model_dir, tmp_path, reward_module, name="prefix2", method="prefix")
    prefix = TrainingRecipe(config)
    prefix.setup()
    assert not prefix.objective.share_prompt
    batch = prefix._next_micro_batches(1)[0]
    prefix.objective.normaliser(batch)
    assert batch.rollout.packed.tree is None
