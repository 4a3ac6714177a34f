"""A method's record says which engines train it and what it costs in memory: a toy method registered here, from
the test, that declares only the single-process engine and its memory terms is estimated by ``estimate_memory``
(its terms show up in the estimate) and refused, in one line naming it and the engines it trains on, by the FSDP2,
DeepSpeed and DDP strategies and by ``plan_distributed``; nothing outside this file changes for it."""

from __future__ import annotations

import pytest

from tuneforge.cli import main
from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.estimate import estimate_memory, resolve_shape
from tuneforge.estimate.distributed_plan import plan_distributed
from tuneforge.methods import Method, register_method, unregister_method
from tuneforge.methods.engines import engine_refusal, methods_on
from tuneforge.methods.full.model import load_full
from tuneforge.methods.memory import MemoryInputs, MemoryTerms
from tuneforge.schema import Settings
from tuneforge.training.strategies import DDP, FSDP2, DeepSpeed, SingleProcess

EXTRA = {"per_token": 1234, "per_layer": 777, "shared": 999}    # what the toy's layers save beyond a frozen block


class NormOnlyConfig(Settings):
    """The toy method's settings: which parameter trains."""
    parameter: str = "model.norm.weight"


def _apply(model, config, tokenizer=None):
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_parameter(config.norm_only_1p.parameter).requires_grad_(True)
    return model


def _memory(inputs: MemoryInputs) -> MemoryTerms:
    """The final norm's weight trains, in the base's dtype; a frozen block plus the toy's own extras."""
    d, w = inputs.shape.hidden_size, inputs.dtype_bytes
    return MemoryTerms(trainable_params=d, weights=inputs.shape.num_parameters() * w, param_bytes=w,
                       largest_trainable=d, act_bytes=w,
                       per_token_layer=inputs.block(w).frozen + EXTRA["per_token"], per_layer=EXTRA["per_layer"],
                       shared=EXTRA["shared"], notes=("norm_only_1p: the final norm's weight trains",))


@pytest.fixture()
def toy_method():
    register_method(Method(name="norm_only_1p", summary="only the final norm's weight trains, on one process",
                           settings={"norm_only_1p": NormOnlyConfig}, apply=_apply, load_trained=load_full,
                           saved_types=(), is_full_model=True, not_mergeable_reason="a test's toy",
                           memory=_memory, engines=frozenset({"single"})))
    yield
    unregister_method("norm_only_1p")


def test_the_toy_methods_memory_terms_are_in_its_estimate(toy_method, capsys, monkeypatch):
    shape = resolve_shape("smollm2-135m")
    seq, batch = 256, 2
    est = estimate_memory(shape, "norm_only_1p", seq, batch, dtype="fp32", device="cpu")
    assert (est.method, est.trainable_params) == ("norm_only_1p", shape.hidden_size)
    assert est.weights == 4 * shape.num_parameters() and est.gradients == 4 * shape.hidden_size
    assert est.optimizer_states == 2 * 4 * shape.hidden_size
    assert "norm_only_1p: the final norm's weight trains" in est.assumptions
    monkeypatch.setitem(EXTRA, "per_token", 0)
    monkeypatch.setitem(EXTRA, "per_layer", 0)
    monkeypatch.setitem(EXTRA, "shared", 0)
    plain = estimate_memory(shape, "norm_only_1p", seq, batch, dtype="fp32", device="cpu")
    assert est.activations - plain.activations == shape.num_layers * (seq * batch * 1234 + 777) + 999
    assert main(["estimate", "--model", "smollm2-135m", "--method", "norm_only_1p", "--seq", "128"]) == 0
    assert "method=norm_only_1p" in capsys.readouterr().out


def _config():
    return load_config(data={"model": "smollm2-135m", "method": "norm_only_1p", "data": {"train": "x"}},
                       check_files=False)


def _one_line_naming_the_toy(message: str, engine: str) -> None:
    assert "\n" not in message
    assert message.startswith(f"method norm_only_1p with {engine} is not tested yet")
    assert message.endswith("train it on one process")        # the engines it trains on: one process only


@pytest.mark.parametrize("strategy, engine", [
    (FSDP2(None, 0, 2), "FSDP2"), (DeepSpeed(None, 0, 2, 2), "DeepSpeed"), (DeepSpeed(None, 0, 2, 3), "DeepSpeed"),
    (DDP(None, 0, 2), "DDP"),
], ids=["fsdp2", "zero2", "zero3", "ddp"])
def test_engines_it_does_not_declare_refuse_it_in_one_line(toy_method, strategy, engine):
    config = _config()
    with pytest.raises(ConfigError) as refused:
        strategy.check(config)
    _one_line_naming_the_toy(str(refused.value), engine)
    SingleProcess().check(config)                             # the engine it declares trains it


@pytest.mark.parametrize("tree, engine", [
    ({"distributed_type": "FSDP", "num_processes": 8}, "FSDP2"),
    ({"distributed_type": "DEEPSPEED", "num_processes": 8, "deepspeed_config": {"zero_stage": 3}}, "DeepSpeed"),
    ({"distributed_type": "MULTI_GPU", "num_processes": 8}, "DDP"),
])
def test_plan_distributed_says_the_launch_would_be_refused(toy_method, tree, engine):
    plan = plan_distributed(_config(), tree)
    assert not plan.supported and plan.refusal is not None
    _one_line_naming_the_toy(plan.refusal, engine)
    assert plan.refusal in plan.table()
    assert plan_distributed(_config(), {"distributed_type": "NO"}).supported


def test_todays_engine_table():
    """What each engine trains, as the strategies and their tests prove it (a change here is a change of support)."""
    assert methods_on("single") == ["adapter", "full", "ia3", "lora", "prefix", "prompt", "qlora"]
    assert methods_on("ddp") == ["adapter", "full", "ia3", "lora", "prefix", "prompt", "qlora"]
    assert methods_on("fsdp2") == ["full", "lora"]
    assert methods_on("deepspeed") == ["lora"]
    assert engine_refusal("qlora", "fsdp2") == (
        "method qlora with FSDP2: 4-bit weights lose their quantisation state when FSDP2 gathers them; train QLoRA "
        "with DDP (distributed_type MULTI_GPU) or on one GPU")
    assert engine_refusal("full", "deepspeed") == (
        "method full with DeepSpeed is not tested yet (DeepSpeed trains lora); train it with DDP (distributed_type "
        "MULTI_GPU) or FSDP2, or on one process")


@pytest.mark.parametrize("settings, message", [
    ({"method": "qlora", "dtype": "fp32", "qlora": {"compute_dtype": "bf16"}},
     "qlora.compute_dtype must match dtype fp32 (or be 'auto')"),
    ({"method": "prefix", "gradient_checkpointing": True},
     "method prefix with gradient_checkpointing: transformers drops the prefix's key/value cache"),
])
def test_method_specific_config_checks_come_from_the_records_check_config(settings, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(data={"data": {"train": "x"}, **settings}, check_files=False)
