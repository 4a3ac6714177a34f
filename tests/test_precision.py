"""Precision modes (``precision:``, training/precision.py) on CPU, where torch's autocast computes bf16 (and, for
tests only, fp16 with a gradient scaler): each mode's step against the fp32 step, master weights and compensated
updates against the rounding they prevent, the scaler's skip / back-off / recovery, exact resume with the scaler's
and the master weights' state, and the refusals."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from _method_helpers import CASE_IDS, CASES, HAS_BNB
from conftest import write_jsonl
from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.kernels.compensated_adamw import CompensatedAdamW
from tuneforge.training import precision as precision_mod
from tuneforge.training.precision import resolve_precision
from tuneforge.training.trainer import NonFiniteLossError, TrainingRecipe, train

ROWS = [{"prompt": f"Ticket {i}: {['charged twice', 'parcel late', 'cannot sign in'][i % 3]} again and again",
         "completion": ["billing", "shipping", "login"][i % 3]} for i in range(24)]
CPU = torch.device("cpu")


@pytest.fixture()
def data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", ROWS)


def _config(model_dir, data, out, method="lora", sections=None, **over):
    settings = {"model": str(model_dir), "data": {"train": str(data), "val_fraction": 0.25}, "output_dir": str(out),
                "method": method, "max_steps": 3, "batch_size": 4, "learning_rate": 1e-3, "progress": False,
                "eval_base": False, "keep_best": False, "seed": 3, "on_divergence": "off",
                **(sections if sections is not None else {"lora": {"r": 4, "dropout": 0.0}}), **over}
    return load_config(data=settings)


def _recipe(*args, **kwargs) -> TrainingRecipe:
    recipe = TrainingRecipe(_config(*args, **kwargs))
    recipe.setup()
    return recipe


def _first_gradient(recipe: TrainingRecipe) -> tuple[float, torch.Tensor]:
    """The first micro-batch's loss per trained token and the gradient of every trained parameter, flattened."""
    batch = recipe._next_micro_batches(1)[0]
    normaliser = recipe.objective.normaliser(batch)
    out = recipe.dist.forward_backward(batch.to(recipe.device), normaliser, last=True)
    grads = torch.cat([p.grad.float().flatten() for p in recipe.dist.params if p.grad is not None])
    return out.loss_sum.item() / normaliser, grads


# ------------------------------------------------------------------------------------------------ resolution


@pytest.mark.parametrize("precision,dtype,full,expected", [
    ("auto", "auto", False, ("fp32", torch.float32, torch.float32, None)),
    ("fp32", "auto", True, ("fp32", torch.float32, torch.float32, None)),
    ("bf16-mixed", "auto", False, ("bf16-mixed", torch.bfloat16, torch.float32, torch.bfloat16)),
    ("bf16-mixed", "auto", True, ("bf16-mixed", torch.float32, torch.float32, torch.bfloat16)),   # master weights
    ("bf16-true", "auto", False, ("bf16-true", torch.bfloat16, torch.float32, None)),              # adapters fp32
    ("bf16-true", "bf16", True, ("bf16-true", torch.bfloat16, torch.bfloat16, None)),              # compensated
])
def test_each_mode_stores_and_computes_in_its_dtypes(precision, dtype, full, expected):
    plan = resolve_precision(precision, dtype, CPU, full=full)
    assert (plan.mode, plan.base_dtype, plan.trained_dtype, plan.autocast_dtype) == expected
    assert plan.compensated == (full and precision == "bf16-true")
    assert plan.loss_scaling is False


def test_auto_on_a_gpu_is_bf16_mixed_or_fp16_mixed_by_what_the_gpu_has(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "auto", cuda, full=False).mode == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    plan = resolve_precision("auto", "auto", cuda, full=True)
    assert (plan.mode, plan.loss_scaling, plan.base_dtype) == ("fp16-mixed", True, torch.float32)


