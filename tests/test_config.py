import pytest

from tuneforge.config import load_config
from tuneforge.errors import ConfigError


@pytest.fixture()
def data_file(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\n')
    return str(f)


def test_unknown_key_names_the_closest_valid_key(data_file):
    with pytest.raises(ConfigError, match=r"unknown key 'learnin_rate' \(did you mean 'learning_rate'\?\)"):
        load_config(data={"data": {"train": data_file}, "learnin_rate": 1e-4})


def test_unknown_nested_key_is_suggested_within_its_section(data_file):
    with pytest.raises(ConfigError, match=r"unknown key 'lora.alhpa' \(did you mean 'alpha'\?\)"):
        load_config(data={"data": {"train": data_file}, "lora": {"alhpa": 8}})


def test_wrong_type_names_key_and_value(data_file):
    with pytest.raises(ConfigError, match=r"'max_steps'.*got 'many'"):
        load_config(data={"data": {"train": data_file}}, overrides=["max_steps=many"])


def test_missing_data_file_fails_before_any_model_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"'data.train': file 'nope.jsonl' not found"):
        load_config(data={"data": {"train": "nope.jsonl"}})


def test_missing_required_key():
    with pytest.raises(ConfigError, match=r"missing required key 'data'"):
        load_config(data={"method": "lora"})


def test_unknown_method_lists_choices(data_file):
    with pytest.raises(ConfigError, match=r"'method'.*'lora'"):
        load_config(data={"data": {"train": data_file}, "method": "loraa"})


def test_impossible_combination(data_file):
    with pytest.raises(ConfigError, match="early_stopping_patience needs validation data"):
        load_config(data={"data": {"train": data_file, "val_fraction": 0}, "early_stopping_patience": 2})


def test_dotted_overrides_reach_nested_keys(data_file, tmp_path):
    val = tmp_path / "val.jsonl"
    val.write_text('{"prompt": "a", "completion": "b"}\n')
    config = load_config(data={"data": {"train": "x"}}, overrides=[
        "method=full", "max_steps=3", f"output_dir={tmp_path}/run", f"data.train={data_file}",
        f"data.validation={val}", "lora.r=4", "data.columns.prompt=question"])
    assert (config.method, config.max_steps, config.lora.r) == ("full", 3, 4)
    assert config.data.train == data_file and config.data.validation == str(val)
    assert config.output_dir == f"{tmp_path}/run" and config.data.columns == {"prompt": "question"}


def test_relative_paths_resolve_from_the_config_folder(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "t.jsonl").write_text('{"text": "x"}\n')
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data:\n  train: data/t.jsonl\n")
    monkeypatch.chdir("/")
    assert load_config(cfg).data.train == str(tmp_path / "data" / "t.jsonl")


def test_quickstart_config_is_valid():
    config = load_config("examples/quickstart.yaml")
    assert config.method == "lora" and config.eval.labels


def test_overriding_only_the_training_file_warns_that_validation_still_comes_from_the_config(caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="tuneforge.config"):
        load_config("examples/quickstart.yaml", overrides=["data.train=examples/data/tickets_test.jsonl"])
    warnings = [r.message for r in caplog.records if "data.validation is still" in r.message]
    assert len(warnings) == 1
    assert "tickets_test.jsonl" in warnings[0] and "tickets_validation.jsonl" in warnings[0]
    assert "--set data.validation=null" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tuneforge.config"):
        load_config("examples/quickstart.yaml", overrides=["data.train=examples/data/tickets_test.jsonl",
                                                          "data.validation=null"])
        load_config("examples/quickstart.yaml", overrides=["max_steps=3"])
    assert not [r for r in caplog.records if "data.validation is still" in r.message]
