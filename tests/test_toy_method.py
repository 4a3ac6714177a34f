"""A new method is one folder: everything tuneforge does with a method it asks the method's record. The toy
method below (a trainable per-layer rescaling of each MLP's output, written here, in the test) is registered
from the test and, with no file of tuneforge edited:

- trains through ``tuneforge train`` and saves its own files;
- is served by the real engine in a mixed batch beside LoRA and the base model, each row equal to the same
  request served alone, and its rows equal to its own model (``load_trained``);
- is estimated by ``tuneforge estimate`` from its memory terms;
- is refused in one line by the engines it does not declare (FSDP2, DeepSpeed, DDP; and by
  ``plan --accelerate-config``).
"""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from _serve_helpers import save_adapter, tiny_base
from conftest import write_jsonl
from tuneforge.cli import main
from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.estimate import estimate_memory, resolve_shape
from tuneforge.estimate.distributed_plan import plan_distributed
from tuneforge.methods import Method, register_method, unregister_method
from tuneforge.methods.memory import MemoryInputs, MemoryTerms
from tuneforge.methods.serving_hooks import LoadedAdapter, MethodServing, hook_rows
from tuneforge.serving.adapters import AdapterRegistry, AdapterSet
from tuneforge.serving.engine import Engine, Request
from tuneforge.training.strategies import DDP, FSDP2, DeepSpeed, SingleProcess

# ------------------------------------------------------------------------------------ the toy method's folder

TOY_TYPE = "test.mlp_scale"


class MlpScaleModel(nn.Module):
    """The base model (frozen) with one trainable vector per decoder layer multiplying its MLP's output."""

    def __init__(self, base: nn.Module, scales: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.base_model = base
        for p in base.parameters():
            p.requires_grad_(False)
        layers = base.model.layers
        self.scales = nn.ParameterList(
            nn.Parameter(scales[f"model.layers.{i}.mlp.scale"].float().clone() if scales else
                         torch.ones(base.config.hidden_size)) for i in range(len(layers)))
        self.enabled = True
        for i, layer in enumerate(layers):
            layer.mlp.register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def rescale(module, args, out):
            return out * self.scales[i].to(out.dtype) if self.enabled else out
        return rescale

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.generate(*args, **kwargs)

    def save_pretrained(self, folder: str, **kwargs: Any) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        save_file({f"model.layers.{i}.mlp.scale": s.detach().float().contiguous().cpu()
                   for i, s in enumerate(self.scales)}, str(Path(folder) / "adapter_model.safetensors"))
        (Path(folder) / "adapter_config.json").write_text(json.dumps({"adapter_type": TOY_TYPE}))

    @contextlib.contextmanager
    def disable_adapter(self):
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_model"), name)


def _apply(model, config, tokenizer=None):
    return MlpScaleModel(model)


def _load_trained(base, folder, is_trainable=False):
    return MlpScaleModel(base, load_file(str(Path(folder) / "adapter_model.safetensors")))


class MlpScaleServing(MethodServing):
    """Serving: the same rescaling, on the rows of each adapter only."""

    def load(self, adapter: LoadedAdapter) -> None:
        for key, s in adapter.read_weights(self.host.device).items():
            module = self.host.base.get_submodule(key.removesuffix(".scale"))
            scale = s.to(self.host.dtype)
            hook_rows(adapter, self.host.context, module, lambda y, scale=scale: y * scale)


EXTRA_PER_TOKEN = 4     # bytes per token per layer beyond a frozen block: the scaled MLP output, saved in fp32


def _memory(inputs: MemoryInputs) -> MemoryTerms:
    d, layers, w = inputs.shape.hidden_size, inputs.shape.num_layers, inputs.dtype_bytes
    return MemoryTerms(trainable_params=d * layers, weights=inputs.shape.num_parameters() * w + 4 * d * layers,
                       param_bytes=4, largest_trainable=d, act_bytes=w,
                       per_token_layer=inputs.block(w).frozen + EXTRA_PER_TOKEN * d,
                       notes=("mlp_scale: one fp32 vector per layer trains",))


TOY = Method(name="mlp_scale", summary="a trainable rescaling of each MLP's output (a test's toy)", settings={},
             apply=_apply, load_trained=_load_trained, saved_types=(TOY_TYPE,), disable=lambda m: m.disable_adapter(),
             serving=MlpScaleServing, memory=_memory, engines=frozenset({"single"}))

# ------------------------------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def toy():
    register_method(TOY)
    yield
    unregister_method("mlp_scale")


@pytest.fixture(scope="module")
def trained(toy, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toy")
    data = write_jsonl(tmp / "train.jsonl",
                       [{"prompt": f"Ticket {i}", "completion": ["billing", "login"][i % 2]} for i in range(8)])
    config_file = tmp / "toy.yaml"
    config_file.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "method": "mlp_scale", "data": {"train": str(data), "val_fraction": 0.0},
        "output_dir": str(tmp / "run"), "batch_size": 4, "learning_rate": 0.05, "progress": False,
        "warmup_ratio": 0.0}))
    assert main(["train", str(config_file), "--set", "max_steps=3"]) == 0
    return tmp / "run"


