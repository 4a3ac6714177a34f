"""GRPO (``task: grpo``) on a tiny random model: the reward rises on a learnable reward (and not without training),
resume continues a run exactly (its sampling included), the built-in rewards, the objective's per-token
log-probabilities against the project's per-example loss, and bad input (a reward that cannot be imported, returns
the wrong number of scores or a NaN, prompts without a field a reward reads) in one line, exit 2, before a step
where it can be. The loss and advantages against TRL's own code: ``tests/test_grpo_trl.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from tuneforge.cli import main as cli_main
from tuneforge.config import load_config
from tuneforge.data.dataset import DataError
from tuneforge.errors import ConfigError
from tuneforge.methods.loss import packed_example_loss_sums
from tuneforge.training.grpo_rewards import RewardError, build_rewards
from tuneforge.training.trainer import TrainingRecipe, train

REWARDS = '''
import json, math

_sets = {}


def aligned(prompts, completions, completion_ids, ids_file, **kw):
    """The share of a completion's tokens in the set of ids_file."""
    if ids_file not in _sets:
        _sets[ids_file] = set(json.load(open(ids_file)))
    ids = _sets[ids_file]
    return [sum(t in ids for t in c) / len(c) for c in completion_ids]


def too_few(prompts, completions, **kw):
    return [1.0] * (len(completions) - 1)


def not_a_number(prompts, completions, **kw):
    return [math.nan] * len(completions)
