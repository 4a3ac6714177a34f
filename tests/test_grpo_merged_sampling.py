"""GRPO's rollouts through merged LoRA weight copies (``grpo.merged_sampling``): the same model while it lasts, the
trained weights bitwise untouched after, all-or-nothing for adapters it cannot merge."""

from __future__ import annotations

import torch

from test_grpo import grpo_config, reward_module  # noqa: F401  (the fixture)
from tuneforge.methods.lora.sampling import merged_copies
from tuneforge.methods.registry import get_method
from tuneforge.training.trainer import TrainingRecipe

IDS = torch.tensor([[1, 50, 300, 7000, 12, 99, 4000, 5]])


def _recipe(tiny_model_dir, tmp_path, ids_file, name, **overrides):
    recipe = TrainingRecipe(grpo_config(tiny_model_dir, tmp_path, ids_file, name=name, **overrides))
    recipe.setup()
    with torch.no_grad():                   # B = 0 at first: the adapter would change nothing
        for n, p in recipe.model.named_parameters():
            if "lora_B" in n or "lora_magnitude" in n:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    recipe.model.eval()
    return recipe


def _weights(model):
    return {n: (p, p.detach().clone()) for n, p in model.named_parameters()}


def test_the_merged_model_computes_the_adapted_one_and_the_weights_come_back_untouched(tiny_model_dir, tmp_path,
                                                                                      reward_module):  # noqa: F811
    model = _recipe(tiny_model_dir, tmp_path, reward_module, "lora").model
    before = _weights(model)
    with torch.no_grad():
        adapted = model(input_ids=IDS).logits
        with model.disable_adapter():
            base = model(input_ids=IDS).logits
        with merged_copies(model) as merged:
            inside = model(input_ids=IDS).logits
            swapped = sum(1 for n, p in model.named_parameters() if n in before and p is not before[n][0])
        after = model(input_ids=IDS).logits
    assert merged and swapped > 0
    assert (adapted - base).abs().max() > 1e-3                       # the adapter does change the model
    torch.testing.assert_close(inside, adapted, atol=1e-5, rtol=1e-5)
    assert torch.equal(after, adapted)
    for n, p in model.named_parameters():                            # the same tensors, bitwise the same values
        assert p is before[n][0] and torch.equal(p, before[n][1]), n


def test_dora_is_left_as_it_is(tiny_model_dir, tmp_path, reward_module):  # noqa: F811
    model = _recipe(tiny_model_dir, tmp_path, reward_module, "dora", lora={"use_dora": True}).model
    before = _weights(model)
    with merged_copies(model) as merged:
        assert not merged
        assert all(p is before[n][0] for n, p in model.named_parameters())


def test_rollouts_sample_inside_the_block_unless_turned_off(tiny_model_dir, tmp_path, reward_module,  # noqa: F811
                                                          monkeypatch):
    import dataclasses

    import tuneforge.training.grpo_rollout as rollout

    entered = []

    def spy(model):
        entered.append(True)
        return merged_copies(model)

    lora = dataclasses.replace(get_method("lora"), merged_sampling=spy)
    monkeypatch.setattr(rollout, "get_method", lambda name: lora)
    for on in (True, False):
        entered.clear()
        recipe = _recipe(tiny_model_dir, tmp_path, reward_module, f"spy-{on}", grpo={"merged_sampling": on})
        batch = recipe._next_micro_batches(1)[0]
        recipe.objective.normaliser(batch)
        assert bool(entered) is on
