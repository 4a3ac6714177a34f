"""Renamed config keys (tuneforge.deprecations): the old key still loads, with one warning naming the new key, and
gives the config the new key gives; old and new set differently is a one-line error; --set takes old keys too."""

from __future__ import annotations

import logging

import pytest
import yaml

from tuneforge.config import RunConfig, dump_config, load_config
from tuneforge.deprecations import MOVED, SECTION_DEFAULTS
from tuneforge.errors import ConfigError

LABELS = ["billing", "shipping", "login"]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (tmp_path / "test.jsonl").write_text('{"prompt": "a", "completion": "billing"}\n')
    return tmp_path


def write(folder, name: str, tree: dict):
    path = folder / name
    path.write_text(yaml.safe_dump({"data": {"train": "train.jsonl"}, **tree}))
    return path


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tuneforge.deprecations"]


def test_the_table_names_keys_the_config_has():
    """Every new key is a key of RunConfig and every old section is not (else both would load)."""
    for moved in MOVED:
        section, key = moved.new.split(".", 1)
        model = RunConfig.model_fields[section].annotation
        assert key in model.__args__[0].model_fields, moved        # EvalSettings | None
        assert moved.section not in RunConfig.model_fields, moved
        assert moved.removed_in
    for section, defaults in SECTION_DEFAULTS.items():
        assert set(defaults) <= {m.new for m in MOVED if m.section == section}


def test_old_keys_load_with_a_warning_each_and_give_the_new_keys_config(files, caplog):
    old = write(files, "old.yaml", {"eval_task": {"file": "test.jsonl", "labels": LABELS, "max_new_tokens": 8,
                                                  "max_examples": 50}})
    new = write(files, "new.yaml", {"eval": {"data": "test.jsonl", "labels": LABELS, "max_new_tokens": 8,
                                             "max_examples": 50}})
    with caplog.at_level(logging.WARNING, logger="tuneforge.deprecations"):
        from_old = load_config(old)
    assert sorted(warnings(caplog)) == sorted(
        f"{old}: eval_task.{key} is deprecated: use eval.{new_key}; eval_task goes in tuneforge 0.2.0"
        for key, new_key in (("file", "data"), ("labels", "labels"), ("max_new_tokens", "max_new_tokens"),
                             ("max_examples", "max_examples")))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tuneforge.deprecations"):
        from_new = load_config(new)
    assert not warnings(caplog)
    assert from_old == from_new
    assert from_old.eval.data == str(files / "test.jsonl")     # resolved from the config's folder, as file was
    assert "eval_task" not in dump_config(from_old)             # a run's config.yaml is written with the new keys


def test_an_old_section_brings_its_defaults_so_an_old_config_evaluates_as_before(files, caplog):
    """eval_task: meant at most 200 examples and 16 new tokens; eval:'s own defaults are all and 64."""
    old = write(files, "old.yaml", {"eval_task": {"file": "test.jsonl"}})
    with caplog.at_level(logging.WARNING, logger="tuneforge.deprecations"):
        config = load_config(old)
    assert (config.eval.max_examples, config.eval.max_new_tokens) == (200, 16)
    assert any("eval.max_examples=200, eval.max_new_tokens=16" in w for w in warnings(caplog))
    # a value the new section sets is kept
    both = write(files, "both.yaml", {"eval_task": {"file": "test.jsonl"}, "eval": {"max_new_tokens": 32}})
    assert (load_config(both).eval.max_examples, load_config(both).eval.max_new_tokens) == (200, 32)