@pytest.mark.parametrize("precision,dtype,full,device,words", [
    ("fp16-mixed", "auto", False, "cpu", ["precision: fp16-mixed needs a CUDA GPU", "precision: fp32"]),
    ("bf16-mixed", "auto", False, "cuda-no-bf16", ["precision: bf16-mixed on a GPU without bf16", "fp16-mixed"]),
    ("bf16-true", "auto", True, "cuda-no-bf16", ["precision: bf16-true on a GPU without bf16"]),
    ("bf16-mixed", "bf16", True, "cpu", ["dtype: bf16 with precision: bf16-mixed", "fp32 master weights",
                                          "precision: bf16-true"]),
    ("bf16-true", "fp16", False, "cpu", ["dtype: fp16 with precision: bf16-true", "remove dtype"]),
])
def test_impossible_combinations_are_refused_in_one_line(monkeypatch, precision, dtype, full, device, words):
    if device == "cuda-no-bf16":
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    with pytest.raises(ConfigError) as e:
        resolve_precision(precision, dtype, torch.device("cuda" if device.startswith("cuda") else "cpu"), full)
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_fp16_mixed_on_a_cpu_exits_2_before_any_weights_load(tiny_model_dir, data, tmp_path, monkeypatch, capsys):
    from tuneforge import cli
    from tuneforge.models import loading

    def never(*a, **k):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(loading, "load_model", never)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps({"model": str(tiny_model_dir), "data": {"train": str(data)},
                               "output_dir": str(tmp_path / "out"), "precision": "fp16-mixed"}))
    assert cli.main(["train", str(cfg)]) == 2
    assert "precision: fp16-mixed needs a CUDA GPU" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ against fp32


