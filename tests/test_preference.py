"""Preference training (``task: preference``) on a tiny model, against references: ln 2 and zero rewards at
step 0, packed pairs == each sequence alone, precomputed == on-the-fly reference, 8 x 1 == 2 x 4
accumulation, and every method of the support matrix training through it. The reference computed on demand:
``test_preference_reference.py``; a run from an SFT run (``init_from``): ``test_init_from.py``."""

from __future__ import annotations

import json
import math
from decimal import Decimal, localcontext

import pytest
import torch
import torch.nn.functional as F

from _method_helpers import HAS_BNB, METHOD_SECTIONS, perturbed, run_config
from conftest import write_jsonl
from tuneforge.config import load_config
from tuneforge.data.preference import TokenizedPair
from tuneforge.data.rendering import TokenizedExample
from tuneforge.errors import ConfigError
from tuneforge.kernels.packed_attention import set_attention
from tuneforge.methods import apply_method
from tuneforge.training.checkpoint import CheckpointDir
from tuneforge.training.objectives.preference import PairBatch, answer_logps, pack_pairs, pair_micro_batches
from tuneforge.training.preference_losses import log1mexp, preference_loss
from tuneforge.training.trainer import TrainingRecipe, train

LN2 = math.log(2)
TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")


def rule_pairs(n: int, seed: int = 0) -> list[dict]:
    """Pairs whose chosen answer follows a rule (ends with 'Done.') and whose rejected one does not."""
    import random

    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "piano", "tiger", "lemon", "candle", "rocket", "garden"]
    rows = []
    for i in range(n):
        a, b = rng.sample(words, 2)
        rows.append({"prompt": f"Item {i}: combine {a} and {b}.", "chosen": f"{a} {b}. Done.",
                     "rejected": f"{b} {a}!"})
    return rows


def config_for(tiny_model_dir, tmp_path, method="lora", name="run", rows=None, **overrides):
    data = write_jsonl(tmp_path / f"{name}.jsonl", rows if rows is not None else rule_pairs(24))
    cfg = {"model": str(tiny_model_dir), "method": method, "task": "preference", "output_dir": str(tmp_path / name),
           "data": {"train": str(data), "val_fraction": 0.25}, "max_steps": 2, "batch_size": 2,
           "learning_rate": 1e-2, "warmup_ratio": 0.0, "lr_scheduler": "constant", "progress": False,
           "prefix": {"num_virtual_tokens": 4}, "prompt": {"num_virtual_tokens": 4}, "eval_share": None}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return load_config(data=cfg)


def recipe_for(config) -> TrainingRecipe:
    recipe = TrainingRecipe(config)
    recipe.setup()
    recipe.loop_start = 0.0
    return recipe


STEP0 = {"lora": {}, "dora": {"lora": {"use_dora": True}}, "ia3": {}, "adapter": {}, "full": {}}


@pytest.mark.parametrize("case", list(STEP0))
def test_step0_loss_is_ln2_and_every_reward_zero(case, tiny_model_dir, tmp_path):
    method = "lora" if case == "dora" else case
    recipe = recipe_for(config_for(tiny_model_dir, tmp_path, method, batch_size=4, **STEP0[case]))
    batch = recipe._next_micro_batches(1)[0]
    out = recipe.objective.loss(recipe.model, batch.to(recipe.device), recipe.config)
    assert out.normaliser == 4
    assert abs(out.loss_sum.item() / 4 - LN2) < 1e-6
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(out.metrics[key]) < 1e-6 * 4, (key, out.metrics)
    assert out.metrics["logps/chosen"] < 0 and out.metrics["rewards/accuracies"] == 0
    recipe.metrics.close()


