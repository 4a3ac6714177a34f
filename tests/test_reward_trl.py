"""The reward model's loss equals TRL 1.16's ``RewardTrainer.compute_loss`` on the same rewards, to 1e-6: plain
Bradley-Terry, with per-pair margins, and with ``center_rewards_coefficient``; and so do the objective's logged
``accuracy`` and ``margin``.

TRL runs in its own cached virtualenv (``benchmarks/throughput/venvs.py``, as ``tests/test_preference_trl.py``):
``tests/trl_reward_loss.py`` calls ``compute_loss`` itself with a stub model returning the saved rewards. One input
comes from our objective's own path (a tiny model's packed forward over pairs with margins, through
:meth:`RewardObjective.pair_losses`), so the pairing of chosen and rejected rows and the margin's sign are checked
as trained, not only the formula.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tuneforge.data.preference import TokenizedPair
from tuneforge.data.rendering import TokenizedExample
from tuneforge.methods.reward_head import add_score_head
from tuneforge.training.objectives.preference import pack_pairs
from tuneforge.training.objectives.reward import RewardObjective, pair_rewards
from tuneforge.training.reward_losses import bradley_terry_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "throughput"))
import venvs  # noqa: E402

SCRIPT = Path(__file__).with_name("trl_reward_loss.py")


def _random_inputs() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rand = lambda: torch.randn(7, generator=g, dtype=torch.float64)  # noqa: E731
    return [{"chosen": rand(), "rejected": rand(), "margin": margin, "center_rewards_coefficient": center}
            for margin, center in ((None, None), (rand().abs(), None), (None, 0.01), (rand().abs(), 0.05))]


def _objective_input() -> tuple[dict, float, dict]:
    """Rewards of 5 pairs from a tiny model through the objective, with its loss and metrics (means over pairs)."""
    from tuneforge.models.loading import build_tiny_model

    model = build_tiny_model(seed=0)
    add_score_head(model, init_std=0.5)             # rewards well apart from 0, so the terms are not all ln 2
    g = torch.Generator().manual_seed(1)
    seq = lambda n: TokenizedExample(torch.randint(0, 1000, (n,), generator=g).tolist(), [True] * n)  # noqa: E731
    pairs = [TokenizedPair.of(seq(5 + i), seq(9 - i)) for i in range(5)]
    for pair, margin in zip(pairs, (0.5, None, 1.0, 0.0, 2.0), strict=True):
        pair.margin = margin
    batch = pack_pairs(pairs)
    config = SimpleNamespace(method="base", reward=SimpleNamespace(center_rewards_coefficient=0.01))
    objective = RewardObjective("reward")
    with torch.no_grad():
        losses, metrics = objective.pair_losses(model, batch, config)
        rewards = torch.stack(pair_rewards(model, batch, config)).double()
    inp = {"chosen": rewards[0], "rejected": rewards[1],
           "margin": torch.tensor([0.5, 0.0, 1.0, 0.0, 2.0], dtype=torch.float64), "center_rewards_coefficient": 0.01}
    return inp, losses.mean().item(), {k: v / len(pairs) for k, v in metrics.items()}


@pytest.fixture(scope="module")
def trl_results(tmp_path_factory):
    python, versions = venvs.ensure_venv(venvs.TRL)
    assert python is not None, f"TRL's venv could not be built: {versions}"
    work = tmp_path_factory.mktemp("trl-reward")
    from_objective = _objective_input()
    inputs = [*_random_inputs(), from_objective[0]]
    torch.save(inputs, work / "in.pt")
    subprocess.run([str(python), str(SCRIPT), str(work / "in.pt"), str(work / "out.pt")], check=True, timeout=600)
    results = torch.load(work / "out.pt")
    assert results[0]["trl_version"] == "1.16.0"
    return inputs, results, from_objective


def test_bradley_terry_loss_equals_trls_reward_trainer(trl_results):
    inputs, results, _ = trl_results
    for inp, trl in zip(inputs, results, strict=True):
        ours = bradley_terry_loss(inp["chosen"], inp["rejected"], inp["margin"], inp["center_rewards_coefficient"])
        assert abs(ours.mean().item() - trl["loss"]) < 1e-6, (inp["margin"] is not None,
                                                              inp["center_rewards_coefficient"], ours.mean(), trl)
    # the margin and the centering term each change TRL's loss: the comparisons above test them
    assert len({round(r["loss"], 6) for r in results}) == len(results)


def test_objective_loss_and_metrics_equal_trls(trl_results):
    _, results, (_, loss, metrics) = trl_results
    trl = results[-1]
    assert abs(loss - trl["loss"]) < 1e-6, (loss, trl["loss"])
    for key in ("accuracy", "margin"):
        assert abs(metrics[key] - trl[key]) < 1e-6, (key, metrics[key], trl[key])
    assert 0 < trl["accuracy"] < 1                  # a mixed batch: the accuracy says which side is chosen
