"""Own data without a borrowed config: `tuneforge init FILE`, `tuneforge train --data FILE`."""

import json

import pytest
import yaml

from conftest import write_jsonl
from tuneforge.cli import main
from tuneforge.config import load_config
from tuneforge.data.dataset import DataError
from tuneforge.own_data import detect_task, own_data_config, write_init_config


def _tools(n):
    return [{"instruction": f"Which tool answers question {i}?", "output": ["calculator", "search", "weather"][i % 3]}
            for i in range(n)]


def test_detect_task_from_the_records(tmp_path):
    assert detect_task(write_jsonl(tmp_path / "a.jsonl", _tools(5)))[0] == "sft"
    assert detect_task(write_jsonl(tmp_path / "t.jsonl", [{"text": "raw text"}] * 3))[0] == "pretrain"
    pairs = [{"prompt": "q", "chosen": "good", "rejected": "bad"}] * 3
    assert detect_task(write_jsonl(tmp_path / "p.jsonl", pairs))[0] == "preference"
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    ultrafeedback = [{"prompt": "q", "messages": chat,
                      "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}] * 3
    assert detect_task(write_jsonl(tmp_path / "u.jsonl", ultrafeedback))[0] == "preference"
    with pytest.raises(DataError, match=r"none of the first 2 records .*data.columns"):
        detect_task(write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}] * 2))


def test_init_writes_a_commented_config_that_loads(tmp_path):
    data = write_jsonl(tmp_path / "my.jsonl", _tools(40))
    out, task = write_init_config(data, tmp_path / "my.yaml")
    text = out.read_text()
    assert task == "sft" and "# " in text and "validation: null" in text
    config = load_config(out)
    assert config.data.train == str(data.resolve()) and config.data.validation is None
    assert config.output_dir == "runs/my" and config.method == "lora" and config.eval_share == 0.1
    assert (config.max_steps, config.learning_rate, config.batch_size) == (100, 1e-3, 4)     # README: how chosen
    with pytest.raises(Exception, match="exists"):
        write_init_config(data, out)


def test_train_data_without_a_config(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "my.jsonl", _tools(40))
    config = own_data_config(data, [f"model={tiny_model_dir}"])
    assert config.data.validation is None and config.data.val_fraction == 0.1
    rc = main(["train", "--data", str(data), "--set", f"model={tiny_model_dir}", "--set", "max_steps=2",
               "--set", "progress=false", "--set", "lora.r=2"])
    assert rc == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "runs" / "my" / "run.json").read_text())
    assert record["examples"]["train"] == 36 and record["examples"]["validation"] == 4
    assert [d["path"] for d in record["data"] if d] == [str(data.resolve())]


def test_data_with_a_config_replaces_its_validation_file(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    other_val = write_jsonl(tmp_path / "tickets_val.jsonl", [{"prompt": "ticket", "completion": "billing"}] * 8)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "data": {"train": str(other_val),
                                   "validation": str(other_val)}, "max_steps": 1, "progress": False}))
    data = write_jsonl(tmp_path / "my.jsonl", _tools(40))
    assert main(["train", str(cfg), "--data", str(data), "--set", "output_dir=runs/x"]) == 0
    record = json.loads((tmp_path / "runs" / "x" / "run.json").read_text())
    paths = [d["path"] for d in record["data"] if d]
    assert paths == [str(data.resolve())] and record["examples"]["validation"] == 4


def test_cli_data_errors_are_one_line(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"foo": 1}])
    assert main(["train", "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert main(["init", str(tmp_path / "missing.jsonl")]) == 2
    assert main(["train"]) == 2
