"""What a new method must touch: one registration. A toy method registered here, from the test, trains two
steps through the CLI, gets its own validated config section, and is refused by merge with its own reason."""

from __future__ import annotations

import json

import pytest
import yaml
from safetensors.torch import load_file

from conftest import write_jsonl
from tuneforge.cli import main
from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.methods import Method, NotMergeableError, register_method, unregister_method
from tuneforge.methods.full.model import load_full
from tuneforge.schema import Settings


class NormOnlyConfig(Settings):
    """The toy method's settings: which parameter trains."""
    parameter: str = "model.norm.weight"


def _apply(model, config, tokenizer=None):
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_parameter(config.norm_only.parameter).requires_grad_(True)
    return model


@pytest.fixture()
def toy_method():
    register_method(Method(name="norm_only", summary="only the final norm's weight trains (a test's toy)",
                           settings={"norm_only": NormOnlyConfig}, apply=_apply, load_trained=load_full,
                           saved_types=(), is_full_model=True, not_mergeable_reason="a test's toy"))
    yield
    unregister_method("norm_only")


def test_a_method_registered_from_a_test_trains_through_the_cli(toy_method, tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl",
                       [{"prompt": f"Ticket {i}", "completion": ["billing", "login"][i % 2]} for i in range(8)])
    config_file = tmp_path / "toy.yaml"
    config_file.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "method": "norm_only", "norm_only": {"parameter": "model.norm.weight"},
        "data": {"train": str(data), "val_fraction": 0.0}, "output_dir": str(tmp_path / "run"),
        "batch_size": 4, "learning_rate": 0.05, "progress": False}))
    assert main(["train", str(config_file), "--set", "max_steps=2"]) == 0

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    trained = load_file(tmp_path / "run" / "model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    changed = {k for k in base if not (trained[k] == base[k]).all()}
    assert changed == {"model.norm.weight"}
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["norm_only"] == {
        "parameter": "model.norm.weight"}


def test_the_new_section_is_validated_and_merge_refuses_with_the_method_reason(toy_method):
    with pytest.raises(ConfigError, match="unknown key 'norm_only.parametr' \\(did you mean 'parameter'\\?\\)"):
        load_config(data={"data": {"train": "x"}, "method": "norm_only", "norm_only": {"parametr": "x"}},
                    check_files=False)
    from tuneforge.export.merge import _refuse

    with pytest.raises(NotMergeableError, match="a test's toy"):
        _refuse("norm_only")


def test_unregistered_methods_are_gone_from_the_config():
    with pytest.raises(ConfigError, match="unknown method 'norm_only'"):
        load_config(data={"data": {"train": "x"}, "method": "norm_only"}, check_files=False)
    with pytest.raises(ConfigError, match="unknown key 'norm_only'"):
        load_config(data={"data": {"train": "x"}, "norm_only": {}}, check_files=False)
