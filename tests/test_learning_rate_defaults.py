"""Each method declares its default learning rate in its registry record (full fine-tuning: the rate measured by
``benchmarks/full_ft_lr_sweep.py``, the others 2e-4); a run config that sets none trains with it, records it in
``run.json`` (with ``learning_rate_default``) and in its ``config.yaml``; a config that sets one keeps it; ``tuneforge
init --method M`` writes the rate a config for M resolves to."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import write_jsonl
from tuneforge.cli import main
from tuneforge.config import RunConfig, dump_config, load_config
from tuneforge.methods import Method, get_method, register_method, unregister_method
from tuneforge.methods.full.model import load_full
from tuneforge.methods.registry import DEFAULT_LEARNING_RATE
from tuneforge.own_data import LORA_RECIPE_LEARNING_RATE, own_data_config, write_init_config
from tuneforge.schema import Settings

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "full_ft_lr_sweep_cpu_2026-12-03.txt"
FULL = get_method("full").learning_rate


def _config(**keys) -> RunConfig:
    return RunConfig.model_validate({"data": {"train": "unused.jsonl"}, **keys})


def test_full_fine_tuning_defaults_to_the_measured_rate():
    chosen = re.search(r"^chosen: learning_rate ([0-9.e-]+)", RESULTS.read_text(), re.MULTILINE)
    assert chosen, f"{RESULTS} has no 'chosen: learning_rate X' line"
    assert FULL == float(chosen.group(1)) and get_method("full").learning_rate_source == str(RESULTS.relative_to(ROOT))
    assert DEFAULT_LEARNING_RATE == 2e-4 and FULL < DEFAULT_LEARNING_RATE


@pytest.mark.parametrize(("method", "expected"), [("full", FULL), ("lora", 2e-4), ("qlora", 2e-4), ("ia3", 2e-4),
                                                  ("prompt", 2e-4)])
def test_an_unset_learning_rate_is_the_methods_and_a_set_one_wins(method, expected):
    config = _config(method=method)
    assert config.learning_rate == expected and config.learning_rate_is_default
    assert _config(method=method, learning_rate=None).learning_rate == expected      # null: as unset
    explicit = _config(method=method, learning_rate=3e-3)
    assert explicit.learning_rate == 3e-3 and not explicit.learning_rate_is_default


def test_changing_the_method_moves_a_default_rate_not_a_set_one():
    config = _config(method="lora")
    config.method = "full"                  # as auto_fit assigns its choice
    assert config.learning_rate == FULL and config.learning_rate_is_default
    config.learning_rate = 5e-5
    config.method = "lora"
    assert config.learning_rate == 5e-5 and not config.learning_rate_is_default


class _ToyConfig(Settings):
    parameter: str = "model.norm.weight"


@pytest.fixture()
def toy_method():
    register_method(Method(name="toy_lr", summary="a test's toy with its own learning rate",
                           settings={"toy_lr": _ToyConfig}, apply=lambda model, config, tok=None: model,
                           load_trained=load_full, saved_types=(), is_full_model=True,
                           learning_rate=7e-6, learning_rate_source="a test"))
    yield
    unregister_method("toy_lr")


def test_a_method_declares_its_default_in_its_record(toy_method, tmp_path):
    config = _config(method="toy_lr")
    assert config.learning_rate == 7e-6 and config.learning_rate_origin() == "method toy_lr's default, measured: a test"
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"}] * 4)
    out, _ = write_init_config(data, tmp_path / "toy.yaml", method="toy_lr")     # init writes the record's rate
    assert load_config(out).learning_rate == 7e-6 and "toy_lr:" in out.read_text()


def test_the_saved_config_says_where_a_default_rate_comes_from():
    text = dump_config(_config(method="full"))
    line = next(ln for ln in text.splitlines() if ln.startswith("learning_rate:"))
    value, comment = line.split("  # ")
    assert yaml.safe_load(value) == {"learning_rate": FULL}
    assert comment == f"method full's default, measured: {RESULTS.relative_to(ROOT)}"
    assert yaml.safe_load(text)["learning_rate"] == FULL
    assert "#" not in next(ln for ln in dump_config(_config(method="full", learning_rate=1e-4)).splitlines()
                           if ln.startswith("learning_rate:"))


@pytest.mark.parametrize(("keys", "lr", "default"), [({}, FULL, True), ({"learning_rate": 3e-5}, 3e-5, False)])
def test_run_json_records_the_rate_trained_with(tiny_model_dir, tmp_path, keys, lr, default):
    from tuneforge.training.trainer import train

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"question {i}", "completion": "answer"} for i in range(8)])
    config = load_config(data={"model": str(tiny_model_dir), "method": "full", "data": {"train": str(data)},
                               "max_steps": 2, "batch_size": 2, "lr_scheduler": "constant", "warmup_ratio": 0.0,
                               "eval_base": False, "keep_best": False, "on_divergence": "off", "progress": False,
                               "output_dir": str(tmp_path / "run"), **keys})
    result = train(config)
    record = json.loads((result.run_dir / "run.json").read_text())
    assert (record["learning_rate"], record["learning_rate_default"]) == (lr, default)
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if "lr" in r] == [lr, lr]                          # what the optimizer used


def _tickets(tmp_path):
    chat = [{"role": "user", "content": "my card was charged twice"}, {"role": "assistant", "content": "billing"}]
    return write_jsonl(tmp_path / "tickets.jsonl", [{"messages": chat}] * 40)


@pytest.mark.parametrize(("method", "expected"), [("full", FULL), ("lora", LORA_RECIPE_LEARNING_RATE)])
def test_init_writes_the_methods_rate_and_a_run_of_it_resolves_the_same(tmp_path, capsys, method, expected):
    data = _tickets(tmp_path)
    out = tmp_path / f"{method}.yaml"
    assert main(["init", str(data), "--method", method, "--out", str(out)]) == 0
    text = out.read_text()
    config = load_config(out)
    assert (config.method, config.learning_rate) == (method, expected)
    lr_line = next(ln for ln in text.splitlines() if ln.startswith("learning_rate:"))
    assert ("benchmarks/results/full_ft_lr_sweep_cpu_2026-12-03.txt" if method == "full"
            else "docs/guides/own-data.md") in lr_line
    assert ("lora:" in text) == (method == "lora") and ("full:" in text) == (method == "full")
    # the written config without its learning_rate line: the method's default, the same value for full
    unset = load_config(data={k: v for k, v in yaml.safe_load(text).items() if k != "learning_rate"})
    assert unset.learning_rate == (FULL if method == "full" else DEFAULT_LEARNING_RATE)
    assert own_data_config(data, [f"method={method}"]).learning_rate == expected    # train --data --set method=


def test_init_refuses_an_unknown_method_in_one_line(tmp_path, capsys):
    assert main(["init", str(_tickets(tmp_path)), "--method", "fulll", "--out", str(tmp_path / "x.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown method 'fulll' (did you mean 'full'?)" in err
    assert not (tmp_path / "x.yaml").exists()
