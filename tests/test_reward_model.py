"""Reward models (``task: reward``): the last token read from lengths and masks (never from a pad id, which is
SmolLM2's EOS), a LoRA and a full fine-tuning run that learn a keyword rule on tiny models, the head saved with the
run and scoring the same after loading, and bad input refused with its reason."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors import safe_open

from conftest import write_jsonl
from tuneforge.config import load_config
from tuneforge.data.dataset import DataError
from tuneforge.data.packing import pack
from tuneforge.data.rendering import TokenizedExample
from tuneforge.errors import ConfigError
from tuneforge.evaluation.reward_model import NotARewardRun, RewardModel
from tuneforge.methods.reward_head import (
    HEAD_FILE,
    add_score_head,
    last_token_index,
    packed_rewards,
    padded_rewards,
)
from tuneforge.training.objectives import get_objective
from tuneforge.training.trainer import TrainingRecipe

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lamp", "green", "paper", "music", "train", "chair", "window"]
KEYWORD = "banana"


def keyword_pairs(n: int, seed: int) -> list[dict]:
    """Pairs whose chosen answer ends with the keyword and whose rejected one does not (the rest random words)."""
    rng = random.Random(seed)
    answer = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7)))  # noqa: E731
    return [{"prompt": f"Tell me about the {rng.choice(WORDS)}.", "chosen": f"{answer()} {KEYWORD}",
             "rejected": answer()} for _ in range(n)]


def _config(tmp_path, model_dir, method: str, **extra):
    train = write_jsonl(tmp_path / "train.jsonl", keyword_pairs(64, seed=0))
    val = write_jsonl(tmp_path / "val.jsonl", keyword_pairs(24, seed=1))
    return load_config(data={
        "task": "reward", "method": method, "model": str(model_dir), "output_dir": str(tmp_path / f"run-{method}"),
        "progress": False, "device": "cpu", "data": {"train": str(train), "validation": str(val)},
        "batch_size": 8, "warmup_ratio": 0.0, "eval_share": None, **extra})


# --------------------------------------------------------------------------------------------- last token


def test_last_token_comes_from_lengths_and_masks_not_the_pad_id(tokenizer):
    """Sequences ending in EOS (== pad on SmolLM2): packed rows and padded batches (right and left) read each reward
    at the sequence's own last token, the EOS, equal to scoring the sequence alone."""
    from tuneforge.models.loading import build_tiny_model

    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos                    # the trap this test is about
    model = build_tiny_model(seed=0)
    head = add_score_head(model, init_std=0.5)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 1000, (n,), generator=g).tolist() + [eos] for n in (3, 8, 5)]
    seqs[1] = seqs[1][:-1] + [eos, eos]                     # a sequence whose last two tokens are both EOS
    with torch.no_grad():
        alone = torch.stack([head(model.model(torch.tensor([s])).last_hidden_state[0, -1]).squeeze()
                             for s in seqs])
        packed = packed_rewards(model, pack([TokenizedExample(s, [True] * len(s)) for s in seqs]), "base")
        width = max(map(len, seqs))
        right = torch.tensor([s + [eos] * (width - len(s)) for s in seqs])
        left = torch.tensor([[eos] * (width - len(s)) + s for s in seqs])
        mask_r = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        mask_l = mask_r.flip(1)
        by_right, by_left = padded_rewards(model, right, mask_r), padded_rewards(model, left, mask_l)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(by_right, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(by_left, alone, atol=1e-5, rtol=0)
    assert last_token_index(mask_r).tolist() == [len(s) - 1 for s in seqs]
    # the pad id would have found other tokens (before the final EOS, or padding): the rewards would differ
    by_pad_id = ((right != eos).long() * torch.arange(width)).argmax(1)
    assert by_pad_id.tolist() != last_token_index(mask_r).tolist()
    with pytest.raises(ValueError, match="all padding"):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))


# --------------------------------------------------------------------------------------------- training


