"""KTO (``task: kto``) against references: the loss, KL estimate and metrics equal TRL 1.16's ``KTOTrainer`` code
on the same tensors (``tests/trl_kto_loss.py`` in TRL's venv), its mismatched pairing equals TRL's dataset
preparation, the first step's loss is exactly 1/2 (policy == reference, the KL estimate 0), 2 x 4 accumulation
equals 1 x 8, precomputed references equal on-the-fly ones, a tiny model learns a rule from thumbs-up / down data,
and bad records go to rejects.jsonl (none usable: one line naming the file, exit status 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_jsonl
from test_preference import config_for, recipe_for
from tuneforge.data.dataset import DataError
from tuneforge.data.kto import KTOExample, parse_label, prepare_kto
from tuneforge.data.settings import DataConfig
from tuneforge.errors import ConfigError
from tuneforge.training.checkpoint import CheckpointDir
from tuneforge.training.objectives.kto import KTOBatch, KTOObjective, metric_sums, pack_kto
from tuneforge.training.preference_losses import kl_estimate, kto_loss, mismatched_partners
from tuneforge.training.trainer import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "throughput"))
import venvs  # noqa: E402

SCRIPT = Path(__file__).with_name("trl_kto_loss.py")
METRICS = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def rule_records(n: int, seed: int = 0) -> list[dict]:
    """Thumbs-up completions follow a rule (the two words in order, then 'Done.'), thumbs-down ones do not."""
    import random

    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "piano", "tiger", "lemon", "candle", "rocket", "garden"]
    rows = []
    for i in range(n):
        a, b = rng.sample(words, 2)
        good = i % 2 == 0
        rows.append({"prompt": f"Item {i}: combine {a} and {b}.", "completion": f"{a} {b}. Done." if good
                     else f"{b} {a}!", "label": good})
    return rows


def kto_config(tiny_model_dir, tmp_path, rows=None, **overrides):
    return config_for(tiny_model_dir, tmp_path, rows=rows if rows is not None else rule_records(24), task="kto",
                      **overrides)


# ------------------------------------------------------------------------------------------ TRL parity


def _case(seed: int, loss_type: str, labels: list[bool], weights=(1.0, 1.0), kl_shift: float = 0.5) -> dict:
    """Per-token log-probs of n completions and of their n mismatched sequences (zero outside each), reference
    sums (the mismatched ones offset by ``kl_shift``: negative gives a negative KL estimate, clamped), settings."""
    g = torch.Generator().manual_seed(seed)
    n = len(labels)

    def tokens(width: int) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.randint(1, width + 1, (n,), generator=g)
        mask = (torch.arange(width)[None] < lengths[:, None]).double()
        return -3 * torch.rand(n, width, generator=g, dtype=torch.float64) * mask, mask

    tok, mask = tokens(12)
    kl_tok, kl_mask = tokens(15)
    return {"tok": tok, "mask": mask, "kl_tok": kl_tok, "kl_mask": kl_mask,
            "ref": tok.sum(1) + torch.randn(n, generator=g, dtype=torch.float64),
            "ref_kl": kl_tok.sum(1) - kl_shift + 0.3 * torch.randn(n, generator=g, dtype=torch.float64),
            "label": torch.tensor(labels), "loss_type": loss_type, "beta": 0.1,
            "desirable_weight": weights[0], "undesirable_weight": weights[1]}


CASES = {
    "kto": _case(0, "kto", [True, False, True, True, False, False]),
    "kto_weights": _case(1, "kto", [True, False, False, False, True, False, False], weights=(1.33, 0.7)),
    "kto_negative_kl": _case(2, "kto", [False, True, True, False, True], kl_shift=-2.0),
    "kto_all_desirable": _case(3, "kto", [True, True, True, True]),
    "apo_zero_unpaired": _case(4, "apo_zero_unpaired", [True, False, True, False, False], weights=(1.0, 1.2)),
}
PAIRING = {"batch_size": 3, "records": [{"prompt": f"Question {i}?", "completion": f" Answer number {i}.",
                                         "label": i % 3 != 0} for i in range(8)]}


@pytest.fixture(scope="module")
def trl_results(tmp_path_factory, tiny_model_dir):
    python, versions = venvs.ensure_venv(venvs.TRL)
    assert python is not None, f"TRL's venv could not be built: {versions}"
    work = tmp_path_factory.mktemp("trl-kto")
    torch.save({"losses": list(CASES.values()), "pairing": PAIRING}, work / "in.pt")
    subprocess.run([str(python), str(SCRIPT), str(work / "in.pt"), str(work / "out.pt"), str(tiny_model_dir)],
                   check=True, timeout=600)
    results = torch.load(work / "out.pt")
    assert results["trl_version"] == "1.16.0"
    return dict(zip(CASES, results["losses"], strict=True)), results["pairing"]


def _ours(inp: dict) -> dict[str, float]:
    logps, kl_logps = inp["tok"].sum(1), inp["kl_tok"].sum(1)
    kl = kl_estimate(kl_logps, inp["ref_kl"]) if inp["loss_type"] == "kto" else torch.zeros((), dtype=torch.float64)
    losses, rewards = kto_loss(logps, inp["ref"], inp["label"], kl, inp["beta"], inp["desirable_weight"],
                               inp["undesirable_weight"], inp["loss_type"])
    n = len(logps)
    return {"loss": losses.sum().item() / n,        # the objective: loss sum / examples
            **KTOObjective("kto").mean_metrics(metric_sums(logps, rewards, inp["label"], kl), n)}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_kl_and_metrics_equal_trls_kto_trainer(case, trl_results):
    trl, ours = trl_results[0][case], _ours(CASES[case])
    assert abs(ours["loss"] - trl["loss"]) < 1e-6, (ours["loss"], trl["loss"])
    present = [k for k in METRICS if k in trl]
    assert set(present) == {k for k in METRICS if k in ours}, (trl, ours)     # the same means are logged
    for key in present:
        assert abs(ours[key] - trl[key]) < 1e-6, (key, ours[key], trl[key])
    if case == "kto_negative_kl":
        assert ours["kl"] == 0.0                    # clamped: the raw estimate is negative
    if case == "kto_all_desirable":
        assert "rewards/rejected" not in ours and "rewards/margins" not in ours


def test_mismatched_pairing_equals_trls(trl_results):
    # TRL rotates the completions within each batch of 3 of the (sequentially sampled) data set: 3, 3, then 2
    n, k = len(PAIRING["records"]), PAIRING["batch_size"]
    ours = [first + j for first in range(0, n, k) for j in mismatched_partners(min(k, n - first))]
    assert ours == trl_results[1] and ours[:3] == [2, 0, 1]


def test_a_batch_mismatched_row_is_each_prompt_with_the_previous_completion(tokenizer):
    cfg = DataConfig(train="x.jsonl")
    from tuneforge.data.kto import to_kto, tokenize_kto

    examples = [tokenize_kto(to_kto(r)[0], tokenizer, cfg)[0] for r in rule_records(3)]
    batch = pack_kto(examples)
    row = batch.mismatched(max_length=10_000)
    assert row.num_examples == 3
    at = 0
    for i, (length, j) in enumerate(zip(row.lengths, [2, 0, 1], strict=True)):
        ids = row.input_ids[0, at:at + length].tolist()
        assert ids == examples[i].prompt.input_ids + examples[j].completion.input_ids
        at += length
    # the completions' trained tokens, and nothing of the prompts
    assert row.num_loss_tokens == sum(e.completion.num_trained for e in examples)
    short = batch.mismatched(max_length=len(examples[0].prompt) + 1)
    assert max(short.lengths) <= len(examples[0].prompt) + 1


# ------------------------------------------------------------------------------------------ training


def test_first_step_loss_is_one_half_and_the_kl_estimate_zero(tiny_model_dir, tmp_path):
    recipe = recipe_for(kto_config(tiny_model_dir, tmp_path, batch_size=4))
    batch = recipe._next_micro_batches(1)[0]
    assert isinstance(batch, KTOBatch)
    out = recipe.objective.loss(recipe.model, batch.to(recipe.device), recipe.config)
    assert out.normaliser == 4
    assert abs(out.loss_sum.item() / 4 - 0.5) < 1e-6               # 1 - sigma(0), policy == reference
    assert out.metrics["kl"] == 0.0
    assert abs(out.metrics["rewards/chosen"]) < 1e-6 and abs(out.metrics["rewards/rejected"]) < 1e-6
    recipe.metrics.close()


def test_a_tiny_model_learns_desirable_over_undesirable(tiny_model_dir, tmp_path):
    result = train(kto_config(tiny_model_dir, tmp_path, rows=rule_records(32), max_steps=12, batch_size=4,
                              eval_every=6, learning_rate=3e-2, kto={"beta": 0.5}))
    rows = result.metrics
    assert all("kl" in r and "loss" in r for r in rows)     # a micro-batch of one label has only that label's means
    assert sum(all(key in r for key in METRICS) for r in rows) > len(rows) // 2, rows
    evals = [r for r in rows if "eval_loss" in r]
    assert len(evals) == 2 and all(f"eval_{key}" in r for r in evals for key in METRICS)
    assert sum(r["loss"] for r in rows[-3:]) / 3 < rows[0]["loss"] - 0.05
    assert evals[-1]["eval_loss"] < 0.5 - 0.05
    assert evals[-1]["eval_rewards/chosen"] > evals[-1]["eval_rewards/rejected"]
    margins = [r["rewards/margins"] for r in rows[-4:] if "rewards/margins" in r]
    assert margins and min(margins) > 0, rows
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["task"] == "kto"


@pytest.mark.parametrize("loss", ["apo_zero_unpaired", "kto"])
def test_two_by_four_accumulation_equals_one_by_eight(loss, tiny_model_dir, tmp_path):
    # apo_zero_unpaired has no KL term: every step equal; kto's KL estimate is per micro-batch (as TRL's): equal at
    # step 1 (policy == reference, both estimates 0), then an estimate over 4 mismatched pairs against one over 8
    from safetensors.torch import load_file

    steps = 2 if loss == "apo_zero_unpaired" else 1
    common = {"rows": rule_records(20), "max_steps": steps, "learning_rate": 1e-3, "save_every": steps,
              "data": {"val_fraction": 0.0}, "lora": {"dropout": 0.0}, "kto": {"loss": loss}}
    one = train(kto_config(tiny_model_dir, tmp_path, name=f"b8{loss}", batch_size=8, **common))
    four = train(kto_config(tiny_model_dir, tmp_path, name=f"b4{loss}", batch_size=4, gradient_accumulation_steps=2,
                            **common))
    for a, b in zip(one.metrics, four.metrics, strict=True):
        for key in ("loss", *METRICS):
            assert abs(a[key] - b[key]) < 1e-5, (key, a[key], b[key])
        assert a["trained_tokens"] == b["trained_tokens"] == 8        # the normaliser: examples of the step
    w1, w4 = (load_file(str(CheckpointDir(r.run_dir / "checkpoints").current("last") / "trainable.safetensors"))
              for r in (one, four))
    for name in w1:
        torch.testing.assert_close(w1[name], w4[name], rtol=0, atol=1e-5)


def test_precomputed_reference_equals_on_the_fly(tiny_model_dir, tmp_path):
    common = {"max_steps": 3, "batch_size": 4, "lora": {"dropout": 0.1}, "eval_every": 3}
    pre = train(kto_config(tiny_model_dir, tmp_path, name="pre", **common))
    fly = train(kto_config(tiny_model_dir, tmp_path, name="fly", kto={"reference": "on_the_fly"}, **common))
    for a, b in zip(pre.metrics, fly.metrics, strict=True):
        for key in ("loss", "kl", "rewards/chosen", "rewards/margins", "eval_loss"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-5, (key, a, b)
    assert pre.metrics[-1]["kl"] > 0


def test_full_fine_tuning_trains_apo_zero_unpaired_and_refuses_the_kl_term(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="full fine-tuning keeps no copy of the base: use an adapter method"):
        kto_config(tiny_model_dir, tmp_path, method="full")
    with pytest.raises(ConfigError, match="batch_size to 2 or more"):
        kto_config(tiny_model_dir, tmp_path, batch_size=1)
    result = train(kto_config(tiny_model_dir, tmp_path, method="full", max_steps=2, kto={"loss": "apo_zero_unpaired"},
                              learning_rate=1e-4))
    assert result.metrics[0]["kl"] == 0.0 and abs(result.metrics[0]["loss"] - 0.5) < 1e-6


# ------------------------------------------------------------------------------------------ data


def test_labels_in_every_accepted_spelling():
    for value in (True, 1, "desirable", "UP", "thumbs_up", "👍", "true", " good "):
        assert parse_label(value) is True
    for value in (False, 0, "undesirable", "down", "thumbs_down", "👎", "0", "bad"):
        assert parse_label(value) is False


def test_bad_records_go_to_rejects_with_reasons_and_pairs_are_unpaired(tokenizer, tmp_path):
    good = rule_records(4)
    bad = [{"prompt": "q", "completion": "a"},                                  # 5: no label
           {"prompt": "q", "completion": "a", "label": "maybe"},                # 6: not a label
           {"prompt": "q", "completion": "  ", "label": True},                  # 7: empty completion
           {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},   # 8
           {"completion": "a", "label": 0},                                     # 9: no prompt
           {"prompt": "q", "completion": [{"role": "user", "content": "x"}], "label": 1},              # 10
           {"prompt": "q", "chosen": "yes", "rejected": "no"}]                  # 11: a pair: two examples
    path = write_jsonl(tmp_path / "kto.jsonl", good + bad)
    data = prepare_kto(DataConfig(train=str(path), val_fraction=0.0), tokenizer, seed=0, use_cache=False)
    assert [(r.line, r.reasons[0].check) for r in data.rejects] == [
        (5, "missing_field"), (6, "wrong_type"), (7, "empty_answer"), (8, "mixed_kinds"), (9, "missing_field"),
        (10, "turn_order")]
    assert "label" in data.rejects[0].reason and "'maybe'" in data.rejects[1].reason
    assert len(data.train) == 6 and [e.desirable for e in data.train][-2:] == [True, False]
    assert data.formats == {"kto_unpaired": 4, "kto_from_pair": 2}
    assert all(isinstance(e, KTOExample) and e.completion.num_trained > 0 and not any(e.prompt.trained)
               for e in data.train)


def test_records_without_labels_fail_in_one_line_naming_the_file_and_exit_2(tiny_model_dir, tokenizer, tmp_path,
                                                                            capsys):
    from tuneforge.cli import main

    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(4)]
    path = write_jsonl(tmp_path / "unlabelled.jsonl", rows)
    with pytest.raises(DataError) as e:
        prepare_kto(DataConfig(train=str(path)), tokenizer, seed=0, use_cache=False)
    message = str(e.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"{path}: no usable KTO records") and f"{path}:1: missing_field: missing field 'label'" \
        in message
    config = tmp_path / "kto.yaml"
    config.write_text(f"model: {tiny_model_dir}\ntask: kto\noutput_dir: {tmp_path / 'run'}\ndata:\n  train: {path}\n"
                      "progress: false\n")
    assert main(["train", str(config)]) == 2
    assert "no usable KTO records" in capsys.readouterr().err


def test_own_data_picks_kto_for_labelled_completions_and_its_config_loads(tmp_path):
    from tuneforge.own_data import detect_task, own_data_config

    labelled = write_jsonl(tmp_path / "feedback.jsonl", rule_records(6))
    unlabelled = write_jsonl(tmp_path / "sft.jsonl", [{k: v for k, v in r.items() if k != "label"}
                                                      for r in rule_records(6)])
    assert detect_task(labelled)[0] == "kto" and detect_task(unlabelled)[0] == "sft"
    config = own_data_config(labelled, [])
    assert config.task == "kto" and config.kto.loss == "kto" and config.batch_size >= 2
