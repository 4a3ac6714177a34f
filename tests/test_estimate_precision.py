"""The memory estimator by ``precision:`` mode: the modes' dtypes agree with the trainer's
(:func:`~tuneforge.training.precision.resolve_precision`), the static terms per mode are the bytes per parameter
the docs quote and the bytes of the real tensors after a step under each mode, and the activations under
``torch.autocast`` are, byte for byte, the tensors autograd saves in a decoder layer."""

from __future__ import annotations

import json

import pytest
import torch

from test_estimate import TINY, _nbytes, _saved_bytes_of_layer
from tuneforge.cli import main
from tuneforge.config import RunConfig, load_config
from tuneforge.estimate import estimate_memory
from tuneforge.estimate.memory import activation_bytes_per_token_layer, memory_inputs, method_settings, method_terms
from tuneforge.estimate.precision import MODES, precision_bytes
from tuneforge.estimate.shapes import shape_from_config
from tuneforge.training.precision import FP16_ON_CPU_FOR_TESTS, dtype_name, resolve_precision

# bytes per trained parameter: its weight + gradient + AdamW's m and v (+ the compensation buffer)
FULL_BYTES_PER_PARAM = {"fp32": 16, "bf16-mixed": 16, "bf16-true": 14, "fp16-mixed": 16}
ADAPTER_BYTES_PER_PARAM = 16                           # fp32 adapters in every mode
BASE_BYTES_UNDER_ADAPTERS = {"fp32": 4, "bf16-mixed": 2, "bf16-true": 2, "fp16-mixed": 2}


@pytest.mark.parametrize("full", [True, False], ids=["full", "adapters"])
@pytest.mark.parametrize("mode", MODES)
def test_the_estimators_dtypes_are_the_trainers(mode, full, monkeypatch):
    monkeypatch.setenv(FP16_ON_CPU_FOR_TESTS, "1")
    plan = resolve_precision(mode, "auto", torch.device("cpu"), full)
    pb = precision_bytes(mode, full)
    assert (pb.base, pb.trained, pb.autocast, pb.compensated) == (
        dtype_name(plan.base_dtype), dtype_name(plan.trained_dtype),
        None if plan.autocast_dtype is None else dtype_name(plan.autocast_dtype), plan.compensated)


@pytest.mark.parametrize("mode", MODES)
def test_bytes_per_parameter_of_each_mode(mode):
    full = estimate_memory("smollm2-135m", "full", 64, precision=mode, device="cpu")
    P = full.total_params
    assert full.weights + full.gradients + full.optimizer_states == FULL_BYTES_PER_PARAM[mode] * P
    lora = estimate_memory("smollm2-135m", "lora", 64, precision=mode, device="cpu")
    n = lora.trainable_params
    assert lora.weights == BASE_BYTES_UNDER_ADAPTERS[mode] * P + 4 * n
    assert 4 * n + lora.gradients + lora.optimizer_states == ADAPTER_BYTES_PER_PARAM * n


def _trainer_model(method: str, mode: str, attention: str = "packed_sdpa"):
    """The tiny model set up as the trainer sets it up under ``mode``: base in the plan's dtype, the method
    applied, trained parameters cast, fused RMSNorm and the attention path."""
    from tuneforge.kernels.packed_attention import NAME, set_attention
    from tuneforge.kernels.rms_norm import fuse_rms_norm
    from tuneforge.methods import apply_method
    from tuneforge.models.loading import build_tiny_model
    from tuneforge.training.precision import cast_trained

    plan = resolve_precision(mode, "auto", torch.device("cpu"), method == "full")
    base = build_tiny_model(**TINY).to(plan.base_dtype)
    shape = shape_from_config(base.config, "tiny")
    config = RunConfig.model_validate({"method": method, "data": {"train": "x"}, "learning_rate": 1e-3,
                                       "precision": mode, "lora": {"r": 4, "dropout": 0.05}})
    model = apply_method(base, config)
    cast_trained(model, plan)
    set_attention(model, NAME if attention == "packed_sdpa" else "sdpa")
    fuse_rms_norm(model)
    model.train()
    return model, shape, plan, config


