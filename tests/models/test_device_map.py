"""``device_map="auto"``: transformers resolves the map after our first ``validate_environment`` call, then calls it
again with the resolved dict (transformers 5.x ``integrations.accelerate._get_device_map``). An offloading map must
be refused on that second call, and a map that fits must load a working model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_superweight import SuperWeightConfig
from optimum_superweight.testing import build_tiny_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("device-map") / "tiny"
    build_tiny_model("llama", super_weights=[(1, 5, 7)]).save_pretrained(path)
    return path


@pytest.mark.parametrize("max_memory", [{"cpu": "200KB"}, {"cpu": "200KB", "disk": "1GB"}])
def test_auto_map_that_offloads_is_refused_with_the_fix(folder, tmp_path, max_memory):
    with pytest.raises(ValueError, match=r"offloads modules to disk.*device_map='cpu'"):
        AutoModelForCausalLM.from_pretrained(folder, quantization_config=SuperWeightConfig(bits=4, group_size=32),
                                             device_map="auto", max_memory=max_memory, offload_folder=str(tmp_path))


def test_auto_map_that_fits_loads_a_working_model(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=SuperWeightConfig(bits=4, group_size=32),
                                                 device_map="auto")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    layer = model.model.layers[1].mlp.down_proj
    assert float(layer.dequantize_weight(torch.float32)[5, 7]) == float(layer.super_weight_values[0])
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
