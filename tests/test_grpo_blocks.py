"""GRPO's blocks of rollouts: a run resumed from a checkpoint inside a ``num_iterations > 1`` block trains on the
block's saved rollouts and ends bitwise as the uninterrupted run; DAPO's dynamic sampling refills a micro-batch whose
groups were filtered out (``grpo.max_refill_rounds``) up to ``batch_size`` groups, ``max_refill_rounds: 0`` trains
on the groups left (as before refill), and resume stays exact with refill on."""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch
from safetensors.torch import load_file

from test_grpo import grpo_config, reward_module  # noqa: F401  (the fixture)
from tuneforge.errors import ConfigError
from tuneforge.training.trainer import TrainingRecipe, train

FLAT_REWARDS = '''
def half_flat(prompts, completions, completion_ids, flat, **kw):
    """0 for every completion of a prompt whose record says flat (a group without reward variance); else the share
    of even token ids of the completion (it varies between the tiny random model's sampled completions)."""
    return [0.0 if f else sum(t % 2 == 0 for t in ids) / len(ids) for f, ids in zip(flat, completion_ids)]
'''


@pytest.fixture(scope="module")
def flat_reward(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flat_rewards")
    (folder / "grpo_flat_rewards.py").write_text(FLAT_REWARDS)
    sys.path.insert(0, str(folder))
    yield "grpo_flat_rewards:half_flat"
    sys.path.remove(str(folder))


def half_flat_prompts(n: int) -> list[dict]:
    """``n`` prompts, every other one flat (its reward is the same for all its completions)."""
    return [{"prompt": f"Say something about item {i}.", "flat": i % 2 == 0} for i in range(n)]


def refill_config(tiny_model_dir, tmp_path, ids_file, reward: str, name="run", grpo=None, **overrides):
    return grpo_config(tiny_model_dir, tmp_path, ids_file, name=name, rows=half_flat_prompts(16), batch_size=4,
                       grpo={"loss_type": "dapo", "temperature": 0.7, "rewards": [{"name": reward}], **(grpo or {})},
                       **overrides)


def _cut_and_resume(config, steps: int):
    """Train ``steps`` steps of ``config``, save the ``last`` checkpoint, drop the recipe (its rollouts with it), add
    a line to samples.jsonl as a run killed after that checkpoint would have, then ``train(config, resume=True)``."""
    recipe = TrainingRecipe(config)
    recipe.setup()
    recipe.loop_start = 0.0
    for _ in range(steps):
        recipe.metrics.log(**recipe.train_step())
        recipe.state.metrics_rows += 1
    recipe.save_checkpoint("last")
    recipe.metrics.close()
    del recipe
    with open(config.output_dir + "/samples.jsonl", "a") as f:    # what a run killed after its checkpoint wrote
        f.write('{"epoch": 0, "micro_batch": 99, "completion": "sampled after the checkpoint"}\n')
    return train(config, resume=True)


def _assert_same_run(whole, resumed, keys=("loss", "reward", "completions/mean_length", "grad_norm", "kl")):
    assert [r["step"] for r in resumed.metrics] == [r["step"] for r in whole.metrics]
    for a, b in zip(whole.metrics, resumed.metrics, strict=True):
        for key in keys:
            assert a.get(key) == b.get(key), (key, a, b)
    wa = load_file(str(whole.run_dir / "adapter_model.safetensors"))
    wb = load_file(str(resumed.run_dir / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    samples = [[{**row, "prompt": row["prompt"].rsplit(":", 1)[-1]}          # file:line, the files named apart
                for row in map(json.loads, (p / "samples.jsonl").read_text().splitlines())]
               for p in (whole.run_dir, resumed.run_dir)]
    assert samples[0] and samples[0] == samples[1]   # the killed run's line after the checkpoint gone, none twice


def test_resume_inside_a_num_iterations_block_is_exact(tiny_model_dir, tmp_path, reward_module):  # noqa: F811
    """Blocks of 2 micro-batches trained 2 steps each (steps 1-2, 3-4); the checkpoint after step 3 falls inside
    the second block: the resumed run must train step 4 on step 3's rollouts, not on new ones."""
    common = {"max_steps": 4, "on_divergence": "off", "gradient_accumulation_steps": 2,
              "grpo": {"loss_type": "grpo", "temperature": 0.3, "num_iterations": 2, "beta": 0.04}}
    whole = train(grpo_config(tiny_model_dir, tmp_path, reward_module, name="whole", **common))
    rewards = [r["reward"] for r in whole.metrics]
    assert rewards[2] == rewards[3] and rewards[1] != rewards[2]     # step 3 starts a block, step 4 reuses it
    resumed = _cut_and_resume(grpo_config(tiny_model_dir, tmp_path, reward_module, name="cut", **common), 3)
    _assert_same_run(whole, resumed)


def _first_rollout(config):
    recipe = TrainingRecipe(config)
    recipe.setup()
    batch = recipe._next_micro_batches(1)[0]
    recipe.objective.normaliser(batch)
    recipe.metrics.close()
    return batch, recipe


def _group_spreads(rollout, group: int) -> torch.Tensor:
    return rollout.advantages.view(-1, group).std(dim=1)


def test_refill_fills_the_micro_batch_with_groups_of_varied_rewards(tiny_model_dir, tmp_path, reward_module,  # noqa: F811
                                                                    flat_reward):
    batch, _ = _first_rollout(refill_config(tiny_model_dir, tmp_path, reward_module, flat_reward, name="none",
                                            grpo={"max_refill_rounds": 0}))
    flat = sum(p.fields["flat"] for p in batch.prompts)
    assert 0 < flat < 4                                  # the first micro-batch has both kinds
    assert batch.rollout.num_sequences == (4 - flat) * 4     # today's filter: the flat groups dropped, not replaced
    batch, recipe = _first_rollout(refill_config(tiny_model_dir, tmp_path, reward_module, flat_reward, name="refill",
                                                 grpo={"max_refill_rounds": 4}))
    rollout = batch.rollout
    assert rollout.num_sequences == 16                   # batch_size groups of G, after refill
    assert bool((_group_spreads(rollout, 4) > 0).all())  # every trained group's rewards vary
    metrics = recipe.objective.mean_metrics({}, 1.0)
    assert metrics["num_gen_batches"] >= 2 and metrics["refill/missing_groups"] == 0
    assert metrics["refill/prompts"] == 4 * (metrics["num_gen_batches"] - 1)


def test_refill_that_hits_its_bound_trains_on_fewer_groups_and_warns_once(tiny_model_dir, tmp_path,
                                                                          reward_module, flat_reward, caplog):  # noqa: F811
    rows = [{"prompt": f"Say something about item {i}.", "flat": True} for i in range(8)]
    config = grpo_config(tiny_model_dir, tmp_path, reward_module, rows=rows, batch_size=4, max_steps=2,
                         grpo={"loss_type": "dapo", "max_refill_rounds": 2, "rewards": [{"name": flat_reward}]})
    with caplog.at_level(logging.WARNING, logger="tuneforge.training.objectives.grpo"):
        result = train(config)
    assert [r["num_gen_batches"] for r in result.metrics] == [3, 3]
    assert [r["refill/missing_groups"] for r in result.metrics] == [4, 4]
    assert [r["refill/prompts"] for r in result.metrics] == [8, 8]
    warned = [r for r in caplog.records if "max_refill_rounds 2" in r.getMessage()]
    assert len(warned) == 1 and "0 of 4 groups" in warned[0].getMessage()


def test_resume_with_refill_is_exact(tiny_model_dir, tmp_path, reward_module, flat_reward):  # noqa: F811
    """Refill rounds draw their prompts and samples from the micro-batch's key: a run resumed inside a
    num_iterations block with refill on ends as the uninterrupted one."""
    def config(name):
        return refill_config(tiny_model_dir, tmp_path, reward_module, flat_reward, name=name, max_steps=4,
                             on_divergence="off", gradient_accumulation_steps=2,
                             grpo={"num_iterations": 2, "max_refill_rounds": 3})

    whole = train(config("whole"))
    assert any(r["num_gen_batches"] > 1 for r in whole.metrics)
    _assert_same_run(whole, _cut_and_resume(config("cut"), 3),
                     keys=("loss", "reward", "grad_norm", "num_gen_batches", "refill/prompts"))


def test_refill_setting_is_checked(tiny_model_dir, tmp_path, reward_module):  # noqa: F811
    with pytest.raises(ConfigError, match="grpo.max_refill_rounds 2 refills the groups dynamic sampling drops, which "
                                          "is off here"):
        grpo_config(tiny_model_dir, tmp_path, reward_module, grpo={"loss_type": "grpo", "max_refill_rounds": 2})
    with pytest.raises(ConfigError, match="max_refill_rounds"):
        grpo_config(tiny_model_dir, tmp_path, reward_module, grpo={"max_refill_rounds": -1})
    grpo_config(tiny_model_dir, tmp_path, reward_module, grpo={"loss_type": "grpo"})      # the default: no error