@pytest.mark.parametrize("method, mode", [("full", "bf16-mixed"), ("full", "bf16-true"), ("lora", "bf16-mixed"),
                                          ("lora", "bf16-true")])
def test_static_terms_match_the_tensors_after_a_step_under_the_mode(method, mode):
    from tuneforge.data.packing import pack
    from tuneforge.data.rendering import TokenizedExample
    from tuneforge.methods.loss import packed_loss_sum
    from tuneforge.training.precision import Precision
    from tuneforge.training.trainer import make_optimizer

    model, shape, plan, config = _trainer_model(method, mode)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(config, params, compensated=plan.compensated)
    precision = Precision(plan, torch.device("cpu"))
    with precision.autocast():
        loss = packed_loss_sum(model, pack([TokenizedExample(list(range(5, 17)), [True] * 12)]), method)
    precision.backward(loss)
    precision.step(optimizer)

    est = estimate_memory(shape, method, seq=12, lora_r=4, precision=mode, device="cpu")
    states = [s for state in optimizer.state.values() for s in state.values() if s.dim() > 0]
    assert est.trainable_params == sum(p.numel() for p in params)
    assert est.weights == _nbytes(model.parameters())
    assert est.gradients == _nbytes(p.grad for p in params)
    assert est.optimizer_states == _nbytes(states)


@pytest.mark.parametrize("attention", ["packed_sdpa", "sdpa"])
@pytest.mark.parametrize("method, batch", [("full", 1), ("full", 3), ("lora", 1), ("lora", 3)])
def test_activations_under_autocast_match_the_tensors_autograd_saves(method, batch, attention):
    mode, seq = "bf16-mixed", 16
    model, shape, plan, config = _trainer_model(method, mode, attention)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        measured = _saved_bytes_of_layer(model, method, layer=1, batch=batch, seq=seq)

    c, T = 2, batch * seq
    layer = next(m for name, m in model.named_modules() if name.endswith("model.layers"))[1]
    # autocast's bf16 copies of the layer's trained weights (each saved for its input's gradient)
    casts = c * sum(p.numel() for name, p in layer.named_parameters()
                    if p.requires_grad and p.dim() == 2 and (method == "full" or "lora_B" in name))
    dense = batch > 1 and attention == "sdpa"
    mask = c * T * T if dense else 0    # the float block mask SDPA saves: autocast casts it to bf16 too
    predicted = T * activation_bytes_per_token_layer(shape, method, 4, batch > 1, lora_r=4, lora_dropout=0.05,
                                                     device="cpu", attention=attention, precision=mode)
    assert measured == predicted + casts + mask

    # and the estimator's whole-model cast term is every layer's plus (full) the LM head's
    sections = method_settings({"lora": config.lora})
    terms = method_terms(method, memory_inputs(shape, sections, "fp32" if method == "full" else "bf16", seq, batch,
                                               attention, "cpu", precision=mode, autocast_bytes=c))
    head = c * shape.vocab_size * shape.hidden_size if method == "full" else 0
    assert terms.weight_casts == shape.num_layers * casts + head
    if dense:   # the estimate's mask term: each layer's SDPA mask in bf16 + the bool block mask built once
        kw = dict(lora_r=4, lora_dropout=0.05, precision=mode, device="cpu")
        both = [estimate_memory(shape, method, seq, batch, attention=a, **kw) for a in ("sdpa", "packed_sdpa")]
        per_token = [activation_bytes_per_token_layer(shape, method, 4, True, lora_r=4, lora_dropout=0.05,
                                                      device="cpu", attention=a, precision=mode)
                     for a in ("sdpa", "packed_sdpa")]
        assert both[0].activations - both[1].activations == (
            shape.num_layers * (T * (per_token[0] - per_token[1]) + mask) + T * T)


