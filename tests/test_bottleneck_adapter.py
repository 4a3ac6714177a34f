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
    assert torch.count_nonzero(layer.adapter_up['default'].weight) == 0 and torch.count_nonzero(layer.adapter_up['default'].bias) == 0
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
