"""``trust_remote_code`` on every path that loads a base model, tokenizer or config again: QLoRA's quantized load,
merge (and so export), serve, ``estimate``/``plan``. Each passes the run's own recorded setting or stops in one line
when the run did not opt in; nothing turns it on for a run that did not."""

from __future__ import annotations

import json
import shutil

import pytest
import transformers
import yaml

from tuneforge.errors import ConfigError

AUTO_MAP = "modeling_custom.CustomForCausalLM"


@pytest.fixture()
def remote_code_model(tiny_model_dir, tmp_path):
    """The tiny model, its config naming code of its own (``auto_map``) that the folder does not hold: transformers
    would fail to import it, so every load below is spied on and forwarded without the flag."""
    folder = tmp_path / "remote-model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": AUTO_MAP}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture()
def loads(monkeypatch):
    """Every ``from_pretrained`` of transformers' auto classes called by tuneforge (not those transformers makes
    inside them): (class, the trust_remote_code it was given)."""
    seen: list[tuple[str, object]] = []
    depth = [0]
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer, transformers.AutoConfig):
        original = cls.from_pretrained

        def spy(*args, _original=original, _name=cls.__name__, **kwargs):
            trust = kwargs.pop("trust_remote_code", None)
            if depth[0] == 0:
                seen.append((_name, trust))
            depth[0] += 1
            try:
                return _original(*args, **kwargs)
            finally:
                depth[0] -= 1

        monkeypatch.setattr(cls, "from_pretrained", spy)
    return seen


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and AUTO_MAP in message and "trust_remote_code: true" in message
    return message


def _config(model, trust: bool, method: str = "lora"):
    from tuneforge.config import load_config

    return load_config(data={"model": str(model), "data": {"train": "x.jsonl"}, "method": method,
                             "trust_remote_code": trust, "lora": {"r": 4, "dropout": 0.0}}, check_files=False)


def test_qlora_refuses_without_the_key_and_passes_it_with(remote_code_model, monkeypatch, loads):
    import tuneforge.methods.qlora.model as qlora
    from tuneforge.methods import load_base_model

    monkeypatch.setattr(qlora, "bnb_quantization_config", lambda cfg, dtype: None)   # no bitsandbytes needed
    monkeypatch.setattr(qlora, "release_checkpoint_mapping_", lambda model: None)
    with pytest.raises(ConfigError) as e:
        load_base_model(_config(remote_code_model, False, "qlora"))
    _one_line(e)
    assert loads == []                                                     # refused before anything loads
    load_base_model(_config(remote_code_model, True, "qlora"))
    assert loads == [("AutoModelForCausalLM", True)]


def _run_folder(tmp_path, model, trust: bool | None):
    """A finished LoRA run on ``model``: config.yaml (trust_remote_code false, as written by a run that did not opt
    in), run.json recording ``trust`` (None: no run.json), adapter and tokenizer."""
    from _serve_helpers import save_adapter
    from tuneforge.config import dump_config
    from tuneforge.models.loading import load_tokenizer
    from tuneforge.runs import RunRecord

    run = tmp_path / f"run-{trust}"
    save_adapter(run, "lora", {"lora": {"r": 4, "dropout": 0.0}}, seed=1, scale=0.02)
    (run / "config.yaml").write_text(dump_config(_config(model, False)))
    load_tokenizer(model, trust_remote_code=True).save_pretrained(run)
    if trust is not None:
        RunRecord(tuneforge_run=1, trust_remote_code=trust, method="lora").save(run)
    return run


def test_merge_uses_the_run_json_setting(remote_code_model, tmp_path, loads):
    from tuneforge.export.merge import merge_run

    with pytest.raises(ConfigError) as e:
        merge_run(_run_folder(tmp_path, remote_code_model, False), tmp_path / "merged-no", dtype="fp32")
    _one_line(e)
    assert not any(name == "AutoModelForCausalLM" for name, _ in loads)
    report = merge_run(_run_folder(tmp_path, remote_code_model, True), tmp_path / "merged", dtype="fp32")
    assert report.passed
    models = [trust for name, trust in loads if name == "AutoModelForCausalLM"]
    assert models and all(trust is True for trust in models)
    # a run folder without run.json falls back to its config.yaml, which did not opt in
    with pytest.raises(ConfigError):
        merge_run(_run_folder(tmp_path, remote_code_model, None), tmp_path / "merged-none", dtype="fp32")


def test_serve_runs_base_code_only_for_adapters_whose_runs_opted_in(remote_code_model, tmp_path, loads):
    from tuneforge.serving.server import ServeConfig, base_trusts_remote_code

    yes, no = _run_folder(tmp_path, remote_code_model, True), _run_folder(tmp_path, remote_code_model, False)
    base = remote_code_model
    assert base_trusts_remote_code(ServeConfig(base=str(base), adapters={"a": str(yes)}), base) is True
    for adapters in ({"a": str(yes), "b": str(no)}, {}):
        with pytest.raises(ConfigError) as e:
            base_trusts_remote_code(ServeConfig(base=str(base), adapters=adapters), base)
        assert "\n" not in str(e.value) and "trust_remote_code: true" in str(e.value)
    plain = tmp_path / "plain"
    shutil.copytree(base, plain)
    config = json.loads((plain / "config.json").read_text())
    config.pop("auto_map")
    (plain / "config.json").write_text(json.dumps(config))
    assert base_trusts_remote_code(ServeConfig(base=str(plain), adapters={"b": str(no)}), plain) is False


def test_estimate_and_plan_read_the_config_only_with_the_key(remote_code_model, tmp_path, loads, capsys):
    from tuneforge.cli import main
    from tuneforge.estimate.shapes import resolve_shape

    with pytest.raises(ConfigError) as e:
        resolve_shape(str(remote_code_model))
    _one_line(e)
    assert loads == []
    assert resolve_shape(str(remote_code_model), trust_remote_code=True).num_layers == 2
    assert loads == [("AutoConfig", True)]
    assert main(["estimate", "--model", str(remote_code_model), "--device", "cpu"]) == 2
    assert AUTO_MAP in capsys.readouterr().err
    assert main(["estimate", "--model", str(remote_code_model), "--device", "cpu", "--trust-remote-code"]) == 0
    path = tmp_path / "run.yaml"
    (tmp_path / "x.jsonl").write_text('{"text": "a"}\n')
    path.write_text(yaml.safe_dump({"model": str(remote_code_model), "data": {"train": str(tmp_path / "x.jsonl")},
                                    "memory_budget": "8GB"}))
    assert main(["plan", str(path)]) == 2
    assert AUTO_MAP in capsys.readouterr().err
