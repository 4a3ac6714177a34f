"""Reference log-probabilities on demand (``preference.reference: precomputed``): computed for a pair the first time
its micro-batch is used and cached on it, against the reference of computing every pair before step 1: the same
losses and metrics; only the pairs a run uses are computed, each once across epochs; validation pairs at the first
evaluation; the evaluation of the base model stays the base's when it computes them (nested disabling); and a
reference swapped in under autocast leaves the policy's forward and gradients as they are without it."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from test_preference import config_for, recipe_for, rule_pairs
from tuneforge.training.objectives.preference import PreferenceObjective

LN2 = math.log(2)
COMPARED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "grad_norm", "eval_loss", "eval_rewards/margins", "eval_logps/rejected")


def every_pair_before_step_1(monkeypatch) -> None:
    """What ``reference: precomputed`` did before: every train and validation pair, in rows of 4 x batch_size,
    before the first step."""
    original = PreferenceObjective.before_training

    def before_training(self, model, data, config, device):
        original(self, model, data, config, device)
        self.compute_references(model, [*data.train, *data.validation], config, device, per_row=4 * config.batch_size)

    monkeypatch.setattr(PreferenceObjective, "before_training", before_training)


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_on_demand_equals_every_pair_before_step_1(method, tiny_model_dir, tmp_path, monkeypatch):
    # dropout on (lora): the reference pass must draw no random numbers wherever it runs; 2 epochs: cached pairs
    common = {"rows": rule_pairs(16), "max_steps": 8, "eval_every": 3, "lora": {"dropout": 0.1}}
    on_demand = recipe_for(config_for(tiny_model_dir, tmp_path, method, name="demand", **common))
    on_demand.fit()
    with monkeypatch.context() as m:
        every_pair_before_step_1(m)
        before = recipe_for(config_for(tiny_model_dir, tmp_path, method, name="before", **common))
    assert all(p.reference is not None for p in [*before.data.train, *before.data.validation])
    before.fit()
    rows_a, rows_b = on_demand.metrics.rows, before.metrics.rows
    assert len(rows_a) == len(rows_b) == 8 and sum("eval_loss" in r for r in rows_a) == 3
    for a, b in zip(rows_a, rows_b, strict=True):
        for key in COMPARED:
            if key in a or key in b:
                assert abs(a[key] - b[key]) < 1e-6, (key, a, b)
    refs = [(p.reference, q.reference) for p, q in zip(on_demand.data.train, before.data.train, strict=True)]
    assert max(abs(x - y) for a, b in refs for x, y in zip(a, b, strict=True)) < 1e-5


def test_only_the_pairs_a_run_uses_are_computed_once_each(tiny_model_dir, tmp_path, caplog):
    # 18 train pairs, 2 a micro-batch: 2 steps visit 4 of them; the evaluation at step 2 all 6 validation pairs
    recipe = recipe_for(config_for(tiny_model_dir, tmp_path, max_steps=2, eval_every=2, eval_base=False))
    data = recipe.data
    assert all(p.reference is None for p in [*data.train, *data.validation])
    used: list[int] = []
    next_batches = recipe._next_micro_batches

    def spy(n):
        batches = next_batches(n)
        used.extend(i for b in batches for i in b.example_ids)
        return batches

    recipe._next_micro_batches = spy
    with caplog.at_level(logging.INFO, logger="tuneforge.training.objectives.preference"):
        recipe.fit()
    assert len(used) == 4
    assert {i for i, p in enumerate(data.train) if p.reference is not None} == set(used)
    assert all(p.reference is not None for p in data.validation)
    assert recipe.objective.computed["train"] == 4 and recipe.objective.computed["validation"] == 6
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "reference log-probabilities of 6 validation pairs computed in" in logged
    assert "computed once for 4 train and 6 validation pairs" in logged

    # three epochs over 6 train pairs: each pair's reference is computed once, in the first
    again = recipe_for(config_for(tiny_model_dir, tmp_path, name="epochs", rows=rule_pairs(8), max_steps=9,
                                  eval_every=3))
    again.fit()
    assert again.objective.computed["train"] == len(again.data.train) == 6
    assert again.objective.computed["validation"] == len(again.data.validation) == 2


def test_the_base_evaluation_stays_the_base_while_it_computes_the_reference(tiny_model_dir, tmp_path):
    """Prefix tuning is not the base model at step 0; the evaluation of the base disables it, and the reference pass
    it runs (the validation pairs' first use) disables it again inside: when that inner block ends the prefix must
    stay off, so the base's preference loss is ln 2 exactly."""
    recipe = recipe_for(config_for(tiny_model_dir, tmp_path, "prefix", max_steps=1))
    recipe.evaluate_base()
    assert abs(recipe.state.base_score - LN2) < 1e-6
    assert recipe.objective.computed["validation"] == len(recipe.data.validation)


def test_an_init_reference_under_autocast_leaves_the_policy_forward_and_gradients_alone(tiny_model_dir, tmp_path):
    """bf16 autocast keeps casts of trained parameters for its whole block: the reference pass (the init adapter
    swapped in, no grad) must not leave its casts for the policy's forward after it in the same block."""
    from tuneforge.training.objectives.reference import FrozenWeights

    recipe = recipe_for(config_for(tiny_model_dir, tmp_path, max_steps=1, lora={"dropout": 0.0}))
    model, config, objective = recipe.model, recipe.config, recipe.objective
    objective.init_weights = FrozenWeights(model)           # the reference: the adapter as it is now ...
    torch.manual_seed(0)
    with torch.no_grad():                                   # ... then the policy moves away from it
        for p in objective.init_weights.params:
            p.add_(0.05 * torch.randn_like(p))
    batch = recipe._next_micro_batches(1)[0]

    def step() -> tuple[dict, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = objective.loss(model, batch, config)
        out.loss_sum.backward()
        return out.metrics, [p.grad.clone() for p in objective.init_weights.params]

    first, first_grads = step()                             # the reference computed inside the block
    assert all(p.reference is not None for p in batch.pairs)
    again, again_grads = step()                             # cached: no reference pass in the block
    assert first == again
    assert all(g.abs().max() > 0 for g in first_grads)
    for a, b in zip(first_grads, again_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    ref = torch.tensor([p.reference for p in batch.pairs])
    assert (ref[:, 0].sum() - first["logps/chosen"]).abs() > 1e-3      # the policy moved: not the reference