@pytest.mark.parametrize("attention", ["packed_sdpa", "sdpa"])
@pytest.mark.parametrize("method, batch, settings", [
    ("adapter", 1, {}), ("adapter", 3, {}), ("adapter", 3, {"nonlinearity": "relu", "bottleneck": 24}),
    ("adapter", 3, {"dropout": 0.1, "placement": ["mlp"]}), ("adapter", 3, {"nonlinearity": "tanh", "dropout": 0.1}),
    ("ia3", 1, {}), ("ia3", 3, {}), ("prefix", 1, {}), ("prefix", 3, {}), ("prompt", 1, {}), ("prompt", 3, {}),
])
def test_the_other_methods_activations_under_autocast_match_the_tensors_autograd_saves(method, batch, settings,
                                                                                          attention):
    from tuneforge.kernels.packed_attention import NAME, set_attention
    from tuneforge.kernels.rms_norm import fuse_rms_norm
    from tuneforge.methods import apply_method
    from tuneforge.models.loading import build_tiny_model
    from tuneforge.training.precision import cast_trained

    mode, seq, c = "bf16-mixed", 16, 2
    plan = resolve_precision(mode, "auto", torch.device("cpu"), False)
    base = build_tiny_model(**TINY).to(plan.base_dtype)
    shape = shape_from_config(base.config, "tiny")
    config = RunConfig.model_validate({"method": method, "data": {"train": "x"}, "prefix": {"num_virtual_tokens": 4},
                                       "prompt": {"num_virtual_tokens": 4}, **({method: settings} if settings else {})})
    model = apply_method(base, config)
    cast_trained(model, plan)
    set_attention(model, NAME if attention == "packed_sdpa" else "sdpa")
    fuse_rms_norm(model)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        measured = _saved_bytes_of_layer(model, method, layer=1, batch=batch, seq=seq)

    sections = method_settings({key: config.section(key) for key in ("adapter", "ia3", "prefix", "prompt")})
    terms = method_terms(method, memory_inputs(shape, sections, "bf16", seq, batch, attention, "cpu", precision=mode,
                                               autocast_bytes=c))
    assert terms.autocast_checked
    layer = next(m for name, m in model.named_modules() if name.endswith("model.layers"))[1]
    saved_casts = c * sum(p.numel() for p in layer.parameters() if p.requires_grad and p.dim() == 2)
    tokens = seq * batch + terms.extra_tokens
    dense = batch > 1 and attention == "sdpa" and not terms.explicit_mask
    predicted = tokens * terms.per_token_layer + terms.per_layer + (c * tokens ** 2 if dense else 0)
    assert measured == predicted + (saved_casts if method == "adapter" else 0)
    if method == "adapter":     # every adapter weight's and bias's copy (the biases' only cached)
        assert terms.weight_casts == c * sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_the_breakdown_says_which_dtype_each_term_is_in(capsys):
    assert main(["estimate", "--model", "7b", "--method", "full", "--precision", "bf16-mixed"]) == 0
    out = capsys.readouterr().out
    assert "fp32: the master weights (bf16-mixed" in out and "bf16 under autocast" in out
    assert "autocast's bf16 weight copies" in out
    assert main(["estimate", "--model", "7b", "--method", "full", "--precision", "bf16-true"]) == 0
    assert "compensation bf16 (bf16-true" in capsys.readouterr().out
    # auto: what train picks on the device (a GPU: bf16-mixed; a CPU: fp32); with --dtype, by the dtype
    for argv, mode in [(["--device", "cuda"], "bf16-mixed"), (["--device", "cpu"], "fp32"),
                       (["--dtype", "bf16"], "bf16-true"), (["--dtype", "fp16"], "fp16-mixed")]:
        assert main(["estimate", "--model", "7b", "--method", "lora", "--json", *argv]) == 0
        assert json.loads(capsys.readouterr().out)[0]["precision"] == mode, argv