def _alone(model, side: TokenizedExample) -> float:
    """Log-probability of one sequence's trained tokens, the model run on it alone (no packing, no padding)."""
    previous = set_attention(model, "sdpa")
    ids = torch.tensor([side.input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
    set_attention(model, previous)
    keep = [p for p in range(len(side) - 1) if side.trained[p + 1]]
    return -F.cross_entropy(logits[keep], ids[0, [p + 1 for p in keep]], reduction="sum").item()


def _pairs(tokenizer, n=3):
    from tuneforge.data.preference import to_preference, tokenize_pair
    from tuneforge.data.settings import DataConfig

    cfg = DataConfig(train="x.jsonl")
    return [tokenize_pair(to_preference(r), tokenizer, cfg)[0] for r in rule_pairs(n)]


@pytest.mark.parametrize("method", ["lora", "adapter", "ia3", "prefix", "prompt", "full"])
def test_packed_pair_logps_equal_each_sequence_alone(method, tiny_model, tokenizer):
    config = run_config(method, METHOD_SECTIONS[method])
    model = perturbed(apply_method(tiny_model, config))
    pairs = _pairs(tokenizer)
    with torch.no_grad():
        chosen, rejected = answer_logps(model, pack_pairs(pairs), config)
        for i, pair in enumerate(pairs):
            one_c, one_r = answer_logps(model, pack_pairs([pair]), config)       # one pair at a time
            assert abs(one_c.item() - chosen[i].item()) < 1e-5 and abs(one_r.item() - rejected[i].item()) < 1e-5
            if method not in ("prefix", "prompt"):        # their virtual tokens need the method's own forward
                assert abs(_alone(model, pair.chosen) - chosen[i].item()) < 1e-5
                assert abs(_alone(model, pair.rejected) - rejected[i].item()) < 1e-5
    assert chosen.dtype == torch.float32


def test_reference_pass_has_dropout_off_and_restores_training_mode(tiny_model, tokenizer):
    from tuneforge.data.dataset import PreparedData
    from tuneforge.training.objectives.preference import PreferenceObjective

    for layer in tiny_model.model.layers:          # SmolLM2 ships attention_dropout 0: switch it on
        layer.self_attn.attention_dropout = 0.5
    config = run_config("full", {})
    model = apply_method(tiny_model, config).train()
    pairs = _pairs(tokenizer, 4)
    with torch.no_grad():                          # in training mode dropout is on: two forwards differ
        first, second = (answer_logps(model, pack_pairs(pairs), config)[0] for _ in range(2))
    assert (first - second).abs().max() > 1e-3
    refs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        for pair in pairs:                         # computed again, not taken from the cache
            pair.reference = None
        PreferenceObjective("preference").before_training(model, PreparedData(pairs, [], [], {}), config,
                                                          torch.device("cpu"))
        refs.append([p.reference for p in pairs])
        assert model.training
    assert refs[0] == refs[1]
    model.eval()
    with torch.no_grad():
        chosen, rejected = answer_logps(model, pack_pairs(pairs), config)
    for (c, r), ec, er in zip(refs[0], chosen.tolist(), rejected.tolist(), strict=True):
        assert abs(c - ec) < 1e-4 and abs(r - er) < 1e-4


def test_a_pair_is_never_split_and_sides_alternate(tokenizer):
    pairs = _pairs(tokenizer, 5)
    batches = list(pair_micro_batches(pairs, 2, seed=0, epoch=0))
    assert [b.num_pairs for b in batches] == [2, 2, 1]
    for batch in batches:
        assert isinstance(batch, PairBatch) and batch.num_examples == 2 * batch.num_pairs
        for k, pair in enumerate(batch.pairs):
            assert batch.lengths[2 * k] == len(pair.chosen) and batch.lengths[2 * k + 1] == len(pair.rejected)
    assert sorted(i for b in batches for i in b.example_ids) == list(range(5))


def _losses(result):
    return [r["loss"] for r in result.metrics]


def test_precomputed_reference_equals_on_the_fly(tiny_model_dir, tmp_path):
    # dropout on: the reference must be computed with it off, both ways
    common = {"max_steps": 3, "lora": {"dropout": 0.1}, "eval_every": 3}
    pre = train(config_for(tiny_model_dir, tmp_path, name="pre", **common))
    fly = train(config_for(tiny_model_dir, tmp_path, name="fly", preference={"reference": "on_the_fly"}, **common))
    for a, b in zip(pre.metrics, fly.metrics, strict=True):
        for key in ("loss", "rewards/chosen", "rewards/margins", "eval_loss"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-5, (key, a, b)
    assert pre.metrics[-1]["rewards/margins"] != 0


def test_eight_by_one_equals_two_by_four_accumulation(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    rows = rule_pairs(20)
    common = {"rows": rows, "max_steps": 2, "learning_rate": 1e-3, "save_every": 2, "data": {"val_fraction": 0.0},
              "lora": {"dropout": 0.0}}       # dropout masks are drawn per micro-batch: they differ
    one = train(config_for(tiny_model_dir, tmp_path, name="b8", batch_size=8, **common))
    four = train(config_for(tiny_model_dir, tmp_path, name="b2", batch_size=2, gradient_accumulation_steps=4,
                            **common))
    for a, b in zip(one.metrics, four.metrics, strict=True):
        for key in ("loss", *TRL_METRICS):
            assert abs(a[key] - b[key]) < 1e-5, (key, a[key], b[key])
        assert a["trained_tokens"] == b["trained_tokens"] == 8        # the normaliser: pairs of the step
    w1, w4 = (load_file(str(CheckpointDir(r.run_dir / "checkpoints").current("last") / "trainable.safetensors"))
              for r in (one, four))
    assert w1.keys() == w4.keys()
    for name in w1:
        torch.testing.assert_close(w1[name], w4[name], rtol=0, atol=1e-5)


def test_metrics_have_trls_names_on_steps_and_evaluations_and_best_is_by_preference_loss(tiny_model_dir, tmp_path):
    result = train(config_for(tiny_model_dir, tmp_path, max_steps=6, eval_every=2, learning_rate=2e-2))
    rows = result.metrics
    assert all(key in r for r in rows for key in TRL_METRICS)
    evals = [r for r in rows if "eval_loss" in r]
    assert len(evals) == 3 and all(f"eval_{key}" in r for r in evals for key in TRL_METRICS)
    best = min(evals, key=lambda r: r["eval_loss"])
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["task"] == "preference" and run["best_step"] == best["step"]
    assert abs(run["best_eval_loss"] - best["eval_loss"]) < 1e-6
    assert evals[-1]["eval_loss"] < LN2 and evals[-1]["eval_rewards/accuracies"] > 0.5
    from PIL import Image

    with Image.open(result.run_dir / "loss_curve.png") as image:     # the reward-margin panel beside the loss
        assert image.size[0] > 2.5 * image.size[1]                      # one panel alone is 7:4


def test_rejected_pairs_go_to_rejects_jsonl(tiny_model_dir, tmp_path):
    rows = rule_pairs(8) + [{"prompt": "q", "chosen": "same", "rejected": "same"}, {"chosen": "only"}]
    result = train(config_for(tiny_model_dir, tmp_path, rows=rows, max_steps=1))
    rejects = [json.loads(x) for x in (result.run_dir / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reasons"][0]["check"]) for r in rejects] == [(9, "identical_pair"), (10, "missing_field")]


def test_full_fine_tuning_on_the_fly_reference_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="full fine-tuning keeps no copy of the base"):
        config_for(tiny_model_dir, tmp_path, "full", preference={"reference": "on_the_fly"})


def test_resume_continues_a_preference_run_exactly(tiny_model_dir, tmp_path):
    # 6 train pairs, 3 micro-batches an epoch: the resumed steps 4-6 are the 2nd epoch, whose pairs' reference
    # log-probs the uninterrupted run had cached in the 1st and the resumed one computes again (in other rows)
    common = {"rows": rule_pairs(8), "max_steps": 6, "lora": {"dropout": 0.1}, "eval_every": 2, "on_divergence": "off"}
    whole = train(config_for(tiny_model_dir, tmp_path, name="whole", **common))
    config = config_for(tiny_model_dir, tmp_path, name="cut", **common)
    recipe = recipe_for(config)                       # three steps, a checkpoint, then the process "dies"
    for _ in range(3):
        row = recipe.train_step()
        if recipe.state.step % recipe.eval_every == 0:
            row.update(recipe.evaluate())
        recipe.metrics.log(**row)
        recipe.state.metrics_rows += 1
    recipe.save_checkpoint("last")
    recipe.metrics.close()
    resumed = train(config, resume=True)             # the reference cache starts empty: computed again on demand
    assert [r["step"] for r in resumed.metrics] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(whole.metrics, resumed.metrics, strict=True):
        for key in ("loss", "rewards/margins", "eval_loss"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-6, (key, a, b)


def test_an_sft_adapter_as_the_model_is_refused_naming_the_fix(tiny_model_dir, tmp_path):
    adapter = tmp_path / "sft-run"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="is an adapter .*set init_from: ") as e:
        config_for(tiny_model_dir, tmp_path, model=str(adapter))
    assert len(str(e.value).splitlines()) == 1


# each method of the support matrix trains with preference pairs: the held-out preference loss falls
MATRIX = {"full": 3e-3, "lora": 1e-2, "adapter": 1e-2, "ia3": 5e-2, "prefix": 5e-2, "prompt": 5e-2, "qlora": 1e-2}


@pytest.mark.parametrize("method", list(MATRIX))
def test_method_trains_with_preference_pairs(method, tiny_model_dir, tmp_path):
    if method == "qlora" and not HAS_BNB:
        pytest.skip("bitsandbytes not installed")
    # qlora: the reference pass is an eval-mode forward, after which bitsandbytes would repack 4-bit weights on
    # AVX512-BF16 CPUs and the fused LoRA forward fail in training (methods/qlora/model.py: one_cpu_kernel_)
    recipe = recipe_for(config_for(tiny_model_dir, tmp_path, method, max_steps=6, eval_every=3, batch_size=4,
                                   learning_rate=MATRIX[method], data={"val_fraction": 0.25}))
    evaluate = recipe.objective.evaluate
    before = evaluate(recipe.model, recipe.val_batches, recipe.device, recipe.config)
    recipe.fit()
    after = evaluate(recipe.model, recipe.val_batches, recipe.device, recipe.config)
    if method not in ("prefix", "prompt"):            # identity at start: policy == reference
        assert abs(recipe.metrics.rows[0]["loss"] - LN2) < 1e-5 and abs(before["eval_loss"] - LN2) < 1e-5
    assert after["eval_loss"] < before["eval_loss"] - 0.01, (before, after)
    assert after["eval_rewards/margins"] > before["eval_rewards/margins"]
    recipe.finish()


# ------------------------------------------------------------------------------------------ losses


def test_log1mexp_is_stable_at_both_ends():
    x = torch.tensor([-1e-12, -1e-6, -0.5, -math.log(2), -1.0, -30.0, -200.0], dtype=torch.float64,
                     requires_grad=True)
    y = log1mexp(x)
    with localcontext() as ctx:
        ctx.prec = 150          # 1 - exp(-200) needs ~90 digits
        exact = torch.tensor([float((1 - Decimal(v).exp()).ln()) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(y.detach(), exact, rtol=1e-12, atol=0)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert math.isfinite(log1mexp(torch.tensor(-1e-8)).item())      # fp32: log(1 - exp(x)) would be -inf


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"])
def test_losses_are_finite_with_gradients_and_reward_free_ones_ignore_the_reference(loss):
    g = torch.Generator().manual_seed(0)
    chosen = (-torch.rand(5, generator=g) * 40).requires_grad_()
    rejected = (-torch.rand(5, generator=g) * 40).requires_grad_()
    ref_c, ref_r = -torch.rand(5, generator=g) * 40, -torch.rand(5, generator=g) * 40
    n_c, n_r = torch.tensor([3.0, 5, 8, 2, 9]), torch.tensor([4.0, 4, 7, 1, 3])
    losses, rc, rr = preference_loss(loss, chosen, rejected, ref_c, ref_r, n_c, n_r, beta=0.2, label_smoothing=0.1)
    losses.sum().backward()
    assert losses.shape == (5,) and torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all()
    if loss in ("simpo", "orpo"):
        again, _, _ = preference_loss(loss, chosen, rejected, None, None, n_c, n_r, beta=0.2, label_smoothing=0.1)
        torch.testing.assert_close(again, losses)
        torch.testing.assert_close(rc, 0.2 * chosen.detach() / n_c)
    else:
        torch.testing.assert_close(rc, 0.2 * (chosen.detach() - ref_c))
    with_sft, _, _ = preference_loss(loss, chosen, rejected, ref_c, ref_r, n_c, n_r, beta=0.2, label_smoothing=0.1,
                                     sft_weight=0.5)
    torch.testing.assert_close(with_sft - losses, -0.5 * chosen.detach() / n_c)


def test_pair_is_two_sequences(tokenizer):
    pair = _pairs(tokenizer, 1)[0]
    assert isinstance(pair, TokenizedPair) and len(pair) == len(pair.chosen) + len(pair.rejected)
    assert pair.num_trained == pair.chosen.num_trained + pair.rejected.num_trained
