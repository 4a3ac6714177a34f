"""GRPO's loss and advantages equal TRL 1.16's ``GRPOTrainer`` on the same tensors, to 1e-6: every ``loss_type``
(grpo, bnpo, dr_grpo, dapo) with ``beta`` 0 and > 0, symmetric and asymmetric clipping, old log-probabilities
given (``num_iterations`` > 1) or not, over steps of several micro-batches; the advantages for every
``scale_rewards``, several weighted reward functions and completions a function does not score.

TRL runs in its own cached virtualenv (``benchmarks/throughput/venvs.py``): ``tests/trl_grpo_loss.py`` calls
``GRPOTrainer._compute_loss`` itself with a stub model, and runs the advantage block of
``_generate_and_score_completions`` cut from TRL's own source.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tuneforge.training.grpo_losses import LOSS_TYPES, group_advantages, loss_sum, per_token_losses

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "throughput"))
import venvs  # noqa: E402

SCRIPT = Path(__file__).with_name("trl_grpo_loss.py")


def _micro_batch(g: torch.Generator, n: int, T: int, with_old: bool) -> dict:
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).double()
    logps = -3 * torch.rand(n, T, generator=g, dtype=torch.float64)
    # old and reference log-probs within about +-0.4 of the policy's: some ratios clip at eps 0.2, some do not
    old = logps + 0.4 * torch.randn(n, T, generator=g, dtype=torch.float64) if with_old else None
    ref = logps + 0.3 * torch.randn(n, T, generator=g, dtype=torch.float64)
    return {"logps": logps, "old": old, "ref": ref, "mask": mask,
            "advantages": torch.randn(n, generator=g, dtype=torch.float64)}


def _step(seed: int, loss_type: str, beta: float, epsilon_high: float | None, with_old: bool = True,
          micro: int = 3, n: int = 4, T: int = 9) -> dict:
    g = torch.Generator().manual_seed(seed)
    mbs = [_micro_batch(g, n, T, with_old) for _ in range(micro)]
    return {"micro_batches": mbs, "loss_type": loss_type, "beta": beta, "epsilon": 0.2, "epsilon_high": epsilon_high,
            "max_completion_length": T + 3, "num_items": int(sum(mb["mask"].sum() for mb in mbs))}


STEPS = [_step(i, loss_type, beta, eps_high, with_old)
         for i, (loss_type, beta, eps_high, with_old) in enumerate(
             (lt, beta, eps_high, with_old) for lt in LOSS_TYPES for beta in (0.0, 0.04)
             for eps_high, with_old in ((None, True), (0.28, True), (None, False)))]


def _scores(seed: int, n: int, funcs: int, nan_share: float = 0.0, ties: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 2, (n, funcs), generator=g).double() if ties else \
        torch.randn(n, funcs, generator=g, dtype=torch.float64)
    if nan_share:
        scores[torch.rand(n, funcs, generator=g) < nan_share] = torch.nan
    return scores


ADVANTAGES = [{"scores": _scores(i, 12, funcs, nan_share, ties), "weights": torch.tensor(weights[:funcs]),
               "num_generations": G, "scale_rewards": scale}
              for i, (funcs, nan_share, ties, weights, G, scale) in enumerate(
                  (funcs, nan_share, ties, (1.0, 0.5, 2.0), G, scale)
                  for scale in ("group", "batch", "none") for G in (3, 4)
                  for funcs, nan_share, ties in ((1, 0.0, False), (3, 0.0, True), (3, 0.3, False)))]


@pytest.fixture(scope="module")
def trl_results(tmp_path_factory):
    python, versions = venvs.ensure_venv(venvs.TRL)
    assert python is not None, f"TRL's venv could not be built: {versions}"
    work = tmp_path_factory.mktemp("trl-grpo")
    torch.save({"losses": STEPS, "advantages": ADVANTAGES}, work / "in.pt")
    subprocess.run([str(python), str(SCRIPT), str(work / "in.pt"), str(work / "out.pt")], check=True, timeout=600)
    out = torch.load(work / "out.pt")
    assert out["trl_version"] == "1.16.0"
    return out


def _ours(step: dict) -> tuple[float, list[dict]]:
    """The step's loss as the loop computes it (the micro-batches' sums over their units), and per micro-batch the
    metrics TRL logs."""
    total, units, metrics = 0.0, 0.0, []
    for mb in step["micro_batches"]:
        old = mb["old"] if mb["old"] is not None else mb["logps"].detach()
        tok = per_token_losses(mb["logps"], old, mb["ref"], mb["advantages"], step["beta"], step["epsilon"],
                               step["epsilon_high"] if step["epsilon_high"] is not None else step["epsilon"])
        s, u = loss_sum(tok.loss, mb["mask"], step["loss_type"], step["max_completion_length"])
        total, units = total + float(s), units + u
        mask = mb["mask"]
        mean = lambda x, mask=mask: float((x.double() * mask).sum() / mask.sum())  # noqa: E731
        logged = {"clip_ratio/low_mean": mean(tok.low_clipped), "clip_ratio/high_mean": mean(tok.high_clipped),
                  "clip_ratio/region_mean": mean(tok.low_clipped | tok.high_clipped)}
        if tok.kl is not None:
            logged["kl"] = mean(tok.kl)
        metrics.append(logged)
    return total / units, metrics


@pytest.mark.parametrize("i", range(len(STEPS)), ids=[f"{s['loss_type']}-beta{s['beta']}-epshigh{s['epsilon_high']}-"
                                                      f"old{s['micro_batches'][0]['old'] is not None}" for s in STEPS])
def test_loss_equals_trls_grpo_trainer(trl_results, i):
    ours, metrics = _ours(STEPS[i])
    trl = trl_results["losses"][i]
    assert ours == pytest.approx(trl["loss"], abs=1e-6, rel=1e-6)
    assert abs(trl["loss"]) > 1e-3                   # not trivially equal
    for mine, theirs in zip(metrics, trl["metrics"], strict=True):
        for key, value in mine.items():
            assert value == pytest.approx(theirs[key], abs=1e-6), key
    assert any(m["clip_ratio/region_mean"] > 0 for m in metrics) or STEPS[i]["micro_batches"][0]["old"] is None


def test_loss_types_differ(trl_results):
    """The cases tell the normalisations apart (a wrong one cannot pass as another)."""
    by_type = {STEPS[i]["loss_type"]: trl_results["losses"][i]["loss"] for i in range(0, len(STEPS), 6)}
    assert len({round(v, 6) for v in by_type.values()}) == len(LOSS_TYPES)


@pytest.mark.parametrize("i", range(len(ADVANTAGES)))
def test_advantages_equal_trls(trl_results, i):
    case, trl = ADVANTAGES[i], trl_results["advantages"][i]
    ours = group_advantages(case["scores"], case["weights"], case["num_generations"], case["scale_rewards"])
    torch.testing.assert_close(ours.advantages, trl["advantages"], atol=1e-6, rtol=1e-6)
    assert float(ours.zero_std.double().mean()) == pytest.approx(trl["frac_reward_zero_std"], abs=1e-9)
    assert float(torch.nanmean(ours.rewards)) == pytest.approx(trl["reward"], abs=1e-6)
