"""Our bottleneck adapter: its math, zero-init, file format and refusal to merge."""

from __future__ import annotations

import pytest
import torch

from tuneforge.methods.bottleneck_adapter import (
    BottleneckAdapterConfig,
    BottleneckAdapterLayer,
    BottleneckAdapterModel,
    NotMergeableError,
)


def test_layer_computes_the_stated_formula():
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 8)
    layer = BottleneckAdapterLayer(base, hidden_size=8, bottleneck=3, nonlinearity="tanh", scaling=0.5)
    assert torch.count_nonzero(layer.adapter_up['default'].weight) == 0
    assert torch.count_nonzero(layer.adapter_up['default'].bias) == 0
    torch.nn.init.normal_(layer.adapter_up['default'].weight)
    x = torch.randn(2, 5, 8)
    y = base(x)
    expected = y + 0.5 * (torch.tanh(y @ layer.adapter_down['default'].weight.T + layer.adapter_down['default'].bias)
                          @ layer.adapter_up['default'].weight.T + layer.adapter_up['default'].bias)
    torch.testing.assert_close(layer(x), expected)


def test_tuple_outputs_adapt_only_the_hidden_states():
    class Attn(torch.nn.Module):
        def forward(self, x):
            return x, "weights"

    layer = BottleneckAdapterLayer(Attn(), hidden_size=4, bottleneck=2)
    torch.nn.init.ones_(layer.adapter_up['default'].weight)
    x = torch.randn(1, 3, 4)
    out, extra = layer(x)
    assert extra == "weights" and not torch.equal(out, x)


def test_wraps_every_decoder_layer_and_disables_exactly(tiny_model):
    ids = torch.randint(0, 49152, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = tiny_model(input_ids=ids).logits
    model = BottleneckAdapterModel(tiny_model, BottleneckAdapterConfig(bottleneck=4, placement=["mlp"]))
    layers = list(model.adapter_layers())
    assert len(layers) == tiny_model.config.num_hidden_layers
    assert all(isinstance(layer.mlp, BottleneckAdapterLayer) and not isinstance(layer.self_attn, BottleneckAdapterLayer)
               for layer in tiny_model.model.layers)
    for layer in layers:
        torch.nn.init.normal_(layer.adapter_up['default'].weight)
    with torch.no_grad():
        assert (model(input_ids=ids).logits - base).abs().max() > 1e-3
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, base, rtol=0, atol=0)


def test_merge_is_refused_with_a_pointer_to_serving(tiny_model):
    model = BottleneckAdapterModel(tiny_model, BottleneckAdapterConfig(bottleneck=4))
    with pytest.raises(NotMergeableError, match="nonlinearity.*Serve the base model"):
        model.merge_and_unload()


def test_peft_files_are_not_mistaken_for_ours(tmp_path, tiny_model):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(ValueError, match="not a tuneforge bottleneck adapter"):
        BottleneckAdapterModel.from_pretrained(tiny_model, tmp_path)


def test_bad_config_values_name_the_key():
    with pytest.raises(ValueError, match="adapter.placement"):
        BottleneckAdapterConfig(placement=["ffn"])
    with pytest.raises(ValueError, match="adapter.nonlinearity"):
        BottleneckAdapterConfig(nonlinearity="swish")


def _perturb(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.adapter_layers():
            if name in layer.adapter_up:
                layer.adapter_up[name].weight.add_(0.5 * torch.randn(layer.adapter_up[name].weight.shape, generator=g))


def test_named_adapters_load_switch_disable_and_delete(tmp_path, tiny_model_dir):
    """Two adapters trained apart, loaded into one base: each computes what it computed alone, the base is
    exact when disabled, and the saved files do not depend on the name an adapter had in memory."""
    from transformers import AutoModelForCausalLM

    def fresh():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()

    ids = torch.randint(0, 49152, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = fresh()(input_ids=ids).logits
    expected = {}
    for name, cfg, seed in (("a", BottleneckAdapterConfig(bottleneck=4), 1),
                            ("b", BottleneckAdapterConfig(bottleneck=8, placement=["mlp"], nonlinearity="relu"), 2)):
        model = BottleneckAdapterModel(fresh(), cfg)
        _perturb(model, "default", seed)
        model.save_pretrained(tmp_path / name)
        with torch.no_grad():
            expected[name] = model(input_ids=ids).logits

    both = BottleneckAdapterModel.from_pretrained(fresh(), tmp_path / "a", adapter_name="a")
    both.load_adapter(tmp_path / "b", adapter_name="b")
    assert both.active_adapter == "a" and set(both.configs) == {"a", "b"}
    with torch.no_grad():
        torch.testing.assert_close(both(input_ids=ids).logits, expected["a"], rtol=0, atol=1e-6)
        both.set_adapter("b")
        torch.testing.assert_close(both(input_ids=ids).logits, expected["b"], rtol=0, atol=1e-6)
        with both.disable_adapter():
            torch.testing.assert_close(both(input_ids=ids).logits, base, rtol=0, atol=0)
    assert (expected["a"] - expected["b"]).abs().max() > 1e-3
    both.save_pretrained(tmp_path / "b_again")      # the active adapter, saved under the name-free keys
    from safetensors.torch import load_file

    again, original = load_file(tmp_path / "b_again" / "adapter_model.safetensors"), load_file(
        tmp_path / "b" / "adapter_model.safetensors")
    assert again.keys() == original.keys() and all(torch.equal(again[k], original[k]) for k in again)
    # loaded the other way round: the attention layers that adapter a brings must not apply it while b is active
    other = BottleneckAdapterModel.from_pretrained(fresh(), tmp_path / "b", adapter_name="b")
    other.load_adapter(tmp_path / "a", adapter_name="a")
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids=ids).logits, expected["b"], rtol=0, atol=1e-6)
    both.delete_adapter("a")
    assert set(both.configs) == {"b"} and all("a" not in layer.adapter_down for layer in both.adapter_layers())
    with pytest.raises(KeyError, match="no adapter named 'a'"):
        both.set_adapter("a")
