"""25.8: short-context models, oversized groups and settings that used to be accepted silently."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_superweight import SuperWeightConfig, SuperWeightLinear
from optimum_superweight.detection.inputs import context_length
from optimum_superweight.evaluation import perplexity
from optimum_superweight.models.calibration import collect_input_energy, fitting_window
from optimum_superweight.testing import build_tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def short_gpt2_dir(tmp_path):
    model = build_tiny_model("gpt2", super_weights=[(1, 5, 7)], n_positions=128)
    path = tmp_path / "gpt2-128"
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_default_quantization_of_a_128_position_model_detects_and_calibrates(short_gpt2_dir, tmp_path):
    # Before: IndexError (index out of range in self) from GPT-2's position table on 512-token windows.
    model = AutoModelForCausalLM.from_pretrained(short_gpt2_dir, quantization_config=SuperWeightConfig())
    records = model.config.quantization_config.get_super_weights()
    assert [(r.module, r.row, r.col) for r in records] == [("transformer.h.1.mlp.c_proj", 5, 7)]
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.isfinite(again(torch.arange(4, 104).reshape(1, -1)).logits).all()


def test_windows_fit_the_positions():
    model = build_tiny_model("gpt2", super_weights=None, n_positions=128)
    assert context_length(model) == 128
    assert fitting_window(model, 512, bos_id=1) == 127 and fitting_window(model, 512) == 128
    assert fitting_window(build_tiny_model("llama", super_weights=None), 512) == 512
    ids = list(range(4, 260)) * 4
    energy = collect_input_energy(model, ["transformer.h.0.mlp.c_proj"], ids, window=512, bos_id=1)
    assert torch.isfinite(energy["transformer.h.0.mlp.c_proj"]).all()
    result = perplexity(model, tiny_tokenizer(), token_ids=ids, window=512)
    assert result.window + 1 <= 128 and result.text_tokens == len(ids)


def test_group_wider_than_every_row_is_one_group_per_row(tiny_llama_dir, tmp_path):
    # Before: every 64-wide row was padded to 100000 codes (a 3.2 MB packed weight for a 64x64 matrix).
    config = SuperWeightConfig(bits=4, group_size=100000, super_weights=[{"module": "model.layers.1.mlp.down_proj", "row": 5, "col": 7}])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config)
    assert config.group_size == 100000  # the caller's request is left as it was
    assert model.config.quantization_config.group_size == -1
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, SuperWeightLinear) and layer.weight.numel() == 64 * 64 // 2
    model.save_pretrained(tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["group_size"] == -1
    AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_a_direct_quantize_model_call_clamps_the_group_too():
    # Before: only from_pretrained (and the CLI through it) clamped; quantize_model padded each 64-wide row to 100000.
    from optimum_superweight.models.replace import quantize_model

    model = build_tiny_model("llama", super_weights=[(1, 5, 7)])
    config = SuperWeightConfig(bits=4, group_size=100000, super_weights=[{"module": "model.layers.1.mlp.down_proj", "row": 5, "col": 7}])
    quantize_model(model, config)
    assert config.group_size == 100000 and model.config.quantization_config.group_size == -1
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.group_size == -1 and layer.weight.numel() == 64 * 64 // 2


def test_detection_layers_beyond_the_model_are_refused_with_the_layer_count(tiny_llama_dir):
    config = SuperWeightConfig(detection_layers=[7])
    with pytest.raises(ValueError, match=r"detection_layers=\[7\].*0 to 3.*4 decoder layers"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"detection_layers": [10**9]}, r"detection_layers=\[1000000000\] is invalid: accepted values are a list of layer"),
        ({"symmetric": None}, r"symmetric=None is invalid: accepted values are True or False"),
        ({"method": None}, r"method=None is invalid: accepted values are 'hqq', 'rtn', 'gptq'"),
        ({"zero_point": None}, r"zero_point=None is invalid"),
    ],
)
def test_config_json_values_that_used_to_pass_silently_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        SuperWeightConfig.from_dict({"quant_method": "superweight", "bits": 4, **fields})


def test_keyword_none_still_means_the_documented_default():
    config = SuperWeightConfig(symmetric=None, method=None)
    assert (config.method, config.symmetric, config.zero_point) == ("hqq", False, "float")
    with pytest.raises(ValueError, match="detection_layers"):
        SuperWeightConfig(detection_layers=[10**9])