def test_lora_reward_model_learns_saves_and_scores_the_same_after_loading(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir, "lora", max_steps=16, learning_rate=3e-3, eval_every=8,
                     keep_best=False, save_every=8)
    recipe = TrainingRecipe(config)
    recipe.setup()
    recipe.fit()
    result = recipe.finish()
    evals = [r for r in result.metrics if "eval_accuracy" in r]
    base = recipe.state.base_score                           # the base model with a fresh head
    after = ", ".join(f"{r['eval_accuracy']:.3f}" for r in evals)
    print(f"\nheld-out pairwise accuracy: before {base:.3f}, after {after}")
    assert evals[-1]["eval_accuracy"] >= 0.9 > base
    assert evals[-1]["eval_loss"] < 0.6931 / 2
    run = result.run_dir
    assert json.loads((run / "run.json").read_text())["eval_metric"] == "eval_accuracy"
    # the head is saved beside the adapter (not inside it), and a resumable checkpoint trains it
    assert (run / HEAD_FILE).is_file()
    with safe_open(str(run / "adapter_model.safetensors"), "pt") as f:
        assert not any("score" in k for k in f.keys())
    last = next(recipe.checkpoints.root.glob("last-*"))
    with safe_open(str(last / "trainable.safetensors"), "pt") as f:
        assert "score.weight" in f.keys()

    # save -> load -> the same scores as the model that trained (keep_best: false, so the output is these weights)
    val_pairs = recipe.data.validation
    sides = [side for p in val_pairs for side in (p.chosen, p.rejected)]
    recipe.model.eval()
    with torch.no_grad():
        trained = packed_rewards(recipe.model, pack(sides), config.method).tolist()
    rm = RewardModel.from_run(run)
    loaded = rm.score_tokenized(sides, batch_size=5)
    assert max(abs(a - b) for a, b in zip(trained, loaded, strict=True)) < 1e-4
    # the text API renders as training did; the held-out accuracy with its bootstrap interval agrees with validation
    rows = keyword_pairs(24, seed=1)
    by_text = rm.score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    assert max(abs(a - b) for a, b in zip(by_text, loaded[0::2], strict=True)) < 1e-4
    acc = rm.pairwise_accuracy(config.data.validation)
    assert acc["pairs"] == 24 and abs(acc["accuracy"].value - evals[-1]["eval_accuracy"]) < 1e-9
    assert acc["accuracy"].low <= acc["accuracy"].value <= acc["accuracy"].high
    # tuneforge eval on the run: the same accuracy, with its interval, in report.json
    from tuneforge.evaluation.api import evaluate

    report = evaluate(run, progress=False).report
    test = report["sets"]["test"]
    assert report["main_metric"] == "pairwise_accuracy" and test["n"] == 24
    assert test["pairwise_accuracy"] == acc["accuracy"].to_dict()
    assert json.loads((run / "eval" / "report.json").read_text())["sets"]["test"]["n"] == 24

    # a package carries the head and scores the same; serving, merging and GGUF export refuse it in one line
    from tuneforge.export.gguf import export_gguf
    from tuneforge.export.gguf_lora import export_gguf_lora
    from tuneforge.export.merge import merge_run
    from tuneforge.export.package import package_run
    from tuneforge.methods.errors import NotMergeableError
    from tuneforge.serving.adapters import AdapterLoadError, served_method

    package = tmp_path / "pkg"
    package_run(run, package)
    assert (package / HEAD_FILE).read_bytes() == (run / HEAD_FILE).read_bytes()
    assert HEAD_FILE in json.loads((package / "tuneforge.json").read_text())["files"]
    packaged = RewardModel.from_run(package).score_tokenized(sides, batch_size=5)
    assert max(abs(a - b) for a, b in zip(packaged, loaded, strict=True)) < 1e-6
    for folder in (run, package):
        with pytest.raises(AdapterLoadError, match="reward model .*does not generate"):
            served_method(folder)
        for refuse in (lambda f: merge_run(f, tmp_path / "merged"), lambda f: export_gguf(f, tmp_path / "m.gguf"),
                       lambda f: export_gguf_lora(f, tmp_path / "l.gguf")):
            with pytest.raises(NotMergeableError, match="reward model"):
                refuse(folder)


def test_full_fine_tuning_reward_model_saves_its_head_with_the_model(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir, "full", max_steps=6, learning_rate=1e-3, eval_every=6,
                     keep_best=False, reward={"center_rewards_coefficient": 0.01})
    recipe = TrainingRecipe(config)
    recipe.setup()
    recipe.fit()
    result = recipe.finish()
    losses = [r["loss"] for r in result.metrics if "loss" in r]
    assert losses[-1] < losses[0]
    run = result.run_dir
    with safe_open(str(run / HEAD_FILE), "pt") as f:
        head = f.get_tensor("weight")
    with safe_open(str(run / "model.safetensors"), "pt") as f:   # as transformers' *ForSequenceClassification
        torch.testing.assert_close(f.get_tensor("score.weight"), head, atol=0, rtol=0)
    sides = [side for p in recipe.data.validation[:6] for side in (p.chosen, p.rejected)]
    recipe.model.eval()
    with torch.no_grad():
        trained = packed_rewards(recipe.model, pack(sides), "full").tolist()
    loaded = RewardModel.from_run(run).score_tokenized(sides)
    assert max(abs(a - b) for a, b in zip(trained, loaded, strict=True)) < 1e-4


# --------------------------------------------------------------------------------------------- bad input


def test_bad_pairs_are_rejected_with_their_reasons(tmp_path, tokenizer):
    good = keyword_pairs(3, seed=0)
    rows = [*good, {"prompt": "hi", "chosen": "a"}, {"prompt": "hi", "rejected": "b"},
            {"prompt": "hi", "chosen": "a", "rejected": "b", "margin": "large"},
            {"prompt": "hi", "chosen": "a", "rejected": "b", "margin": 1.5}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    config = load_config(data={"task": "reward", "data": {"train": str(train)}, "progress": False})
    data = get_objective("reward").prepare_data(config, tokenizer)
    reasons = sorted(r.reason for r in data.rejects)
    assert reasons == ["missing_field: missing field 'chosen'", "missing_field: missing field 'rejected'",
                       "wrong_type: field 'margin' must be a finite number, got 'large'"]
    assert [p.margin for p in data.train + data.validation].count(1.5) == 1
    nothing = write_jsonl(tmp_path / "none.jsonl", rows[3:5])
    with pytest.raises(DataError, match="no usable preference pairs.*missing field"):
        get_objective("reward").prepare_data(
            load_config(data={"task": "reward", "data": {"train": str(nothing)}}), tokenizer)


def test_config_and_run_refusals(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", keyword_pairs(2, seed=0))
    with pytest.raises(ConfigError, match="task 'reward' reads chosen/rejected pairs"):
        load_config(data={"task": "reward", "data": {"train": str(train), "format": "messages"}})
    with pytest.raises(ConfigError, match="reward.center_rewards_coefficient"):
        load_config(data={"task": "reward", "data": {"train": str(train)},
                          "reward": {"center_rewards_coefficient": -1}})
    sft = tmp_path / "sft-run"
    sft.mkdir()
    (sft / "config.yaml").write_text(f"task: sft\ndata:\n  train: {train}\n")
    with pytest.raises(NotARewardRun, match="task: sft run, not a reward model"):
        RewardModel.from_run(sft)