'''


@pytest.fixture(scope="module")
def reward_module(tmp_path_factory, tiny_model_dir):
    """A module of reward functions on sys.path, and the token set ``aligned`` rewards: the tokens whose output
    embedding points along one random direction (about half the vocabulary, which a few steps of LoRA can favour by
    turning the last hidden state that way)."""
    folder = tmp_path_factory.mktemp("rewards")
    (folder / "grpo_test_rewards.py").write_text(REWARDS)
    weights = load_file(str(next(Path(tiny_model_dir).glob("*.safetensors"))))
    embeddings = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    direction = torch.randn(embeddings.shape[1], generator=torch.Generator().manual_seed(0))
    ids_file = folder / "ids.json"
    ids_file.write_text(json.dumps((embeddings @ direction > 0).nonzero()[:, 0].tolist()))
    sys.path.insert(0, str(folder))
    yield ids_file
    sys.path.remove(str(folder))


def prompts(n: int) -> list[dict]:
    return [{"prompt": f"Say something about item {i}.", "answer": "yes", "label": "good"} for i in range(n)]


def grpo_config(tiny_model_dir, tmp_path, ids_file, name="run", rows=None, **overrides):
    data = write_jsonl(tmp_path / f"{name}.jsonl", rows if rows is not None else prompts(16))
    cfg = {"model": str(tiny_model_dir), "task": "grpo", "output_dir": str(tmp_path / name),
           "data": {"train": str(data), "val_fraction": 0}, "max_steps": 3, "batch_size": 2, "learning_rate": 3e-2,
           "warmup_ratio": 0.0, "lr_scheduler": "constant", "progress": False, "eval_share": None,
           # a low temperature: the tiny random model's logits are nearly flat over its 49k tokens
           "grpo": {"num_generations": 4, "max_completion_length": 8, "temperature": 0.05,
                    "rewards": [{"name": "grpo_test_rewards:aligned", "options": {"ids_file": str(ids_file)}}]}}
    for key, value in overrides.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return load_config(data=cfg)


# ------------------------------------------------------------------------------------------ learning


def test_reward_rises_on_a_learnable_reward_and_not_without_training(tiny_model_dir, tmp_path, reward_module):
    # no refill rounds (tests/test_grpo_blocks.py tests them): the low temperature leaves many groups of equal
    # rewards, which refill would sample up to 3 more rounds for in every step
    once = {"max_refill_rounds": 0}
    trained = train(grpo_config(tiny_model_dir, tmp_path, reward_module, name="trained", max_steps=20, grpo=once))
    frozen = train(grpo_config(tiny_model_dir, tmp_path, reward_module, name="frozen", max_steps=20,
                               learning_rate=1e-12, grpo=once))
    curve = [r["reward"] for r in trained.metrics]
    still = [r["reward"] for r in frozen.metrics]
    assert sum(curve[-3:]) / 3 > 0.8, curve
    assert sum(still[-3:]) / 3 < 0.5, still              # the same prompts and seeds without learning
    first = trained.metrics[0]
    for key in ("reward", "reward_std", "rewards/grpo_test_rewards:aligned/mean", "frac_reward_zero_std",
                "completions/mean_length", "completions/clipped_ratio"):
        assert key in first, key
    samples = [json.loads(line) for line in (tmp_path / "trained" / "samples.jsonl").read_text().splitlines()]
    assert samples and {"completion", "reward", "rewards", "advantage", "prompt"} <= set(samples[0])


def test_resume_continues_a_run_exactly_sampling_included(tiny_model_dir, tmp_path, reward_module):
    common = {"max_steps": 6, "on_divergence": "off", "grpo": {"loss_type": "grpo", "temperature": 0.3}}
    whole = train(grpo_config(tiny_model_dir, tmp_path, reward_module, name="whole", **common))
    config = grpo_config(tiny_model_dir, tmp_path, reward_module, name="cut", **common)
    recipe = TrainingRecipe(config)
    recipe.setup()
    recipe.loop_start = 0.0
    for _ in range(3):
        recipe.metrics.log(**recipe.train_step())
        recipe.state.metrics_rows += 1
    recipe.save_checkpoint("last")
    recipe.metrics.close()
    resumed = train(config, resume=True)
    assert [r["step"] for r in resumed.metrics] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(whole.metrics, resumed.metrics, strict=True):
        for key in ("loss", "reward", "completions/mean_length", "grad_norm"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (key, a, b)
    assert len({r["reward"] for r in whole.metrics}) > 1        # the samples differ from step to step


def test_num_iterations_trains_each_rollout_several_steps(tiny_model_dir, tmp_path, reward_module):
    config = grpo_config(tiny_model_dir, tmp_path, reward_module, rows=prompts(4), max_steps=None, epochs=1,
                         grpo={"num_iterations": 2, "loss_type": "bnpo", "beta": 0.04, "temperature": 0.3,
                               "dynamic_sampling": False})
    result = train(config)
    assert result.steps == 4                     # 2 micro-batches x 2 iterations
    rewards = [r["reward"] for r in result.metrics]
    assert rewards[0] == rewards[1] and rewards[2] == rewards[3]      # the same samples, trained twice
    assert all("kl" in r for r in result.metrics)
    assert result.metrics[0]["kl"] == pytest.approx(0.0, abs=1e-9)    # the policy is the reference at first
    assert result.metrics[1]["kl"] > 0


def test_completion_logps_sum_to_the_per_example_loss(tiny_model_dir, tmp_path, reward_module):
    """The objective's per-token log-probabilities, laid out ``[n, T]``, are the project's per-example loss (on
    rows with a copy of the prompt per completion; shared-prompt rows equal those: test_grpo_shared_prompt.py)."""
    from tuneforge.training.grpo_rollout import completion_logps, completion_mask

    config = grpo_config(tiny_model_dir, tmp_path, reward_module, grpo={"temperature": 1.0, "share_prompt": False})
    recipe = TrainingRecipe(config)
    recipe.setup()
    batch = recipe._next_micro_batches(1)[0]
    recipe.objective.normaliser(batch)
    packed = batch.rollout.packed
    with torch.no_grad():
        logps = completion_logps(recipe.model, packed, config)
        sums = -packed_example_loss_sums(recipe.model, packed, config.method)
    mask = completion_mask(packed)
    assert logps.shape == mask.shape == (8, int(mask.sum(1).max()))
    torch.testing.assert_close(logps.sum(1), sums, atol=1e-4, rtol=1e-5)
    assert bool((logps[mask == 0] == 0).all())


# ------------------------------------------------------------------------------------------ built-in rewards


def _score(name: str, completions: list[str], **options) -> list[float]:
    from tuneforge.config.run import RewardSpec

    fields = {"answer": ["42", "Paris", "x"], "label": ["spam", "ham", "spam"],
              "completion_tokens": [3, 10, 20], "completion_ids": [[1], [2], [3]]}
    reward = build_rewards([RewardSpec(name=name, options=options)])[0]
    return reward([[{"role": "user", "content": "q"}]] * 3, completions, fields)


def test_builtin_rewards():
    assert _score("exact_match", [" 42", "paris", "x"]) == [1.0, 0.0, 1.0]
    assert _score("normalized_match", ["42.", "PARIS!", "y"]) == [1.0, 1.0, 0.0]
    assert _score("normalized_match", ["so #### 42", "#### Paris", "#### 7"], pattern=r"####\s*(\S+)") == [1, 1, 0]
    assert _score("label_match", ["It is SPAM.", "spam or ham: ham", "ham"], labels=["spam", "ham"]) == [1, 0, 0]
    assert _score("regex", ["<a>1</a>", "1", "<a></a>"], pattern=r"<a>\d+</a>") == [1.0, 0.0, 0.0]
    assert _score("json_valid", ['{"a": 1}', "```json\n[1, 2]\n```", "{a: 1}"]) == [1.0, 1.0, 0.0]
    schema = {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}}
    assert _score("json_schema", ['{"a": 1}', '{"a": "x"}', "nope"], schema=schema) == [1.0, 0.0, 0.0]
    assert _score("length_penalty", ["", "", ""], max_tokens=10) == [0.0, 0.0, -1.0]


@pytest.mark.parametrize("name, options, says", [
    ("regex", {}, "regex needs options.pattern"),
    ("regex", {"pattern": "("}, "is no regex"),
    ("json_schema", {}, "options.schema"),
    ("json_schema", {"schema": {"type": "nonsense"}}, "no valid JSON Schema"),
    ("length_penalty", {}, "options.max_tokens"),
    ("no_such_module_xyz:f", {}, "cannot import module 'no_such_module_xyz'"),
    ("json:no_such_function", {}, "has no function 'no_such_function'"),
    ("exactmatch", {}, "neither a built-in"),
    ("reward_model", {}, "options.run"),
])
def test_bad_reward_settings_fail_in_one_line(name, options, says):
    from tuneforge.config.run import RewardSpec

    with pytest.raises(RewardError, match=says.replace("(", r"\(").replace(".", r"\.")):
        build_rewards([RewardSpec(name=name, options=options)])


# ------------------------------------------------------------------------------------------ bad input


def _yaml(tmp_path: Path, config) -> Path:
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


def test_a_reward_that_cannot_be_imported_exits_2_before_a_model_loads(tiny_model_dir, tmp_path, reward_module,
                                                                       capsys):
    config = grpo_config(tiny_model_dir, tmp_path, reward_module, grpo={"rewards": [{"name": "nope_xyz:score"}]})
    assert cli_main(["train", str(_yaml(tmp_path, config))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope_xyz:score" in err[0] and "cannot import" in err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("function, says", [("too_few", "returned 15 scores for 16 completions"),
                                            ("not_a_number", "returned nan for completion 0")])
def test_a_reward_returning_unusable_scores_is_named(tiny_model_dir, tmp_path, reward_module, function, says):
    config = grpo_config(tiny_model_dir, tmp_path, reward_module,
                         grpo={"rewards": [{"name": f"grpo_test_rewards:{function}"}]}, batch_size=4)
    with pytest.raises(RewardError, match=f"grpo_test_rewards:{function} {says}"):
        train(config)


def test_prompts_without_a_field_a_reward_reads(tiny_model_dir, tmp_path, reward_module):
    rows = prompts(6)
    del rows[2]["answer"]
    config = grpo_config(tiny_model_dir, tmp_path, reward_module, rows=rows, max_steps=1,
                         grpo={"rewards": [{"name": "exact_match"}]})
    train(config)
    rejects = [json.loads(line) for line in (tmp_path / "run" / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and rejects[0]["line"] == 3
    assert "missing field 'answer', which reward exact_match reads" in json.dumps(rejects[0])
    none = [{"prompt": r["prompt"]} for r in prompts(3)]
    config = grpo_config(tiny_model_dir, tmp_path, reward_module, rows=none, name="none",
                         grpo={"rewards": [{"name": "label_match", "options": {"field": "verdict"}}]})
    with pytest.raises(DataError, match=r"none\.jsonl:1: missing_field: missing field 'verdict', which reward "
                                        r"label_match reads"):
        train(config)


def test_config_checks(tiny_model_dir, tmp_path, reward_module):
    with pytest.raises(ConfigError, match="grpo.rewards"):
        grpo_config(tiny_model_dir, tmp_path, reward_module, grpo={"rewards": []})
    with pytest.raises(ConfigError, match="grpo.beta 0.1 needs a reference model"):
        grpo_config(tiny_model_dir, tmp_path, reward_module, method="full", grpo={"beta": 0.1})
    with pytest.raises(ConfigError, match="loss_type"):
        grpo_config(tiny_model_dir, tmp_path, reward_module, grpo={"loss_type": "ppo"})


def test_the_reward_model_reward_scores_as_the_reward_model_api(tiny_model_dir, tmp_path):
    """The reward_model reward (built below the stages) gives RewardModel.score's numbers for the same texts."""
    from tuneforge.config.run import RewardSpec
    from tuneforge.evaluation.reward_model import RewardModel

    pairs = [{"prompt": f"Tell me about {w}.", "chosen": f"{w} is fine banana", "rejected": f"{w}?"}
             for w in ("apple", "river", "stone", "cloud")]
    config = load_config(data={
        "task": "reward", "model": str(tiny_model_dir), "output_dir": str(tmp_path / "rm"), "progress": False,
        "device": "cpu", "data": {"train": str(write_jsonl(tmp_path / "pairs.jsonl", pairs)), "val_fraction": 0,
                                  "system_prompt": "Be brief."},
        "batch_size": 2, "max_steps": 2, "learning_rate": 1e-2, "warmup_ratio": 0.0, "eval_share": None})
    run = train(config).run_dir
    reward = build_rewards([RewardSpec(name="reward_model", options={"run": str(run), "batch_size": 3})])[0]
    messages = [[{"role": "user", "content": p["prompt"]}] for p in pairs]
    texts = [p["chosen"] for p in pairs]
    ours = reward(messages, texts, {})
    theirs = RewardModel.from_run(run).score(messages, texts)
    assert ours == pytest.approx(theirs, abs=1e-5)
    assert len({round(x, 4) for x in ours}) > 1
    sft = tmp_path / "not-a-run"
    sft.mkdir()
    with pytest.raises(RewardError, match="not a tuneforge run directory"):
        build_rewards([RewardSpec(name="reward_model", options={"run": str(sft)})])


# ------------------------------------------------------------------------------------------ resume after SIGKILL


def _kill_settings(tiny_model_dir, tmp_path, name: str) -> dict:
    """6 steps of 2 prompts x 4 completions, a built-in reward that varies between completions of the tiny random
    model (one of k, q, x, z in the text), LoRA dropout (so the dropout stream must continue too), a checkpoint
    every step."""
    data = write_jsonl(tmp_path / "kill-prompts.jsonl", prompts(12))
    return {"model": str(tiny_model_dir), "task": "grpo", "output_dir": str(tmp_path / name), "seed": 3,
            "data": {"train": str(data), "val_fraction": 0}, "max_steps": 6, "batch_size": 2, "learning_rate": 3e-2,
            "warmup_ratio": 0.0, "lr_scheduler": "constant", "progress": False, "eval_share": None,
            "save_every": 1, "keep_best": False, "on_divergence": "off", "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
            "grpo": {"num_generations": 4, "max_completion_length": 8, "temperature": 0.7, "loss_type": "grpo",
                     "rewards": [{"name": "regex", "options": {"pattern": "[kqxz]"}}]}}


def test_a_run_killed_with_sigkill_after_a_checkpoint_resumes_to_the_uninterrupted_weights(tiny_model_dir, tmp_path):
    """kill -9 the ``tuneforge train`` process once a step's checkpoint is on disk (the run directory polled), resume
    with ``--resume``: every step logged once, the same rewards (the sampling RNG continued), and bitwise the adapter
    of a run never stopped."""
    import signal
    import time

    import yaml

    from test_resume import _cli_train
    from tuneforge.training.checkpoint import CheckpointDir

    whole = train(load_config(data=_kill_settings(tiny_model_dir, tmp_path, "whole")))
    assert len({r["reward"] for r in whole.metrics}) > 1 and any(r["grad_norm"] > 0 for r in whole.metrics)
    settings = _kill_settings(tiny_model_dir, tmp_path, "killed")
    out = Path(settings["output_dir"])
    config_file = tmp_path / "killed.yaml"
    config_file.write_text(yaml.safe_dump(settings))
    proc = _cli_train(config_file)
    checkpoints = CheckpointDir(out / "checkpoints")
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and (checkpoints.current_step("last") or 0) < 2:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    step = checkpoints.current_step("last")
    assert step is not None and 2 <= step < 6 and not (out / "adapter_model.safetensors").exists(), step
    resumed = train(load_config(config_file), resume=True)
    assert [r["step"] for r in resumed.metrics] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(whole.metrics, resumed.metrics, strict=True):
        for key in ("loss", "reward", "completions/mean_length", "grad_norm"):
            assert a[key] == b[key], (key, a, b)
    wa = load_file(str(whole.run_dir / "adapter_model.safetensors"))
    wb = load_file(str(out / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    whole_samples = [json.loads(line) for line in (whole.run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples == whole_samples          # the killed run's samples after its checkpoint are not kept twice