def test_it_trains_through_the_cli_and_saves_its_own_files(trained):
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["grad_norm"] > 0 for r in rows)
    scales = load_file(str(trained / "adapter_model.safetensors"))
    assert len(scales) == 2 and all((s - 1).abs().max() > 1e-3 for s in scales.values())   # every vector moved
    assert json.loads((trained / "adapter_config.json").read_text()) == {"adapter_type": TOY_TYPE}


def test_it_is_served_in_a_mixed_batch_as_alone(trained, tmp_path, tokenizer):
    folders = {"toy": trained, "lora": tmp_path / "lora"}
    save_adapter(folders["lora"], "lora", {"lora": {"r": 4, "dropout": 0.0}}, seed=11)
    prompts = [[1, 504, 2520, 30, 1004, 28], [1, 18, 19]]

    def engine():
        registry = AdapterRegistry(AdapterSet(tiny_base()))
        for name, folder in folders.items():
            registry.register(name, folder)
        return Engine(registry, tokenizer, max_batch=16)

    def request(name, prompt):
        return Request(list(prompt), adapter=name, max_tokens=4, ignore_eos=True, keep_logits=True)

    jobs = [(name, p) for name in (None, "toy", "lora") for p in prompts]
    mixed = [request(name, p) for name, p in jobs]
    served = engine()
    finished = [threading.Event() for _ in mixed]
    errors: list[tuple] = []
    for req, done in zip(mixed, finished, strict=True):
        req.sink = lambda ev, done=done: ((ev[0] == "error" and errors.append(ev)),
                                          ev[0] in ("done", "error") and done.set())
        served.submit(req)                               # all queued before the engine starts: one batch
    served.start()
    assert all(done.wait(60) for done in finished)
    served.stop()
    assert served.max_rows_seen == len(jobs) and errors == [], errors
    alone = engine().start()
    for (name, prompt), req in zip(jobs, mixed, strict=True):
        ref = request(name, prompt)
        alone.generate(ref)
        assert all(torch.allclose(g, w, atol=1e-9, rtol=0) for g, w in zip(req.logits, ref.logits, strict=True))
    alone.stop()
    for prompt, req in zip(prompts, mixed[len(prompts):2 * len(prompts)], strict=True):   # the toy's rows
        with torch.no_grad():
            own = _load_trained(tiny_base(), trained)(input_ids=torch.tensor([prompt])).logits[0, -1]
            base = tiny_base()(input_ids=torch.tensor([prompt])).logits[0, -1]
        assert torch.allclose(req.logits[0], own, atol=1e-9, rtol=0) and (own - base).abs().max() > 1e-4


def test_it_is_estimated_from_its_memory_terms(toy, capsys):
    shape = resolve_shape("smollm2-135m")
    est = estimate_memory(shape, "mlp_scale", 256, 2, dtype="fp32", device="cpu")
    assert est.trainable_params == shape.hidden_size * shape.num_layers
    assert est.optimizer_states == 8 * shape.hidden_size * shape.num_layers
    assert "mlp_scale: one fp32 vector per layer trains" in est.assumptions
    assert main(["estimate", "--model", "smollm2-135m", "--method", "mlp_scale", "--seq", "128"]) == 0
    assert "method=mlp_scale" in capsys.readouterr().out


@pytest.mark.parametrize("strategy, engine", [(FSDP2(None, 0, 2), "FSDP2"), (DeepSpeed(None, 0, 2, 2), "DeepSpeed"),
                                              (DDP(None, 0, 2), "DDP")], ids=["fsdp2", "zero2", "ddp"])
def test_engines_it_does_not_declare_refuse_it_in_one_line(toy, strategy, engine):
    config = load_config(data={"model": "smollm2-135m", "method": "mlp_scale", "data": {"train": "x"}},
                         check_files=False)
    with pytest.raises(ConfigError) as refused:
        strategy.check(config)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"method mlp_scale with {engine}"), message
    assert message.endswith("train it on one process"), message
    SingleProcess().check(config)
    plan = plan_distributed(config, {"distributed_type": {"FSDP2": "FSDP", "DeepSpeed": "DEEPSPEED",
                                                          "DDP": "MULTI_GPU"}[engine], "num_processes": 2})
    assert not plan.supported and plan.refusal == message