def test_master_weights_is_a_deprecated_alias_of_bf16_mixed(capsys):
    common = ["estimate", "--model", "7b", "--method", "full", "--json", "--device", "cpu"]   # auto there: fp32
    assert main([*common, "--precision", "bf16-mixed"]) == 0
    mixed = json.loads(capsys.readouterr().out)
    assert mixed[0]["precision"] == "bf16-mixed"
    assert main([*common, "--master-weights"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == mixed and "--master-weights is deprecated" in captured.err


def test_a_dtype_the_mode_does_not_store_is_one_line_and_exit_2(capsys):
    assert main(["estimate", "--model", "7b", "--method", "lora", "--precision", "bf16-mixed", "--dtype", "fp32"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["error: --dtype fp32 with --precision bf16-mixed: bf16-mixed stores lora's base weights in bf16 "
                   "(leave --dtype unset)"]


def test_plan_reads_the_configs_precision():
    from tuneforge.estimate.plan import plan_for_config

    config = load_config("examples/quickstart.yaml", check_files=False, data={"precision": "bf16-mixed"})
    plan = plan_for_config(config, 64 * 2**30)
    assert plan.precision.startswith("bf16-mixed (as configured)") and "bf16 under autocast" in plan.precision
    chosen = plan.chosen.estimate
    assert chosen.precision == "bf16-mixed"
    assert chosen.peak == estimate_memory(config.model, "lora", config.data.max_length, plan.chosen.batch_size,
                                          precision="bf16-mixed", device="cpu", attention=config.attention,
                                          settings={"lora": config.lora}).peak
    assert plan.table().splitlines()[0].startswith("precision bf16-mixed")


def test_plan_refuses_a_precision_the_trainer_refuses(capsys):
    assert main(["plan", "examples/quickstart.yaml", "--memory", "8GB", "--set", "precision=fp16-mixed"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: precision: fp16-mixed needs a CUDA GPU"), err


def test_autocasts_weight_copies_stay_alive_until_the_forward_ends_also_with_checkpointing():
    """The estimate counts every weight's bf16 copy with the activations also under gradient checkpointing (which
    drops the saved tensors but not autocast's cast cache): the copies alive at the end of the forward are exactly
    the estimator's ``weight_casts``, and leaving autocast frees all but the LM head's (saved outside a layer)."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    from tuneforge.data.packing import pack
    from tuneforge.data.rendering import TokenizedExample
    from tuneforge.methods.loss import packed_loss_sum

    model, shape, _, config = _trainer_model("full", "bf16-mixed")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    weight_shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    made: list[weakref.ref] = []

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16 and tuple(out.shape) in weight_shapes:
                made.append(weakref.ref(out))
            return out

    def alive() -> int:
        return sum(t.untyped_storage().nbytes() for t in (r() for r in made) if t is not None)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        with Track():
            loss = packed_loss_sum(model, pack([TokenizedExample(list(range(5, 21)), [True] * 16)]), "full")
        at_end = alive()
    terms = method_terms("full", memory_inputs(shape, method_settings({}), "fp32", 16, 1, "packed_sdpa", "cpu",
                                               precision="bf16-mixed", autocast_bytes=2))
    assert at_end == terms.weight_casts
    assert alive() == 2 * shape.vocab_size * shape.hidden_size and loss.requires_grad   # the graph is still held


def test_the_compensated_steps_temporaries_are_six_fp32_copies_of_the_largest_tensor():
    """bf16-true full fine-tuning's optimizer step (Kahan-compensated AdamW, one tensor at a time): the most
    memory its temporaries hold at once, tracked op by op, is the estimate's step term."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    from tuneforge.data.packing import pack
    from tuneforge.data.rendering import TokenizedExample
    from tuneforge.methods.loss import packed_loss_sum
    from tuneforge.training.trainer import make_optimizer

    model, shape, plan, config = _trainer_model("full", "bf16-true")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(config, params, compensated=plan.compensated)
    row = pack([TokenizedExample(list(range(5, 17)), [True] * 12)])
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        packed_loss_sum(model, row, "full").backward()
        if not optimizer.state:
            optimizer.step()                # the first step makes the states; the second is measured
    made: list[weakref.ref] = []
    peak = [0]
    # what exists before the step (parameters, gradients, the optimizer's states) is no temporary: in-place ops
    # return it
    before = {t.untyped_storage().data_ptr() for t in [*params, *(p.grad for p in params),
                                                        *(s for st in optimizer.state.values() for s in st.values())]}

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() not in before:
                made.append(weakref.ref(out))
            live = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in (r() for r in made) if t is not None}
            peak[0] = max(peak[0], sum(live.values()))
            return out

    with Track():
        optimizer.step()
    est = estimate_memory(shape, "full", seq=12, precision="bf16-true", device="cpu")
    assert peak[0] == est.step_temporaries == 6 * 4 * shape.vocab_size * shape.hidden_size
