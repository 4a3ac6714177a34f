"""A method is served through its record alone: a toy method registered here, from the test, with serving hooks
(``Method.serving``) is served by the real engine in a mixed batch beside LoRA and the base model, each row
computing what it computes alone; a method whose record has no serving hooks is refused with one line naming it."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from _serve_helpers import save_adapter, tiny_base
from tuneforge.methods import Method, register_method, unregister_method
from tuneforge.methods.serving_hooks import LoadedAdapter, MethodServing, hook_rows
from tuneforge.serving.adapters import AdapterLoadError, AdapterRegistry, AdapterSet
from tuneforge.serving.engine import Engine, Request

TOY_TYPE = "test.row_scale"
PROMPTS = [[1, 504, 2520, 30, 1004, 28], [1, 18, 19]]
STEPS = 4


def _scales(folder) -> dict[str, torch.Tensor]:
    """The toy's weights: ``{"<path of an mlp>.scale": s [hidden]}``; the mlp's output ``y`` becomes ``s * y``."""
    return load_file(str(folder / "adapter_model.safetensors"))


def _own_model(base, folder, is_trainable=False):
    """The toy method's own model (its ``load_trained``): every row rescaled."""
    for key, s in _scales(folder).items():
        base.get_submodule(key.removesuffix(".scale")).register_forward_hook(
            lambda module, args, out, s=s: out * s.to(out.dtype))
    return base


class RowScaleServing(MethodServing):
    """The toy's serving hook: the same rescaling, on the rows of each adapter only."""

    def load(self, adapter: LoadedAdapter) -> None:
        for key, s in adapter.read_weights(self.host.device).items():
            module = self.host.base.get_submodule(key.removesuffix(".scale"))
            scale = s.to(self.host.dtype)
            hook_rows(adapter, self.host.context, module, lambda y, scale=scale: y * scale)


def _not_trained_here(model, config, tokenizer=None):
    raise NotImplementedError("the toy methods are only served in this test")


@pytest.fixture()
def toy_methods():
    register_method(Method(name="row_scale", summary="a per-layer rescaling of the MLP output (a test's toy)",
                           settings={}, apply=_not_trained_here, load_trained=_own_model, saved_types=(TOY_TYPE,),
                           serving=RowScaleServing))
    register_method(Method(name="unservable", summary="a test's toy without serving hooks", settings={},
                           apply=_not_trained_here, load_trained=_own_model, saved_types=("test.unservable",)))
    yield
    unregister_method("row_scale")
    unregister_method("unservable")


def _save_toy(folder, adapter_type: str = TOY_TYPE, seed: int = 5) -> None:
    base = tiny_base()
    torch.manual_seed(seed)
    hidden, layers = base.config.hidden_size, base.config.num_hidden_layers
    folder.mkdir()
    save_file({f"model.layers.{i}.mlp.scale": 1 + 0.5 * torch.randn(hidden) for i in range(layers)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"adapter_type": adapter_type}))


def _engine(folders: dict, tokenizer) -> Engine:
    registry = AdapterRegistry(AdapterSet(tiny_base()))
    for name, folder in folders.items():
        registry.register(name, folder)
    return Engine(registry, tokenizer, max_batch=16)


def _tokens(req: Request) -> list[int]:
    return [int(step.argmax()) for step in req.logits]


def test_a_registered_method_is_served_in_a_mixed_batch_as_alone(toy_methods, tmp_path, tokenizer):
    folders = {"toy": tmp_path / "toy", "lora": tmp_path / "lora"}
    _save_toy(folders["toy"])
    save_adapter(folders["lora"], "lora", {"lora": {"r": 4, "dropout": 0.0}}, seed=11)

    def request(name, prompt):
        return Request(list(prompt), adapter=name, max_tokens=STEPS, ignore_eos=True, keep_logits=True)

    jobs = [(name, p) for name in (None, "toy", "lora") for p in PROMPTS]
    mixed = [request(name, p) for name, p in jobs]
    engine = _engine(folders, tokenizer)
    finished = [threading.Event() for _ in mixed]
    events: list[tuple] = []
    for req, done in zip(mixed, finished, strict=True):
        req.sink = lambda ev, done=done: (events.append(ev), ev[0] in ("done", "error") and done.set())
        engine.submit(req)                      # all queued before the engine starts: one batch
    engine.start()
    assert all(done.wait(60) for done in finished)
    engine.stop()
    assert engine.max_rows_seen == len(jobs), "the rows never shared a batch"
    assert not [ev for ev in events if ev[0] == "error"], events

    alone = _engine(folders, tokenizer).start()
    for (name, prompt), req in zip(jobs, mixed, strict=True):
        ref = request(name, prompt)
        alone.generate(ref)
        assert _tokens(req) == _tokens(ref), (name, prompt)
        assert all(torch.allclose(g, w, atol=1e-9, rtol=0) for g, w in zip(req.logits, ref.logits, strict=True))
    alone.stop()

    # the toy rows computed the toy method (its own model), and it really changes the model
    for prompt, req in zip(PROMPTS, mixed[len(PROMPTS):2 * len(PROMPTS)], strict=True):
        with torch.no_grad():
            own = _own_model(tiny_base(), folders["toy"])(input_ids=torch.tensor([prompt])).logits[0, -1]
            base = tiny_base()(input_ids=torch.tensor([prompt])).logits[0, -1]
        assert torch.allclose(req.logits[0], own, atol=1e-9, rtol=0)
        assert (own - base).abs().max() > 1e-3
    # unloading the toy takes its hooks off: the base rows are the base model again
    aset = AdapterSet(tiny_base())
    before = aset.forward([None], input_ids=torch.tensor([PROMPTS[0]])).logits
    aset.load("toy", folders["toy"])
    aset.unload("toy")
    assert torch.equal(aset.forward([None], input_ids=torch.tensor([PROMPTS[0]])).logits, before)


def test_a_method_without_serving_hooks_is_refused_naming_it(toy_methods, tmp_path):
    folder = tmp_path / "unservable"
    _save_toy(folder, adapter_type="test.unservable")
    registry = AdapterRegistry(AdapterSet(tiny_base()))
    for attempt in (lambda: registry.register("u", folder), lambda: registry.set.load("u", folder)):
        with pytest.raises(AdapterLoadError) as e:
            attempt()
        assert "method 'unservable' cannot be served" in str(e.value) and "\n" not in str(e.value)
    assert registry.names() == [] and registry.set.adapters == {}
