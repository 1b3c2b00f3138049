"""The architecture table: where each model's MLP output projection lives, and its storage layout."""

from __future__ import annotations

import pytest
import torch

from optimum_superweight.architectures import (
    ARCHITECTURES,
    architecture_spec,
    projection_sites,
    supported_model_types,
    weight_index,
)
from optimum_superweight.testing import TINY_MODEL_TYPES, build_tiny_model

REQUIRED = {
    "llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "phi3", "gemma", "gemma2", "gemma3_text",
    "gpt2", "gpt_neox", "falcon", "opt",
}


def test_table_covers_the_required_architectures():
    assert REQUIRED <= set(supported_model_types())
    for model_type, spec in ARCHITECTURES.items():
        assert spec.layout in ("linear", "conv1d"), model_type
        assert spec.mlp_kind in ("gated", "fused_gated", "plain"), model_type
        assert len(spec.mlp_inputs) == {"gated": 2, "fused_gated": 1, "plain": 1}[spec.mlp_kind], model_type
    assert architecture_spec("gpt2").layout == "conv1d"
    assert architecture_spec("phi3").mlp_kind == "fused_gated"
    assert architecture_spec("gemma2").post_mlp_norm == "post_feedforward_layernorm"


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_projection_sites_match_the_table(model_type):
    model = build_tiny_model(model_type, super_weights=None)
    spec = architecture_spec(model)
    sites = projection_sites(model)
    modules = dict(model.named_modules())
    assert [s.layer for s in sites] == [0, 1, 2, 3]
    for site in sites:
        assert site.name == f"{spec.layers}.{site.layer}.{spec.projection}"
        assert modules[site.name] is site.module
        assert site.layer_name == f"{spec.layers}.{site.layer}"
        assert site.transposed == (model_type == "gpt2")
        # Paper convention whatever the layout: rows = hidden size, columns = intermediate size.
        assert (site.out_features, site.in_features) == (64, 128)
        for name in spec.mlp_inputs:
            assert isinstance(modules[f"{site.layer_name}.{name}"].weight, torch.Tensor)
        if spec.post_mlp_norm:
            assert f"{site.layer_name}.{spec.post_mlp_norm}" in modules


def test_weight_index_swaps_for_conv1d():
    gpt2 = projection_sites(build_tiny_model("gpt2", super_weights=None))[0]
    llama = projection_sites(build_tiny_model("llama", super_weights=None))[0]
    assert weight_index(gpt2, 3, 100) == (100, 3)
    assert weight_index(llama, 3, 100) == (3, 100)
    assert tuple(gpt2.module.weight.shape) == (128, 64)


def test_unknown_architecture_lists_supported_types_and_the_explicit_option():
    model = build_tiny_model("llama", super_weights=None)
    model.config.model_type = "brand_new_lm"
    with pytest.raises(ValueError) as error:
        projection_sites(model)
    message = str(error.value)
    assert "brand_new_lm" in message and "projection='mlp.down_proj'" in message and "--projection" in message
    for model_type in REQUIRED:
        assert model_type in message
    # Naming the projection works for any model.
    assert len(projection_sites(model, "mlp.down_proj")) == 4


def test_projection_option_is_validated():
    model = build_tiny_model("opt", super_weights=None)
    assert [s.name for s in projection_sites(model, "fc2")][:1] == ["model.decoder.layers.0.fc2"]
    with pytest.raises(ValueError, match="projection='fc 2'"):
        projection_sites(model, "fc 2")
    with pytest.raises(ValueError, match="No module of OPTForCausalLM matches projection='mlp.down_proj'"):
        projection_sites(model, "mlp.down_proj")
    with pytest.raises(ValueError, match="several modules per layer"):
        projection_sites(_two_per_layer(), "proj")


def _two_per_layer():
    # A model where the same relative name appears in two containers with the same layer index.
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.ModuleList([Block()])
            self.decoder = torch.nn.ModuleList([Block()])

    return Model()