def test_old_and_new_set_differently_is_a_one_line_error(files):
    path = write(files, "clash.yaml", {"eval_task": {"file": "test.jsonl", "max_examples": 8},
                                       "eval": {"max_examples": 5}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "\n" not in message and "eval_task.max_examples (8)" in message and "eval.max_examples (5)" in message
    assert "keep only eval.max_examples" in message
    # the same value twice is no conflict
    same = write(files, "same.yaml", {"eval_task": {"file": "test.jsonl"}, "eval": {"data": "test.jsonl"}})
    assert load_config(same).eval.data == str(files / "test.jsonl")
    with pytest.raises(ConfigError, match=r"^--set eval_task.labels=\['a'\] and --set eval.labels=\['b'\]"):
        load_config(None, ["eval_task.labels=[a]", "eval.labels=[b]"], data={"data": {"train": "x"}},
                    check_files=False)


def test_set_of_an_old_key_works_with_the_warning(files, caplog):
    path = write(files, "new.yaml", {"eval": {"data": "test.jsonl", "labels": LABELS, "max_new_tokens": 8}})
    with caplog.at_level(logging.WARNING, logger="tuneforge.deprecations"):
        config = load_config(path, ["eval_task.max_examples=8"])
    assert config == load_config(path, ["eval.max_examples=8"])
    assert config.eval.max_examples == 8 and config.eval.max_new_tokens == 8
    assert warnings(caplog) == ["--set eval_task.max_examples: eval_task.max_examples is deprecated: use "
                                "eval.max_examples; eval_task goes in tuneforge 0.2.0"]
    # an override wins over the file, whichever name either uses
    old = write(files, "old.yaml", {"eval_task": {"file": "test.jsonl", "max_examples": 50}})
    assert load_config(old, ["eval.max_examples=8"]).eval.max_examples == 8
    assert load_config(old, ["eval_task.max_examples=8"]).eval.max_examples == 8
    new = write(files, "new50.yaml", {"eval": {"max_examples": 50}})
    assert load_config(new, ["eval_task.max_examples=8"]).eval.max_examples == 8


def test_set_of_the_whole_old_section(files):
    """--set eval_task=null drops what the file's eval_task set (and nothing eval: set itself); a mapping
    replaces it."""
    old = write(files, "old.yaml", {"eval_task": {"file": "test.jsonl", "labels": LABELS}})
    assert load_config(old, ["eval_task=null"]).eval is None
    mixed = write(files, "mixed.yaml", {"eval_task": {"file": "test.jsonl"}, "eval": {"columns": ["tuned"]}})
    config = load_config(mixed, ["eval_task=null"])
    assert config.eval.columns == ["tuned"] and config.eval.data is None and config.eval.max_examples is None
    config = load_config(old, ["eval_task={max_examples: 3}"])
    assert (config.eval.data, config.eval.labels, config.eval.max_examples) == (None, None, 3)


def test_an_old_runs_config_yaml_still_loads(files):
    """What dump_config wrote before eval: took eval_task's keys: every key spelled out, nulls included."""
    run = write(files, "config.yaml", {"eval_task": {"file": str(files / "test.jsonl"), "max_examples": 200,
                                                     "max_new_tokens": 8, "labels": LABELS}, "eval": None})
    config = load_config(run, check_files=False)
    assert (config.eval.data, config.eval.max_new_tokens, config.eval.labels) == (str(files / "test.jsonl"), 8, LABELS)
    unused = write(files, "unused.yaml", {"eval_task": None, "eval": None})
    assert load_config(unused, check_files=False).eval is None


def test_unknown_and_malformed_old_keys_name_the_new_keys(files):
    with pytest.raises(ConfigError, match=r"unknown key 'eval_task.fiel' \(did you mean 'file'\?\); eval_task is "
                                          r"deprecated: write its keys as eval.data, "):
        load_config(write(files, "typo.yaml", {"eval_task": {"fiel": "test.jsonl"}}))
    with pytest.raises(ConfigError, match="unknown key 'eval_task.max_exampels'"):
        load_config(write(files, "ok.yaml", {}), ["eval_task.max_exampels=3"])
    with pytest.raises(ConfigError, match="'eval_task' must be a section"):
        load_config(write(files, "bad.yaml", {"eval_task": 3}))
    with pytest.raises(ConfigError, match=r"'eval.data': file 'missing.jsonl' not found"):
        load_config(write(files, "missing.yaml", {"eval_task": {"file": "missing.jsonl"}}))
