"""Logit distillation (``task: distill``) against references: the divergence equals TRL 1.16's
``GKDTrainer.generalized_jsd_loss`` on the same tensors (``tests/trl_gkd_loss.py`` in TRL's venv) for beta 0, 0.5
and 1 at temperatures other than 1; a packed row equals its examples alone, and the chunked loss equals the plain
one (values and gradients); a distilled student's divergence from the teacher drops, and with a learning rate of
~0 it does not; a top-k cache with k = the vocabulary gives the on-the-fly loss, and a second run never runs the
teacher; a stopped and resumed run equals the uninterrupted one; a teacher with another tokenizer, or none, is one
line naming ``distill.teacher`` (exit status 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import Killed, crash_after_checkpoint, write_jsonl
from test_preference import recipe_for
from tuneforge.config import load_config
from tuneforge.data.packing import pack
from tuneforge.errors import ConfigError
from tuneforge.training.distill_losses import generalized_jsd, loss_beta
from tuneforge.training.objectives.distill import DistillObjective
from tuneforge.training.trainer import TrainingRecipe, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "throughput"))
import venvs  # noqa: E402

SCRIPT = Path(__file__).with_name("trl_gkd_loss.py")
ROWS = [{"prompt": f"Ticket {i}: {['charged twice', 'parcel late', 'cannot sign in'][i % 3]}",
         "completion": ["billing", "shipping", "login"][i % 3] + f" (case {i})"} for i in range(24)]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer):
    """Another tiny random model (seed 1) with the student's tokenizer: a teacher whose distributions differ."""
    from tuneforge.models.loading import build_tiny_model

    path = tmp_path_factory.mktemp("teacher")
    build_tiny_model(seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def distill_config(tiny_model_dir, teacher_dir, tmp_path, name="run", **overrides):
    data = write_jsonl(tmp_path / f"{name}.jsonl", ROWS)
    cfg = {"model": str(tiny_model_dir), "task": "distill", "output_dir": str(tmp_path / name),
           "data": {"train": str(data), "val_fraction": 0.25}, "max_steps": 2, "batch_size": 4,
           "learning_rate": 1e-2, "warmup_ratio": 0.0, "lr_scheduler": "constant", "progress": False,
           "eval_share": None, "distill": {"teacher": str(teacher_dir), "temperature": 2.0}}
    for key, value in overrides.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return load_config(data=cfg)


# ------------------------------------------------------------------------------------------ TRL parity

def _case(seed: int, beta: float, temperature: float) -> dict:
    g = torch.Generator().manual_seed(seed)
    student = 3 * torch.randn(2, 7, 13, generator=g, dtype=torch.float64)
    teacher = 3 * torch.randn(2, 7, 13, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 13, (2, 7), generator=g)
    labels[0, :2] = labels[1, 5:] = -100                        # prompt and padding positions: no loss
    return {"student": student, "teacher": teacher, "labels": labels, "beta": beta, "temperature": temperature}


CASES = {f"beta{beta}_T{t}": _case(i, beta, t)
         for i, (beta, t) in enumerate([(0.0, 2.0), (0.5, 2.0), (1.0, 2.0), (0.5, 0.7), (0.1, 1.0)])}


@pytest.fixture(scope="module")
def trl_losses(tmp_path_factory):
    python, versions = venvs.ensure_venv(venvs.TRL)
    assert python is not None, f"TRL's venv could not be built: {versions}"
    work = tmp_path_factory.mktemp("trl-gkd")
    torch.save(list(CASES.values()), work / "in.pt")
    subprocess.run([str(python), str(SCRIPT), str(work / "in.pt"), str(work / "out.pt")], check=True, timeout=600)
    results = torch.load(work / "out.pt")
    assert results["trl_version"] == "1.16.0"
    return dict(zip(CASES, results["losses"], strict=True))


@pytest.mark.parametrize("case", list(CASES))
def test_divergence_equals_trls_gkd_loss(case, trl_losses):
    c = CASES[case]
    mask = c["labels"] != -100
    ours = generalized_jsd(c["student"][mask], c["teacher"][mask], c["beta"], c["temperature"])
    mean = ours.sum().item() / mask.sum().item()                # the objective: sum over tokens / trained tokens
    assert abs(mean - trl_losses[case]) < 1e-6, (mean, trl_losses[case])
    assert loss_beta("forward_kl", 0.5) == 0.0 and loss_beta("reverse_kl", 0.5) == 1.0 and loss_beta("jsd", 0.3) == 0.3


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_a_support_of_the_whole_vocabulary_equals_the_full_divergence(beta):
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(5, 17, generator=g), torch.randn(5, 17, generator=g)
    order = torch.stack([torch.randperm(17, generator=g) for _ in range(5)])
    teacher_logps = torch.log_softmax(teacher, -1).gather(1, order)
    torch.testing.assert_close(generalized_jsd(student, teacher_logps, beta, 1.5, support=order),
                               generalized_jsd(student, teacher, beta, 1.5), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ packing and chunking

def _objective_and_model(tiny_model_dir, teacher_dir, tmp_path, **overrides):
    from tuneforge.models.loading import load_model
    from tuneforge.training.distill_teacher import Teacher

    config = distill_config(tiny_model_dir, teacher_dir, tmp_path, method="full", **overrides)
    objective = DistillObjective("distill")
    objective.teacher = Teacher(str(teacher_dir), torch.device("cpu"), torch.float32)
    model = load_model(tiny_model_dir)
    return config, objective, model


def _examples(tokenizer, n=3):
    from tuneforge.data.formats import Example
    from tuneforge.data.rendering import tokenize_example

    return [tokenize_example(Example(messages=[{"role": "user", "content": r["prompt"]},
                                               {"role": "assistant", "content": r["completion"]}]), tokenizer)
            for r in ROWS[:n]]


def test_a_packed_row_equals_its_examples_alone_and_chunked_equals_plain(tiny_model_dir, teacher_dir, tokenizer,
                                                                         tmp_path):
    examples = _examples(tokenizer)
    results = {}
    for chunked in ("off", "on"):
        config, objective, model = _objective_and_model(tiny_model_dir, teacher_dir, tmp_path, chunked_loss=chunked,
                                                        distill={"loss": "jsd", "beta": 0.3, "alpha": 0.25})
        packed = objective.token_sums(model, pack(examples), config)
        alone = sum(objective.token_sums(model, pack([ex]), config) for ex in examples)
        torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
        objective.loss(model, pack(examples), config).loss_sum.backward()
        results[chunked] = (packed.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(results["on"][0], results["off"][0], rtol=1e-6, atol=1e-5)
    for name, grad in results["off"][1].items():
        torch.testing.assert_close(results["on"][1][name], grad, rtol=1e-4, atol=1e-6)
    assert results["off"][0][0] > 0                           # two different models: a divergence to learn


def test_a_tuneforge_run_teaches_with_its_adapter_applied(tiny_model_dir, teacher_dir, tokenizer, tmp_path):
    from tuneforge.training.distill_teacher import Teacher, check_teacher_tokenizer

    sft = load_config(data={"model": str(teacher_dir), "output_dir": str(tmp_path / "sft"), "max_steps": 2,
                            "data": {"train": str(write_jsonl(tmp_path / "sft.jsonl", ROWS)), "val_fraction": 0.0},
                            "learning_rate": 5e-2, "progress": False, "keep_best": False, "eval_base": False})
    run = train(sft).run_dir
    check_teacher_tokenizer(tokenizer, str(run))              # the run's saved tokenizer: the same vocabulary
    examples = _examples(tokenizer)
    config, objective, model = _objective_and_model(tiny_model_dir, teacher_dir, tmp_path)
    from_base = objective.token_sums(model, pack(examples), config).detach()
    objective.teacher = Teacher(str(run), torch.device("cpu"), torch.float32)
    from_run = objective.token_sums(model, pack(examples), config).detach()
    teacher = objective.teacher.model
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert abs(from_run[0] - from_base[0]) > 1e-3 * from_base[0]   # the adapter changed the teacher
    torch.testing.assert_close(from_run[1], from_base[1])           # the student's own cross-entropy did not


# ------------------------------------------------------------------------------------------ training

def test_the_student_moves_towards_the_teacher_and_not_with_a_learning_rate_of_zero(tiny_model_dir, teacher_dir,
                                                                                   tmp_path):
    common = {"max_steps": 8, "eval_every": 8, "method": "full", "distill": {"loss": "forward_kl"}}
    moved = train(distill_config(tiny_model_dir, teacher_dir, tmp_path, name="moved", learning_rate=3e-3, **common))
    still = train(distill_config(tiny_model_dir, teacher_dir, tmp_path, name="still", learning_rate=1e-12, **common))
    before = [_base_divergence(r.run_dir) for r in (moved, still)]
    assert abs(before[0] - before[1]) < 1e-6
    after_moved = moved.metrics[-1]["eval_divergence"]
    after_still = still.metrics[-1]["eval_divergence"]
    assert after_moved < 0.8 * before[0], (before, after_moved)
    assert abs(after_still - before[1]) < 1e-5, (before, after_still)
    assert moved.metrics[-1]["loss"] < moved.metrics[0]["loss"]
    assert all("divergence" in r and "ce" in r for r in moved.metrics)
    assert json.loads((moved.run_dir / "run.json").read_text())["task"] == "distill"


def _base_divergence(run_dir: Path) -> float:
    """The run's validation divergence before its first step (eval_base), re-measured from its saved config."""
    config = load_config(run_dir / "config.yaml", check_files=False)
    config.output_dir = str(run_dir.parent / f"{run_dir.name}-base")
    recipe = recipe_for(config)
    out = recipe.objective.evaluate(recipe.model, recipe.val_batches, recipe.device, config)
    recipe.metrics.close()
    return out["eval_divergence"]


@pytest.mark.parametrize("chunked", ["off", "on"])
def test_a_top_k_cache_of_the_whole_vocabulary_gives_the_on_the_fly_loss(chunked, tiny_model_dir, teacher_dir,
                                                                         tokenizer, tmp_path):
    from tuneforge.training.distill_teacher import TopKCache, build_top_k

    examples = _examples(tokenizer, 5)
    config, objective, model = _objective_and_model(tiny_model_dir, teacher_dir, tmp_path, chunked_loss=chunked,
                                                    distill={"loss": "jsd", "beta": 0.5, "temperature": 1.0})
    row = pack(examples[1:4])                                  # another packing than the cache was built in
    fly = objective.token_sums(model, row, config)
    assert objective.teacher is not None
    sums = {}
    for k in (model.config.vocab_size, 8):
        objective.cache = TopKCache(build_top_k(objective.teacher, examples, k, per_row=2))
        sums[k] = objective.token_sums(model, row, config).detach()
    torch.testing.assert_close(sums[model.config.vocab_size], fly.detach(), rtol=1e-5, atol=1e-6)
    assert abs(sums[8][0] - fly[0]) > 1e-3 * fly[0]           # top-8 renormalised: another divergence
    torch.testing.assert_close(sums[8][1], fly[1].detach())    # the cross-entropy never uses the teacher


def test_a_second_run_loads_the_teachers_top_k_and_never_runs_the_teacher(tiny_model_dir, teacher_dir, tmp_path,
                                                                         monkeypatch):
    from tuneforge.training import distill_teacher

    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    calls = {"n": 0}
    original = distill_teacher.Teacher.forward

    def counted(self, batch, hidden=False):
        calls["n"] += 1
        return original(self, batch, hidden)

    monkeypatch.setattr(distill_teacher.Teacher, "forward", counted)
    write_jsonl(tmp_path / "small.jsonl", ROWS[:8])
    common = {"max_steps": 2, "batch_size": 2, "eval_every": 2, "distill": {"temperature": 1.0}}

    def run(name, **distill):
        config = distill_config(tiny_model_dir, teacher_dir, tmp_path, name=name, **common)
        config.data.train = str(tmp_path / "small.jsonl")
        config.distill.cache_top_k = distill.get("cache_top_k")
        calls["n"] = 0
        return train(config), calls["n"]

    fly, fly_calls = run("fly")
    vocab = 49152
    cached, first_calls = run("topk", cache_top_k=vocab)
    again, second_calls = run("again", cache_top_k=vocab)
    assert fly_calls == 2 + 2 and first_calls == 1 and second_calls == 0   # 2 steps, 2 evaluations (one base); 1 row
    for a, b, c in zip(fly.metrics, cached.metrics, again.metrics, strict=True):
        for key in ("loss", "divergence", "eval_loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= 2e-6 and b[key] == c[key], (key, a, b, c)


# ------------------------------------------------------------------------------------------ resume

def test_a_resumed_run_equals_the_uninterrupted_one(tiny_model_dir, teacher_dir, tmp_path, monkeypatch):
    common = {"max_steps": 4, "save_every": 1, "eval_every": 2, "keep_best": False, "seed": 7,
              "lora": {"r": 4, "alpha": 8, "dropout": 0.1}, "learning_rate": 3e-3, "gradient_accumulation_steps": 2,
              "distill": {"alpha": 0.5}}
    whole = train(distill_config(tiny_model_dir, teacher_dir, tmp_path, name="whole", **common))
    config = distill_config(tiny_model_dir, teacher_dir, tmp_path, name="stopped", **common)
    crash = crash_after_checkpoint(2)

    with monkeypatch.context() as m:
        m.setattr(TrainingRecipe, "save_checkpoint", crash)
        with pytest.raises(Killed):
            train(config)
    train(config, resume=True)
    rows = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for a, b in zip(whole.metrics, rows, strict=True):
        assert [a.get(k) for k in ("loss", "divergence", "ce", "eval_loss")] == \
            [b.get(k) for k in ("loss", "divergence", "ce", "eval_loss")], (a, b)
    wa, wb = (load_file(Path(d) / "adapter_model.safetensors") for d in (whole.run_dir, config.output_dir))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ------------------------------------------------------------------------------------------ bad input

def test_a_teacher_with_another_tokenizer_is_one_line_naming_the_key_and_exit_2(tiny_model_dir, tokenizer, tmp_path,
                                                                                capsys):
    from tuneforge.cli import main
    from tuneforge.models.loading import build_tiny_model

    other = tmp_path / "other-teacher"
    build_tiny_model(seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    from transformers import AutoTokenizer

    grown = AutoTokenizer.from_pretrained(other)
    grown.add_tokens(["<ticket>", "<queue>"])
    grown.save_pretrained(other)
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    config = tmp_path / "distill.yaml"
    config.write_text(f"model: {tiny_model_dir}\ntask: distill\noutput_dir: {tmp_path / 'run'}\ndata:\n  train: "
                      f"{data}\ndistill:\n  teacher: {other}\nprogress: false\n")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if "distill.teacher" in line]) == 1
    line = next(line for line in err if "distill.teacher" in line)
    assert "another tokenizer" in line and "49154 tokens against 49152" in line, line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()          # refused before training


def test_a_missing_or_absent_teacher_is_one_line_naming_the_key(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    base = {"model": str(tiny_model_dir), "task": "distill", "data": {"train": str(data)}}
    with pytest.raises(ConfigError) as e:
        load_config(data={**base, "distill": {"teacher": str(tmp_path / "nowhere")}})
    assert "'distill.teacher'" in str(e.value) and "not found" in str(e.value) and len(str(e.value).splitlines()) == 1
    with pytest.raises(ConfigError) as e:
        load_config(data=base)
    assert "needs a teacher: set distill.teacher" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(data={**base, "distill": {"teacher": str(tiny_model_dir), "loss": "kl"}})
    assert "distill.loss" in str(e.value)