@pytest.mark.parametrize("mode", ["bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("case", CASE_IDS)
def test_a_low_precision_step_equals_the_fp32_step_within_bf16_tolerance(case, mode, tiny_model_dir, data, tmp_path):
    _, method, sections = dict((c[0], c) for c in CASES)[case]
    if method == "qlora" and not HAS_BNB:
        pytest.skip("bitsandbytes not installed")
    extra = {"dtype": "bf16"} if (mode == "bf16-true" and method == "full") else {}
    ref = _recipe(tiny_model_dir, data, tmp_path / "fp32", method, sections, precision="fp32")
    low = _recipe(tiny_model_dir, data, tmp_path / mode, method, sections, precision=mode, **extra)
    # what each mode stores: trained parameters fp32 (a full fine-tune's bf16 weights in bf16-true)
    trained_dtypes = {p.dtype for p in low.dist.params}
    assert trained_dtypes == {low.plan.trained_dtype}, trained_dtypes
    loss_ref, grad_ref = _first_gradient(ref)
    loss_low, grad_low = _first_gradient(low)
    assert abs(loss_low - loss_ref) <= 1e-2 * abs(loss_ref), (loss_low, loss_ref)
    cosine = torch.nn.functional.cosine_similarity(grad_ref, grad_low, dim=0).item()
    assert cosine > 0.99, cosine
    assert abs(grad_low.norm() / grad_ref.norm() - 1) < 0.05


def test_the_mixed_step_runs_its_matrix_products_in_bf16(tiny_model_dir, data, tmp_path):
    """The mixed mode really computes in bf16 (not fp32 under another name): with fp32 master weights (full
    fine-tuning) an attention projection's output is bf16 under autocast, fp32 without."""
    seen = {}
    for mode in ("fp32", "bf16-mixed"):
        recipe = _recipe(tiny_model_dir, data, tmp_path / mode, "full", {}, precision=mode)
        layer = recipe.model.model.layers[0].self_attn.q_proj
        assert layer.weight.dtype == torch.float32
        handle = layer.register_forward_hook(lambda m, i, o, mode=mode: seen.update({mode: o.dtype}))
        _first_gradient(recipe)
        handle.remove()
    assert seen == {"fp32": torch.float32, "bf16-mixed": torch.bfloat16}


# ------------------------------------------------------------------------------ updates bf16 would lose


def test_master_weights_keep_updates_that_bf16_weights_would_round_away(tiny_model_dir, data, tmp_path):
    """Full fine-tuning under bf16-mixed with a learning rate whose updates are below bf16's resolution at the
    weights' scale: the fp32 master weights move, their bf16 roundings do not (a bf16-only run would not
    have moved at all)."""
    recipe = _recipe(tiny_model_dir, data, tmp_path / "out", "full", {}, precision="bf16-mixed",
                     learning_rate=1e-6, warmup_steps=0, lr_scheduler="constant")
    weight = recipe.model.model.layers[0].mlp.up_proj.weight
    assert weight.dtype == torch.float32
    before = weight.detach().clone()
    recipe.loop_start = 0.0
    recipe.metrics = _NoMetrics()
    recipe.train_step()
    moved = (weight != before).float().mean().item()
    bf16_moved = (weight.bfloat16() != before.bfloat16()).float().mean().item()
    assert moved > 0.9, moved
    assert bf16_moved < 0.05, bf16_moved


class _NoMetrics:
    rows: list = []

    def log(self, **row):
        pass

    def close(self):
        pass


def _adamw_run(param: torch.nn.Parameter, optimizer: torch.optim.Optimizer, steps: int) -> torch.Tensor:
    for _ in range(steps):
        param.grad = torch.ones_like(param)
        optimizer.step()
    return param.detach().float()


def test_compensated_updates_add_up_where_bf16_rounds_each_one_away():
    """A bf16 weight of 1.0 (resolution 2^-8 there) and 300 AdamW updates of 1e-4 each (a constant gradient: the
    update is the learning rate): plain AdamW on the bf16 weight never moves it; the compensated one ends where
    the fp32 run ends, to within one bf16 step."""
    def param(dtype):
        return torch.nn.Parameter(torch.ones(64, dtype=dtype))

    fp32 = param(torch.float32)
    expected = _adamw_run(fp32, torch.optim.AdamW([fp32], lr=1e-4, weight_decay=0.0), 300)
    plain = param(torch.bfloat16)
    stuck = _adamw_run(plain, torch.optim.AdamW([plain], lr=1e-4, weight_decay=0.0), 300)
    comp = param(torch.bfloat16)
    got = _adamw_run(comp, CompensatedAdamW([comp], lr=1e-4, weight_decay=0.0), 300)
    assert torch.all(stuck == 1.0)                                   # the case is built right: bf16 loses it all
    assert abs(expected.mean().item() - 0.97) < 1e-3
    assert torch.allclose(got, expected, atol=2 ** -8)


def test_compensated_adamw_is_torch_adamw_on_fp32_weights():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(32, 16))
    b = torch.nn.Parameter(a.detach().clone())
    ref = torch.optim.AdamW([a], lr=1e-2, weight_decay=0.1)
    ours = CompensatedAdamW([b], lr=1e-2, weight_decay=0.1)
    for _ in range(20):
        g = torch.randn(32, 16)
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    assert torch.allclose(a, b, atol=1e-5, rtol=0)          # fp32 rounding of 20 steps in another order


def test_bf16_true_full_fine_tuning_trains_bf16_weights_with_the_compensated_optimizer(tiny_model_dir, data,
                                                                                      tmp_path):
    recipe = _recipe(tiny_model_dir, data, tmp_path / "out", "full", {}, precision="bf16-true", dtype="bf16")
    assert isinstance(recipe.state.optimizer, CompensatedAdamW)
    assert {p.dtype for p in recipe.dist.params} == {torch.bfloat16}


# ------------------------------------------------------------------------------------- fp16 loss scaling


@pytest.fixture()
def fp16_on_cpu(monkeypatch):
    monkeypatch.setenv(precision_mod.FP16_ON_CPU_FOR_TESTS, "1")


def _settled(recipe: TrainingRecipe) -> TrainingRecipe:
    """A scaler starting at 256: the tiny model's fp16 gradients overflow at GradScaler's first scales (65536,
    32768, ...; the usual first skipped steps of a run), which would mix with the overflows the tests inject."""
    recipe.precision.scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    return recipe


def _overflow_at(recipe: TrainingRecipe, steps: set[int]) -> None:
    """Make the gradient of the first trained parameter infinite in the micro-batches of the given steps (1-based)."""
    inner = recipe.dist.forward_backward

    def forward_backward(batch, normaliser, last):
        out = inner(batch, normaliser, last)
        if recipe.state.step + 1 in steps:
            recipe.dist.params[0].grad.view(-1)[0] = float("inf")
        return out

    recipe.dist.forward_backward = forward_backward


def test_the_fp16_scaler_skips_an_overflowing_step_backs_off_and_recovers(fp16_on_cpu, tiny_model_dir, data,
                                                                           tmp_path):
    recipe = _recipe(tiny_model_dir, data, tmp_path / "out", precision="fp16-mixed", max_steps=4)
    assert recipe.precision.scaler is not None and recipe.plan.autocast_dtype == torch.float16
    _settled(recipe)
    _overflow_at(recipe, {2})
    recipe.fit()
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train_rows = {r["step"]: r for r in rows}
    assert [train_rows[s].get("scaler_skipped", False) for s in (1, 2, 3, 4)] == [False, True, False, False]
    assert train_rows[2]["loss_scale"] == train_rows[1]["loss_scale"] / 2          # backed off
    assert train_rows[4]["loss_scale"] == train_rows[2]["loss_scale"]              # no further back-off
    assert "grad_norm" in train_rows[3] and "skipped" not in train_rows[2]         # not the NaN guard's skip
    assert train_rows[2]["loss"] is not None                                       # the loss itself was finite
    assert recipe.state.scaler_skipped_steps == 1 and recipe.state.skipped_steps == 0


def test_the_skipped_step_leaves_the_weights_as_they_were(fp16_on_cpu, tiny_model_dir, data, tmp_path):
    recipe = _settled(_recipe(tiny_model_dir, data, tmp_path / "out", precision="fp16-mixed", max_steps=2))
    _overflow_at(recipe, {1})
    recipe.loop_start, recipe.metrics = 0.0, _NoMetrics()
    before = [p.detach().clone() for p in recipe.dist.params]
    row = recipe.train_step()
    assert row["scaler_skipped"] is True
    assert all(torch.equal(a, p) for a, p in zip(before, recipe.dist.params, strict=True))
    row = recipe.train_step()
    assert "scaler_skipped" not in row
    assert not all(torch.equal(a, p) for a, p in zip(before, recipe.dist.params, strict=True))


def test_a_collapsed_loss_scale_stops_the_run_naming_fp16(fp16_on_cpu, tiny_model_dir, data, tmp_path):
    recipe = _recipe(tiny_model_dir, data, tmp_path / "out", precision="fp16-mixed", max_steps=3)
    recipe.precision.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)    # as after 16 back-offs from 65536
    _overflow_at(recipe, {1})
    recipe.loop_start, recipe.metrics = 0.0, _NoMetrics()
    with pytest.raises(NonFiniteLossError) as e:
        recipe.train_step()
    assert "overflow fp16 at every loss scale" in str(e.value) and "precision: bf16-mixed" in str(e.value)


