"""``init_from: RUN``: a run that loads an SFT run's adapter and keeps training it, against references: at step 0
the policy's logits are the SFT model's (the base with the SFT adapter, loaded by ``load_run`` as serving does),
the preference reference log-probabilities are the SFT model's (not the base's) at every step, training moves
the adapter, SFT continues from SFT at the SFT run's validation loss, a resumed run equals the uninterrupted
one; and each bad ``init_from`` is one line naming the key, before the model loads (exit 2 from the CLI)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from _method_helpers import HAS_BNB
from conftest import MODEL, write_jsonl
from test_preference import rule_pairs
from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.fileutil import file_sha256
from tuneforge.methods import get_method, method_forward
from tuneforge.runs import RunRecord, load_base, load_run
from tuneforge.training.objectives.preference import answer_logps, pack_pairs
from tuneforge.training.trainer import TrainingRecipe, train

LN2 = math.log(2)

# each method's SFT settings (no dropout: at step 0 the policy in training mode is then the SFT model exactly)
SFT_SECTIONS = {"lora": {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}}, "ia3": {},
                "prefix": {"prefix": {"num_virtual_tokens": 4}}, "prompt": {"prompt": {"num_virtual_tokens": 4}},
                "adapter": {"adapter": {"bottleneck": 8, "dropout": 0.0}},
                "qlora": {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}}}
# (method, the SFT run's sections) of each case; DoRA and rsLoRA are LoRA settings the run keeps
CASES = {**{m: (m, {}) for m in SFT_SECTIONS},
         "dora": ("lora", {"lora": {"r": 4, "dropout": 0.0, "use_dora": True}}),
         "rslora": ("lora", {"lora": {"r": 4, "dropout": 0.0, "use_rslora": True}})}
COMMON = {"progress": False, "eval_share": None, "warmup_ratio": 0.0, "lr_scheduler": "constant",
          "on_divergence": "off", "keep_best": False}


def sft_rows(n: int = 24) -> list[dict]:
    return [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rule_pairs(n)]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_model_dir):
    """``sft_run(method)``: a finished 3-step SFT run of ``method`` on the tiny model (trained once per module)."""
    root = tmp_path_factory.mktemp("sft-runs")
    data = write_jsonl(root / "sft.jsonl", sft_rows())
    runs = {}

    def make(method: str, **sections):
        key = (method, json.dumps(sections, sort_keys=True))
        if key not in runs:
            out = root / f"{method}-{len(runs)}"
            config = load_config(data={"model": str(tiny_model_dir), "method": method, "task": "sft",
                                       "output_dir": str(out), "data": {"train": str(data), "val_fraction": 0.25},
                                       "max_steps": 3, "eval_every": 3, "batch_size": 4, "learning_rate": 2e-2,
                                       **COMMON, **(sections or SFT_SECTIONS[method])})
            train(config)
            runs[key] = out
        return runs[key]

    return make


def pref_config(tiny_model_dir, tmp_path, init, method="lora", name="pref", rows=None, **overrides):
    data = write_jsonl(tmp_path / f"{name}.jsonl", rows if rows is not None else rule_pairs(24))
    cfg = {"model": str(tiny_model_dir), "method": method, "task": "preference", "init_from": str(init),
           "output_dir": str(tmp_path / name), "data": {"train": str(data), "val_fraction": 0.25}, "max_steps": 3,
           "batch_size": 2, "learning_rate": 1e-2, **COMMON}
    cfg.update(overrides)
    return load_config(data=cfg)


def recipe_for(config) -> TrainingRecipe:
    recipe = TrainingRecipe(config)
    recipe.setup()
    recipe.loop_start = 0.0
    return recipe


def _logits(model, config, batch) -> torch.Tensor:
    """Every position's logits ``[T, V]`` of the packed row, in eval mode, through the method's own forward."""
    was = model.training
    model.eval()
    with torch.no_grad():
        keep = torch.arange(batch.num_tokens)
        out = method_forward(model, config, batch.input_ids, batch.position_ids, keep, batch.lengths, batch.cu_seqlens)
    model.train(was)
    return out.float()


def _logps(model, config, pairs) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        chosen, rejected = answer_logps(model, pack_pairs(pairs), config)
    model.train(was)
    return torch.stack([chosen, rejected], dim=1)


@pytest.mark.parametrize("case", list(CASES))
def test_preference_from_an_sft_run_starts_at_and_is_referenced_to_the_sft_model(case, sft_run, tiny_model_dir,
                                                                                 tmp_path):
    method, sections = CASES[case]
    if method == "qlora" and not HAS_BNB:
        pytest.skip("bitsandbytes not installed")
    sft_dir = sft_run(method, **sections)
    recipe = recipe_for(pref_config(tiny_model_dir, tmp_path, sft_dir, method))    # no method section: the run's
    sft = load_run(sft_dir, device="cpu")                 # the SFT model as eval and serving load it
    model, config = recipe.model, recipe.config
    for key in [*get_method(method).settings, *get_method(method).reads]:       # the run's settings, taken
        assert config.section(key) == sft.config.section(key)
    batch = recipe._next_micro_batches(1)[0]
    # step 0: the policy is the SFT model, logit for logit
    torch.testing.assert_close(_logits(model, config, batch), _logits(sft.model, sft.config, batch), rtol=0,
                               atol=1e-5)
    assert all(p.reference is None for p in batch.pairs)            # computed when first used
    out = recipe.objective.loss(model, batch, config)
    assert abs(out.loss_sum.item() / batch.num_pairs - LN2) < 1e-6   # policy == reference (the SFT model)
    references = torch.tensor([p.reference for p in batch.pairs])
    torch.testing.assert_close(references, _logps(sft.model, sft.config, batch.pairs), rtol=0, atol=1e-4)
    bare = load_base(str(tiny_model_dir), dtype="fp32", device="cpu").model
    assert (references - _logps(bare, config.model_copy(update={"method": "full"}), batch.pairs)).abs().max() > 1e-3

    recipe.fit()
    trained = [p for p in model.parameters() if p.requires_grad]
    frozen = recipe.objective.init_weights.frozen
    assert max((a - b).abs().max().item() for a, b in zip(trained, frozen, strict=True)) > 1e-4   # the adapter moved
    # every pair's reference, computed before or after the adapter moved, is the SFT model's
    used = [p for p in [*recipe.data.train, *recipe.data.validation] if p.reference is not None]
    assert len(used) > len(batch.pairs)
    torch.testing.assert_close(torch.tensor([p.reference for p in used]), _logps(sft.model, sft.config, used), rtol=0,
                               atol=1e-4)
    result = recipe.finish()
    record = RunRecord.load(result.run_dir)
    assert record.init_from.path == str(sft_dir.resolve()) and record.init_from.method == method
    assert record.init_from.adapter_sha256 == file_sha256(sft_dir / "adapter_model.safetensors")
    assert record.init_from.task == "sft"
    # the continued run is an ordinary run of the method: it loads as serving and eval load it
    continued = load_run(result.run_dir, device="cpu")
    torch.testing.assert_close(_logps(continued.model, continued.config, used[:4]), _logps(model, config, used[:4]),
                               rtol=1e-6, atol=1e-5)


def test_sft_continues_from_an_sft_run_at_its_validation_loss(sft_run, tiny_model_dir, tmp_path):
    sft_dir = sft_run("lora")
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows())           # the same records: the same validation split
    config = load_config(data={"model": str(tiny_model_dir), "method": "lora", "task": "sft", "init_from": str(sft_dir),
                               "output_dir": str(tmp_path / "more"), "data": {"train": str(data), "val_fraction": 0.25},
                               "max_steps": 3, "eval_every": 3, "batch_size": 4, "learning_rate": 2e-2,
                               "lora": {"r": 4}, **COMMON})            # a value the run also had: accepted
    result = train(config)
    sft_rows_logged = [json.loads(x) for x in (sft_dir / "metrics.jsonl").read_text().splitlines()]
    sft_final = [r for r in sft_rows_logged if "eval_loss" in r][-1]["eval_loss"]
    record = RunRecord.load(result.run_dir)
    assert abs(record.base_eval_loss - sft_final) < 1e-5               # before step 1: the SFT run's final model
    before, after = (load_file(str(d / "adapter_model.safetensors")) for d in (sft_dir, result.run_dir))
    assert before.keys() == after.keys()
    assert max((before[k] - after[k]).abs().max().item() for k in before) > 1e-4    # and it trained on from there
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["lora"] == yaml.safe_load((sft_dir / "config.yaml").read_text())["lora"]   # the run's settings


def test_a_package_continues_as_its_run(sft_run, tiny_model_dir, tmp_path):
    from tuneforge.export.package import package_run

    sft_dir = sft_run("lora")
    package = tmp_path / "package"
    package_run(sft_dir, package)
    recipe = recipe_for(pref_config(tiny_model_dir, tmp_path, package))
    sft = load_run(sft_dir, device="cpu")
    batch = recipe._next_micro_batches(1)[0]
    torch.testing.assert_close(_logits(recipe.model, recipe.config, batch), _logits(sft.model, sft.config, batch),
                               rtol=0, atol=1e-5)
    assert recipe.init.adapter_sha256 == file_sha256(sft_dir / "adapter_model.safetensors")
    recipe.metrics.close()


def test_resume_of_a_run_from_init_from_is_exact(sft_run, tiny_model_dir, tmp_path):
    sft_dir = sft_run("lora")
    # 6 train pairs, 3 micro-batches an epoch: the resumed steps are in the 2nd epoch, whose pairs the
    # uninterrupted run had cached in the 1st and the resumed one computes again
    common = {"rows": rule_pairs(8), "max_steps": 6, "eval_every": 2}
    whole = train(pref_config(tiny_model_dir, tmp_path, sft_dir, name="whole", **common))
    config = pref_config(tiny_model_dir, tmp_path, sft_dir, name="cut", **common)
    recipe = recipe_for(config)                       # four steps, a checkpoint, then the process "dies"
    recipe.evaluate_base()
    for _ in range(4):
        row = recipe.train_step()
        if recipe.state.step % recipe.eval_every == 0:
            row.update(recipe.evaluate())
        recipe.metrics.log(**row)
        recipe.state.metrics_rows += 1
    recipe.save_checkpoint("last")
    recipe.metrics.close()
    resumed = train(config, resume=True)
    assert [r["step"] for r in resumed.metrics] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(whole.metrics, resumed.metrics, strict=True):
        for key in ("loss", "rewards/margins", "rewards/chosen", "eval_loss"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-6, (key, a, b)


# ------------------------------------------------------------------------------------------ bad input


def _refused(config, match: str, monkeypatch) -> str:
    """The one-line ConfigError of setting up ``config``, raised before any model loads."""
    import tuneforge.training.trainer as trainer

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before init_from was refused")

    monkeypatch.setattr(trainer, "load_base_model", no_model)
    with pytest.raises(ConfigError, match=match) as e:
        TrainingRecipe(config).setup()
    message = str(e.value)
    assert len(message.splitlines()) == 1 and message.startswith("init_from: ")
    return message


def test_a_folder_that_is_not_a_run_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    _refused(pref_config(tiny_model_dir, tmp_path, tmp_path / "notes"), "not a tuneforge run or package", monkeypatch)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text(f"model: {tiny_model_dir}\nmethod: lora\n")
    _refused(pref_config(tiny_model_dir, tmp_path, unfinished), "holds no trained adapter", monkeypatch)
    with pytest.raises(ConfigError, match="'init_from': folder 'nowhere' not found"):
        pref_config(tiny_model_dir, tmp_path, "nowhere")


def test_a_run_on_another_base_model_is_refused(sft_run, tmp_path, tokenizer, monkeypatch):
    from tuneforge.models.loading import build_tiny_model

    other = tmp_path / "other-base"
    build_tiny_model(MODEL, seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    message = _refused(pref_config(other, tmp_path, sft_run("lora")), "was trained on base model", monkeypatch)
    assert "set model: to the run's base model" in message


def test_a_full_fine_tune_run_is_refused_naming_model(sft_run, tiny_model_dir, tmp_path, monkeypatch):
    full = tmp_path / "full-run"
    shutil.copytree(sft_run("lora"), full)
    (full / "adapter_config.json").unlink()
    (full / "adapter_model.safetensors").unlink()
    (full / "config.json").write_text("{}")
    saved = yaml.safe_load((full / "config.yaml").read_text())
    (full / "config.yaml").write_text(yaml.safe_dump({**saved, "method": "full"}))
    message = _refused(pref_config(tiny_model_dir, tmp_path, full, method="full"), "is a full fine-tune run",
                       monkeypatch)
    assert f"use it as model: {full}" in message


def test_another_method_or_other_method_settings_are_refused(sft_run, tiny_model_dir, tmp_path, monkeypatch):
    sft_dir = sft_run("lora")
    message = _refused(pref_config(tiny_model_dir, tmp_path, sft_dir, method="ia3"), "trained method lora",
                       monkeypatch)
    assert "set method: lora" in message
    message = _refused(pref_config(tiny_model_dir, tmp_path, sft_dir, lora={"r": 8}), "trained with lora.r: 4",
                       monkeypatch)
    assert "this config sets 8" in message and "remove lora.r" in message


def test_a_reparameterized_prefix_run_is_refused(sft_run, tiny_model_dir, tmp_path):
    sft_dir = sft_run("prefix", prefix={"num_virtual_tokens": 4, "reparameterize": True, "encoder_hidden_size": 16})
    with pytest.raises(ConfigError, match="prefix.reparameterize: true saves only the prefix") as e:
        TrainingRecipe(pref_config(tiny_model_dir, tmp_path, sft_dir, method="prefix")).setup()
    assert len(str(e.value).splitlines()) == 1


def test_the_cli_says_it_in_one_line_with_exit_2(sft_run, tiny_model_dir, tmp_path, capsys):
    from tuneforge.cli import main

    pairs = write_jsonl(tmp_path / "pairs.jsonl", rule_pairs(8))
    config = tmp_path / "pref.yaml"
    config.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "method": "ia3", "task": "preference",
                                      "init_from": str(sft_run("lora")), "output_dir": str(tmp_path / "run"),
                                      "data": {"train": str(pairs)}, "progress": False}))
    assert main(["train", str(config)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "init_from:" in errors[0] and "set method: lora" in errors[0]
