"""GRPO's blocks of rollouts: a run resumed from a checkpoint inside a ``num_iterations > 1`` block trains on the
block's saved rollouts and ends bitwise as the uninterrupted run; DAPO's dynamic sampling refills a micro-batch whose
groups were filtered out (``grpo.max_refill_rounds``), and resume stays exact with it."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from test_grpo import grpo_config, reward_module  # noqa: F401  (the fixture)
from tuneforge.training.trainer import TrainingRecipe, train


def _cut_and_resume(config, steps: int):
    """Train ``steps`` steps of ``config``, save the ``last`` checkpoint, drop the recipe (its rollouts with it),
    then ``train(config, resume=True)``."""
    recipe = TrainingRecipe(config)
    recipe.setup()
    recipe.loop_start = 0.0
    for _ in range(steps):
        recipe.metrics.log(**recipe.train_step())
        recipe.state.metrics_rows += 1
    recipe.save_checkpoint("last")
    recipe.metrics.close()
    del recipe
    return train(config, resume=True)


def _assert_same_run(whole, resumed, keys=("loss", "reward", "completions/mean_length", "grad_norm", "kl")):
    assert [r["step"] for r in resumed.metrics] == [r["step"] for r in whole.metrics]
    for a, b in zip(whole.metrics, resumed.metrics, strict=True):
        for key in keys:
            assert a.get(key) == b.get(key), (key, a, b)
    wa = load_file(str(whole.run_dir / "adapter_model.safetensors"))
    wb = load_file(str(resumed.run_dir / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_inside_a_num_iterations_block_is_exact(tiny_model_dir, tmp_path, reward_module):  # noqa: F811
    """Blocks of 2 micro-batches trained 2 steps each (steps 1-2, 3-4, 5-6); the checkpoint after step 3 falls
    inside the second block: the resumed run must train step 4 on step 3's rollouts, not on new ones."""
    common = {"max_steps": 6, "on_divergence": "off", "gradient_accumulation_steps": 2,
              "grpo": {"loss_type": "grpo", "temperature": 0.3, "num_iterations": 2, "beta": 0.04}}
    whole = train(grpo_config(tiny_model_dir, tmp_path, reward_module, name="whole", **common))
    rewards = [r["reward"] for r in whole.metrics]
    assert rewards[2] == rewards[3] and rewards[1] != rewards[2]     # step 3 starts a block, step 4 reuses it
    resumed = _cut_and_resume(grpo_config(tiny_model_dir, tmp_path, reward_module, name="cut", **common), 3)
    _assert_same_run(whole, resumed)