def test_a_non_finite_loss_under_fp16_is_the_nan_guards_and_the_next_step_trains(fp16_on_cpu, tiny_model_dir,
                                                                                 data, tmp_path):
    recipe = _settled(_recipe(tiny_model_dir, data, tmp_path / "out", precision="fp16-mixed", max_steps=3,
                              on_nonfinite="skip"))
    loss = recipe.objective.loss

    def nan_once(model, batch, config):
        out = loss(model, batch, config)
        if recipe.state.step == 0:
            out.loss_sum = out.loss_sum * float("nan")
        return out

    recipe.objective.loss = nan_once
    recipe.loop_start, recipe.metrics = 0.0, _NoMetrics()
    assert recipe.train_step()["skipped"] is True
    row = recipe.train_step()                           # the scaler was reset: no "unscale_() already called"
    assert row["loss"] is not None and "skipped" not in row and recipe.state.skipped_steps == 1


# ----------------------------------------------------------------------------------------------- resume


class Killed(Exception):
    pass


@pytest.mark.parametrize("mode,method", [("bf16-mixed", "full"), ("fp16-mixed", "lora"), ("bf16-true", "full")])
def test_resume_carries_the_scaler_and_the_master_weights(mode, method, fp16_on_cpu, tiny_model_dir, data, tmp_path,
                                                          monkeypatch):
    """Stopped after step 2 and resumed: every row and the final weights are bitwise those of the run never
    stopped; under fp16-mixed the overflow at step 1 halved the scale, which the resumed run must carry on."""
    sections = {} if method == "full" else {"lora": {"r": 4, "dropout": 0.0}}
    extra = {"dtype": "bf16"} if mode == "bf16-true" else {}

    def run(out, stop_after=None, resume=False):
        recipe = TrainingRecipe(_config(tiny_model_dir, data, out, method, sections, precision=mode, max_steps=4,
                                        save_every=1, eval_every=2, **extra), resume=resume)
        recipe.setup()
        if mode == "fp16-mixed":
            if not resume:              # a resumed run has the saved scaler's state (which it must carry on)
                _settled(recipe)
            _overflow_at(recipe, {1})
        inner = recipe.train_step

        def step():
            if stop_after is not None and recipe.state.step == stop_after:     # step 2's row and checkpoint written
                raise Killed
            return inner()

        recipe.train_step = step
        try:
            recipe.fit()
        except Killed:
            return None
        return recipe.finish()

    run(tmp_path / "a")
    run(tmp_path / "b", stop_after=2)
    run(tmp_path / "b", resume=True)
    rows = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    keys = ("step", "loss", "eval_loss", "grad_norm", "loss_scale", "scaler_skipped")
    assert [[r.get(k) for k in keys] for r in rows[0]] == [[r.get(k) for k in keys] for r in rows[1]]
    name = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    wa, wb = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    record = json.loads((tmp_path / "b" / "run.json").read_text())
    assert record["precision"]["mode"] == mode
    if mode == "fp16-mixed":
        assert rows[1][0]["scaler_skipped"] is True and record["scaler_skipped_steps"] == 1


