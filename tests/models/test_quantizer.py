"""End to end through transformers on a tiny Llama with a planted super weight."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import optimum_superweight
from optimum_superweight import SuperWeightConfig, SuperWeightLinear

MODULE, ROW, COL = "model.layers.1.mlp.down_proj", 5, 7
INPUT = torch.arange(2, 34).reshape(2, 16)


def _config(**kwargs):
    kwargs.setdefault("super_weights", [{"module": MODULE, "row": ROW, "col": COL}])
    kwargs.setdefault("bits", 4)
    kwargs.setdefault("group_size", 48)
    return SuperWeightConfig(**kwargs)


@pytest.fixture()
def quantized(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=_config())


def _logits(model):
    with torch.no_grad():
        return model(INPUT).logits


def test_registration_is_idempotent():
    import importlib

    optimum_superweight.register()
    importlib.reload(importlib.import_module("optimum_superweight"))
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZER_MAPPING["superweight"].__name__ == "SuperWeightQuantizer"


def test_quantize_on_load_keeps_super_weight_exact(tiny_llama, quantized):
    layer = quantized.get_submodule(MODULE)
    assert isinstance(layer, SuperWeightLinear)
    exact = tiny_llama.get_submodule(MODULE).weight[ROW, COL].item()
    assert layer.dequantize_weight(torch.float32)[ROW, COL].item() == exact
    recorded = quantized.config.quantization_config.super_weights
    assert recorded[0]["module"] == MODULE and recorded[0]["value"] == exact
    assert not isinstance(quantized.lm_head, SuperWeightLinear)
    assert isinstance(quantized.model.layers[0].self_attn.q_proj, SuperWeightLinear)
    # quantization error is small relative to the logits, and the super activation survives
    ref, out = _logits(tiny_llama), _logits(quantized)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_save_reload_resave_gives_identical_logits(quantized, tmp_path):
    expected = _logits(quantized)
    quantized.save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "superweight"
    assert config["quantization_config"]["super_weights"][0]["row"] == ROW
    tensors = load_file(tmp_path / "a" / "model.safetensors")
    assert tensors[f"{MODULE}.weight"].dtype == torch.uint8 and tensors[f"{MODULE}.weight"].dim() == 3
    assert tensors[f"{MODULE}.super_weight_indices"].tolist() == [[ROW, COL]]
    # The default layout: float16 scale and float offset per group of 48 (w = s*q + m), no zero-points.
    assert tensors[f"{MODULE}.weight_offset"].dtype == torch.float16
    assert tensors[f"{MODULE}.weight_offset"].shape == tensors[f"{MODULE}.weight_scale"].shape
    assert f"{MODULE}.weight_zero_point" not in tensors
    assert config["quantization_config"]["method"] == "hqq" and config["quantization_config"]["zero_point"] == "float"

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert torch.equal(_logits(again), expected)
    again.save_pretrained(tmp_path / "b")
    third = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert torch.equal(_logits(third), expected)


def test_sharded_checkpoint_round_trip(quantized, tmp_path):
    quantized.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(_logits(again), _logits(quantized))


@pytest.mark.parametrize(
    "bits, symmetric, group_size, method",
    [(8, True, -1, "hqq"), (3, False, 32, "hqq"), (2, True, 64, "hqq"), (4, False, 48, "rtn"), (8, False, -1, "hqq")],
)
def test_other_widths_round_trip(tiny_llama_dir, tmp_path, bits, symmetric, group_size, method):
    config = _config(bits=bits, symmetric=symmetric, group_size=group_size, method=method)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(_logits(again), _logits(model))


def test_bfloat16_load_and_forward(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=_config(), dtype=torch.bfloat16)
    logits = _logits(model)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert model.get_submodule(MODULE).super_weight_values.dtype == torch.float32
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert torch.equal(_logits(again), logits)


def test_dequantize_returns_plain_model_with_exact_super_weight(tiny_llama, quantized):
    exact = tiny_llama.get_submodule(MODULE).weight[ROW, COL].item()
    expected = _logits(quantized)
    plain = quantized.dequantize()
    layer = plain.get_submodule(MODULE)
    assert type(layer) is torch.nn.Linear and layer.weight[ROW, COL].item() == exact
    assert not hasattr(plain.config, "quantization_config")
    assert torch.allclose(_logits(plain), expected, atol=1e-5)


def test_coordinates_outside_matrix_name_module_and_bounds(tiny_llama_dir):
    config = _config(super_weights=[{"module": MODULE, "row": 64, "col": 7}])
    with pytest.raises(ValueError, match=rf"{MODULE}.weight\[64, 7\] lies outside.*row must be in \[0, 64\)"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config)


def test_unknown_module_is_named(tiny_llama_dir):
    config = _config(super_weights=[{"module": "model.layers.9.mlp.down_proj", "row": 1, "col": 1}])
    with pytest.raises(ValueError, match="'model.layers.9.mlp.down_proj' does not exist"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config)


def test_recorded_value_must_match_checkpoint(tiny_llama_dir):
    config = _config(super_weights=[{"module": MODULE, "row": ROW, "col": COL, "value": -1.0}])
    with pytest.raises(ValueError, match=r"recorded as -1.0 but the checkpoint holds"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config)


@pytest.mark.parametrize("device_map", [{"": "disk"}, {"model": "cpu", "lm_head": "disk"}])
def test_disk_offload_is_refused(tiny_llama_dir, device_map):
    with pytest.raises(ValueError, match="offloads modules to disk"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=_config(), device_map=device_map)


def test_device_map_cpu_works(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=_config(), device_map="cpu")
    assert isinstance(model.get_submodule(MODULE), SuperWeightLinear)


@pytest.mark.parametrize(
    "tamper, message",
    [
        ("drop_values", "super_weight_values is missing from the checkpoint"),
        ("drop_scale", "weight_scale is missing from the checkpoint"),
        ("move_index", r"stored at \(6, 7\) but config.json's field 'super_weights' says \(5, 7\)"),
        ("out_of_range", "outside the 64x128 matrix"),
        ("change_value", "holds 0.5 in the checkpoint but config.json's field 'super_weights' records"),
        ("reshape_indices", r"super_weight_indices is stored as I32 \[1, 3\].*requires int32 \[1, 2\]"),
        ("drop_offset", "weight_offset is missing from the checkpoint"),
        ("nan_offset", "weight_offset"),
    ],
)
def test_corrupt_checkpoint_fails_naming_the_module(quantized, tmp_path, tamper, message):
    quantized.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    key = f"{MODULE}.super_weight_indices"
    if tamper == "drop_values":
        del tensors[f"{MODULE}.super_weight_values"]
    elif tamper == "drop_scale":
        del tensors[f"{MODULE}.weight_scale"]
    elif tamper == "move_index":
        tensors[key] = torch.tensor([[ROW + 1, COL]], dtype=torch.int32)
    elif tamper == "out_of_range":
        tensors[key] = torch.tensor([[ROW, 10_000]], dtype=torch.int32)
    elif tamper == "change_value":
        tensors[f"{MODULE}.super_weight_values"] = torch.tensor([0.5])
    elif tamper == "reshape_indices":
        tensors[key] = torch.tensor([[ROW, COL, 0]], dtype=torch.int32)
    elif tamper == "drop_offset":
        del tensors[f"{MODULE}.weight_offset"]
    elif tamper == "nan_offset":
        tensors[f"{MODULE}.weight_offset"][0, 0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises((ValueError, RuntimeError), match=message) as info:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert MODULE in str(info.value)


def test_loading_without_the_package_fails_loudly(quantized, tmp_path):
    quantized.save_pretrained(tmp_path)
    code = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
        "assert 'optimum_superweight' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode != 0
    assert "mismatch" in result.stderr.lower(), result.stderr[-2000:]


@pytest.fixture(scope="module")
def two_planted_dirs(tmp_path_factory):
    """Two tiny Llamas whose super weights sit at different coordinates."""
    from optimum_superweight.testing import build_tiny_model

    dirs = {}
    for name, planted in (("p1", [(1, 5, 7)]), ("p2", [(2, 9, 30)])):
        dirs[name] = tmp_path_factory.mktemp(name)
        build_tiny_model("llama", super_weights=planted).save_pretrained(dirs[name])
    return dirs


def _found(model):
    return [(sw["module"], sw["row"], sw["col"]) for sw in model.config.quantization_config.super_weights]


@pytest.mark.parametrize(
    "loader, options",
    [
        ("LlamaForCausalLM", {}),
        ("AutoModelForCausalLM", {}),
        ("LlamaForCausalLM", {"low_memory": True, "method": "rtn"}),
        ("LlamaForCausalLM", {"bits": 8, "group_size": -1, "activation_bits": 8, "massive_activation_ratio": None}),
    ],
    ids=["in_memory", "in_memory_auto", "low_memory", "w8a8"],
)
def test_one_config_loads_two_models_each_with_its_own_super_weights(two_planted_dirs, tmp_path, loader, options):
    """The caller's config is a request, never the result record: loading p2 with the config that loaded p1
    detects p2's own super weights, and the config (and what it would serialise) is unchanged by both loads.
    (The Auto class deep-copies its keyword arguments; a model class's own from_pretrained does not.)"""
    import transformers

    cls = getattr(transformers, loader)
    cfg = SuperWeightConfig(**options)
    before = cfg.to_dict()
    a = cls.from_pretrained(two_planted_dirs["p1"], quantization_config=cfg)
    b = cls.from_pretrained(two_planted_dirs["p2"], quantization_config=cfg)
    assert _found(a) == [("model.layers.1.mlp.down_proj", 5, 7)]
    assert _found(b) == [("model.layers.2.mlp.down_proj", 9, 30)]
    assert a.config.quantization_config is not cfg and b.config.quantization_config is not cfg
    assert a.config.quantization_config.modules_to_not_convert == ["lm_head"]
    b.save_pretrained(tmp_path)
    assert cfg.to_dict() == before and cfg.super_weights == [] and cfg.digests is None
    written = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert [(sw["module"], sw["row"], sw["col"]) for sw in written["super_weights"]] == _found(b)
    if options.get("activation_bits"):
        assert written["super_activation_channels"] == [9] and cfg.activation_holdout is None
        assert a.config.quantization_config.super_activation_channels == [5]


def test_quantize_model_records_results_on_the_model_not_on_the_config():
    from optimum_superweight import quantize_model
    from optimum_superweight.testing import build_tiny_model

    config = SuperWeightConfig(bits=4, group_size=32)
    before = config.to_dict()
    first = quantize_model(build_tiny_model("llama", super_weights=[(1, 5, 7)]), config, [optimum_superweight.SuperWeight(MODULE, ROW, COL)])
    second = quantize_model(build_tiny_model("llama", super_weights=[(2, 9, 30)]), config)  # none given, none configured
    assert config.to_dict() == before
    assert _found(first) == [(MODULE, ROW, COL)] and first.config.quantization_config.super_weights[0]["value"] == 2.5
    assert _found(second) == [] and second.config.quantization_config.modules_to_not_convert == ["lm_head"]
