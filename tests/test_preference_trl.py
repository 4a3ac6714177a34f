"""Each preference loss equals TRL 1.16's own code on the same inputs, to 1e-6.

TRL runs in its own cached virtualenv (``benchmarks/throughput/venvs.py``; built here on first use, a few
minutes, so CI builds it rather than skipping): ``tests/trl_preference_losses.py`` runs
``DPOTrainer._compute_loss`` itself (sigmoid, ipo, hinge, robust, and its ``sft`` term) with a stub model
returning the saved per-token log-probabilities, ``CPOTrainer.cpo_loss`` (simpo) and
``ORPOTrainer.odds_ratio_loss`` (orpo), and we compare the mean loss and TRL's logged metrics.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tuneforge.training.preference_losses import preference_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "throughput"))
import venvs  # noqa: E402

SCRIPT = Path(__file__).with_name("trl_preference_losses.py")
BETA, SMOOTHING, GAMMA = 0.1, 0.1, 0.5
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def _inputs(seed: int, equal_chosen_lengths: bool) -> dict:
    """Per-token log-probs of 6 pairs' answers (zero outside each answer), reference sums, settings."""
    g = torch.Generator().manual_seed(seed)
    n, T = 6, 12
    lengths = lambda: (torch.full((n,), 7) if equal_chosen_lengths  # noqa: E731
                       else torch.randint(1, T + 1, (n,), generator=g))
    chosen_len, rejected_len = lengths(), torch.randint(1, T + 1, (n,), generator=g)
    mask = lambda lens: (torch.arange(T)[None] < lens[:, None]).double()  # noqa: E731
    chosen_mask, rejected_mask = mask(chosen_len), mask(rejected_len)
    chosen_tok = -3 * torch.rand(n, T, generator=g, dtype=torch.float64) * chosen_mask
    rejected_tok = -3 * torch.rand(n, T, generator=g, dtype=torch.float64) * rejected_mask
    ref_chosen = chosen_tok.sum(1) + torch.randn(n, generator=g, dtype=torch.float64)
    ref_rejected = rejected_tok.sum(1) + torch.randn(n, generator=g, dtype=torch.float64)
    return {"chosen_tok": chosen_tok, "rejected_tok": rejected_tok, "chosen_mask": chosen_mask,
            "rejected_mask": rejected_mask, "ref_chosen": ref_chosen, "ref_rejected": ref_rejected, "beta": BETA,
            "label_smoothing": SMOOTHING, "simpo_gamma": GAMMA}


def _ours(inp: dict, loss: str, sft_weight: float = 0.0) -> dict[str, float]:
    chosen, rejected = inp["chosen_tok"].sum(1), inp["rejected_tok"].sum(1)
    losses, rc, rr = preference_loss(loss, chosen, rejected, inp["ref_chosen"], inp["ref_rejected"],
                                     inp["chosen_mask"].sum(1), inp["rejected_mask"].sum(1), BETA,
                                     label_smoothing=SMOOTHING if loss in ("robust", "simpo") else 0.0,
                                     simpo_gamma=GAMMA, sft_weight=sft_weight)
    return {"loss": losses.mean().item(), "rewards/chosen": rc.mean().item(), "rewards/rejected": rr.mean().item(),
            "rewards/accuracies": (rc > rr).double().mean().item(), "rewards/margins": (rc - rr).mean().item(),
            "logps/chosen": chosen.mean().item(), "logps/rejected": rejected.mean().item()}


@pytest.fixture(scope="module")
def trl_results(tmp_path_factory):
    python, versions = venvs.ensure_venv(venvs.TRL)
    assert python is not None, f"TRL's venv could not be built: {versions}"
    work = tmp_path_factory.mktemp("trl")
    inputs = [_inputs(0, equal_chosen_lengths=False), _inputs(1, equal_chosen_lengths=True)]
    torch.save(inputs, work / "in.pt")
    subprocess.run([str(python), str(SCRIPT), str(work / "in.pt"), str(work / "out.pt")], check=True, timeout=600)
    results = torch.load(work / "out.pt")
    assert results[0]["trl_version"] == "1.16.0"
    return inputs, results


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge", "robust"])
def test_dpo_family_losses_and_metrics_equal_trls_dpo_trainer(loss, trl_results):
    for inp, trl in zip(*trl_results, strict=True):
        ours = _ours(inp, loss)
        assert abs(ours["loss"] - trl[loss]["loss"]) < 1e-6, (ours["loss"], trl[loss]["loss"])
        for key in METRICS:
            assert abs(ours[key] - trl[loss][key]) < 1e-6, (key, ours[key], trl[loss][key])


def test_simpo_equals_trls_cpo_trainer(trl_results):
    for inp, trl in zip(*trl_results, strict=True):
        ours = _ours(inp, "simpo")
        for key in ("loss", "rewards/chosen", "rewards/rejected"):
            assert abs(ours[key] - trl["simpo"][key]) < 1e-6, (key, ours[key], trl["simpo"][key])


def test_orpo_equals_trls_orpo_trainer(trl_results):
    for (inp, trl), equal in zip(zip(*trl_results, strict=True), (False, True), strict=True):
        ours = _ours(inp, "orpo")                                   # the odds-ratio term alone
        assert abs(ours["loss"] - trl["orpo"]["odds_ratio_loss"]) < 1e-6
        for key in ("rewards/chosen", "rewards/rejected"):
            assert abs(ours[key] - trl["orpo"][key]) < 1e-6
        # with its NLL term: ours is the mean over pairs of each chosen answer's mean token NLL (so the loss stays
        # a mean over pairs and accumulation-exact), TRL's the token mean over the batch: equal for equal lengths
        total = _ours(inp, "orpo", sft_weight=1.0)["loss"]
        assert (abs(total - trl["orpo"]["loss"]) < 1e-6) == equal


def test_sft_term_equals_trls_sft_loss_for_equal_answer_lengths(trl_results):
    inp, trl = trl_results[0][1], trl_results[1][1]
    added = _ours(inp, "sigmoid", sft_weight=1.0)["loss"] - _ours(inp, "sigmoid")["loss"]
    assert abs(added - trl["sft"]["loss"]) < 1e-6