def test_the_log_and_run_json_say_which_precision(tiny_model_dir, data, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="tuneforge.training.trainer"):
        train(_config(tiny_model_dir, data, tmp_path / "out", precision="bf16-mixed", max_steps=1))
    assert any("precision bf16-mixed (autocast to bf16; trained parameters and optimizer states fp32; frozen base "
               "weights bf16" in r.message for r in caplog.records)
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["precision"] == {"mode": "bf16-mixed", "base_dtype": "bf16", "trained_dtype": "fp32",
                                   "autocast_dtype": "bf16", "loss_scaling": False, "compensated_updates": False,
                                   "reason": "as configured"}
    assert record["dtype"] == "bfloat16"


# ------------------------------------------------------------------------------- kernels under autocast


def test_packed_attention_and_the_losses_agree_under_autocast(tiny_model, tokenizer):
    """Under bf16 autocast: a packed row's logits are each example's alone (packed per-example SDPA against plain
    SDPA on the example), the packed loss is the sum of the examples' losses, chunked and plain losses agree, and
    every loss is an fp32 sum."""
    from test_packing import _examples, _unpacked_loss
    from tuneforge.data.packing import pack
    from tuneforge.kernels.packed_attention import NAME, set_attention
    from tuneforge.methods.loss import packed_loss_sum

    exs = _examples(tokenizer)
    batch = pack(exs)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        set_attention(tiny_model, NAME)
        packed = tiny_model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits[0]
        set_attention(tiny_model, "sdpa")
        offset, worst = 0, 0.0
        for e in exs:
            alone = tiny_model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0]
            worst = max(worst, ((packed[offset:offset + len(e)] - alone).abs().max() / alone.abs().max()).item())
            offset += len(e)
        unpacked = sum(_unpacked_loss(tiny_model, e)[0].float().item() for e in exs)
    assert packed.dtype == torch.bfloat16 and worst < 2e-2, worst
    set_attention(tiny_model, NAME)
    results = []
    for chunked in ("off", "on"):
        tiny_model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = packed_loss_sum(tiny_model, batch, chunked=chunked)
        assert loss.dtype == torch.float32
        loss.backward()
        results.append((loss.item(), torch.cat([p.grad.flatten() for p in tiny_model.parameters()])))
    (plain, g_plain), (chunk, g_chunk) = results
    assert abs(plain - unpacked) < 1e-2 * unpacked
    assert abs(chunk - plain) < 1e-3 * plain
    assert torch.nn.functional.cosine_similarity(g_plain, g_chunk, dim=0).item() > 0.999
