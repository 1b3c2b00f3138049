"""Loading a compressed checkpoint: old formats, digests, completeness, refused inputs, dequantize after reload."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from optimum_superweight import SuperWeightConfig, SuperWeightLinear
from optimum_superweight.format import DIGESTS_METADATA_KEY, FORMAT_VERSION, read_safetensors_metadata

MODULE, ROW, COL = "model.layers.1.mlp.down_proj", 5, 7
INPUT = torch.arange(2, 34).reshape(2, 16)


def _config(**kwargs):
    kwargs.setdefault("super_weights", [{"module": MODULE, "row": ROW, "col": COL}])
    kwargs.setdefault("method", "rtn")  # integer zero-points when asymmetric: the tests swap them between layers
    return SuperWeightConfig(bits=4, group_size=48, **kwargs)


def _logits(model):
    with torch.no_grad():
        return model(INPUT).logits


@pytest.fixture()
def saved(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=_config(symmetric=False))
    model.save_pretrained(tmp_path / "q")
    return tmp_path / "q", _logits(model)


def test_save_records_a_digest_per_quantized_module(saved):
    folder, _ = saved
    quantization = json.loads((folder / "config.json").read_text())["quantization_config"]
    tensors = load_file(folder / "model.safetensors")
    quantized = {k.removesuffix(".weight_scale") for k in tensors if k.endswith(".weight_scale")}
    # Digests are additive: an RTN checkpoint still says layout 1 (2 only for float offsets / hqq).
    assert quantization["format_version"] == 1 and FORMAT_VERSION == 2
    assert set(quantization["digests"]) == quantized and len(quantized) == 28
    assert read_safetensors_metadata([folder / "model.safetensors"])[str(folder / "model.safetensors")][
        DIGESTS_METADATA_KEY] == "crc32"
    assert all(d.startswith("crc32:") for d in quantization["digests"].values())


def test_checkpoint_written_before_digests_reloads_identically(saved):
    """What optimum-superweight wrote before digests existed: the same tensors, no digests, no header metadata."""
    folder, expected = saved
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]["digests"]
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(folder / "model.safetensors")
    names = {k.rpartition(".")[2] for k in tensors if k.startswith(MODULE + ".")}
    assert names == {"weight", "weight_scale", "weight_zero_point", "super_weight_indices", "super_weight_values"}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})  # without our header metadata
    again = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(_logits(again), expected)
    # The other checks still apply to such a checkpoint.
    tensors[f"{MODULE}.weight_zero_point"] = tensors[f"{MODULE}.weight_zero_point"] | 0xF0
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{MODULE}\.weight_zero_point holds \d+ .*codes 0\.\.15"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_digests_removed_from_config_json_alone_are_refused(saved):
    folder, _ = saved
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]["digests"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model.safetensors was written with per-module digests.*'digests' is missing"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_swapped_layers_fail_naming_the_layer(saved):
    folder, _ = saved
    tensors = load_file(folder / "model.safetensors")
    a, b = "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"
    for name in ("weight", "weight_scale", "weight_zero_point"):
        tensors[f"{a}.{name}"], tensors[f"{b}.{name}"] = tensors[f"{b}.{name}"], tensors[f"{a}.{name}"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{a}\.weight does not match the content digest .*'digests'"):
        AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("key", ["lm_head.weight", "model.norm.weight", "model.embed_tokens.weight"])
def test_missing_full_precision_tensor_is_refused(saved, key):
    folder, _ = saved
    tensors = load_file(folder / "model.safetensors")
    del tensors[key]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{key} is missing from the checkpoint.*at random"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_pickled_weights_are_refused(saved):
    folder, _ = saved
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="pytorch_model.bin.*safetensors only"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_reloaded_model_bfloat16_keeps_checking_the_bias_digest_as_stored(tmp_path):
    from optimum_superweight.testing import build_tiny_model

    build_tiny_model("gpt2", super_weights=[(1, 5, 7)]).save_pretrained(tmp_path / "fp")
    config = SuperWeightConfig(bits=4, group_size=32, super_weights=[{"module": "transformer.h.1.mlp.c_proj", "row": 5, "col": 7}])
    AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=config).save_pretrained(tmp_path / "q")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.bfloat16)  # biases cast at load
    assert model.transformer.h[0].attn.c_attn.bias.dtype == torch.bfloat16


def test_dequantize_after_save_and_reload(saved, tiny_llama_dir, tmp_path):
    """transformers passes model.config.dtype, a string ("float32") once the config was saved or reloaded."""
    folder, expected = saved
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(reloaded.config.dtype, (str, torch.dtype))
    plain = reloaded.dequantize()
    assert type(plain.get_submodule(MODULE)) is torch.nn.Linear
    assert torch.allclose(_logits(plain), expected, atol=1e-5)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=_config())
    fresh.save_pretrained(tmp_path / "again")
    assert fresh.config.dtype == "float32"  # save_pretrained writes the name back into the live config
    assert fresh.dequantize().get_submodule(MODULE).weight.dtype == torch.float32


# -- class 4: what cannot be quantized, in memory and while loading -------------------------------------------------
@pytest.fixture()
def poisoned_dir(tiny_llama, tmp_path):
    def make(value, row=3, col=9, module="model.layers.0.self_attn.q_proj"):
        with torch.no_grad():
            tiny_llama.get_submodule(module).weight[row, col] = value
        path = tmp_path / f"poisoned-{value}"
        tiny_llama.save_pretrained(path)
        return path

    return make


@pytest.mark.parametrize("low_memory", [False, True])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_module_and_coordinate(poisoned_dir, low_memory, value):
    path = poisoned_dir(value)
    with pytest.raises(ValueError, match=rf"model\.layers\.0\.self_attn\.q_proj\.weight\[3, 9\] = {value!r}"):
        AutoModelForCausalLM.from_pretrained(path, quantization_config=_config(low_memory=low_memory))


def test_non_finite_weights_are_refused_before_detection(poisoned_dir):
    path = poisoned_dir(float("nan"))
    with pytest.raises(ValueError, match=r"q_proj\.weight\[3, 9\] = nan"):
        AutoModelForCausalLM.from_pretrained(path, quantization_config=SuperWeightConfig(bits=4, group_size=32))


@pytest.mark.parametrize("low_memory", [False, True])
def test_weight_overflowing_the_scale_dtype_is_refused_with_the_fix(poisoned_dir, low_memory):
    path = poisoned_dir(1e30)
    with pytest.raises(ValueError, match=r"q_proj\.weight\[3, 9\] = 1e\+30 .*scale_dtype='float32'"):
        AutoModelForCausalLM.from_pretrained(path, quantization_config=_config(low_memory=low_memory))
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=_config(low_memory=low_memory, scale_dtype="float32"))
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer, SuperWeightLinear) and torch.isfinite(layer.weight_scale).all()


def test_a_stored_tensor_the_config_ties_away_is_refused(tmp_path):
    """transformers 5.24 keeps both tensors when both are stored; should it tie them, the stored one must agree."""
    from optimum_superweight.format import read_safetensors_index
    from optimum_superweight.models.verify import _verify_tied_weights
    from optimum_superweight.testing import build_tiny_model

    model = build_tiny_model("llama", num_hidden_layers=2, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    save_file({"lm_head.weight": model.lm_head.weight.detach().clone()}, tmp_path / "same.safetensors")
    _verify_tied_weights(model, read_safetensors_index([tmp_path / "same.safetensors"]))
    save_file({"lm_head.weight": torch.randn_like(model.lm_head.weight)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"lm_head\.weight is stored .* ties it to model\.embed_tokens\.weight"):
        _verify_tied_weights(model, read_safetensors_index([tmp_path / "other.safetensors"]))


@pytest.mark.parametrize("model_type", ["falcon", "gemma2", "gpt_neox", "opt"])
def test_every_check_passes_an_untouched_checkpoint_of_each_architecture(model_type, tmp_path):
    """The strict checks (completeness, unexpected tensors, tying, shapes, digests) raise no false alarm: a
    sharded, tied checkpoint of each architecture family reloads to identical logits (llama, gpt2: the fuzz suite)."""
    from optimum_superweight.architectures import projection_sites
    from optimum_superweight.testing import build_tiny_model

    model = build_tiny_model(model_type, super_weights=[(1, 5, 7)], tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "fp")
    site = next(s for s in projection_sites(model) if s.layer == 1)
    config = SuperWeightConfig(bits=4, group_size=32, super_weights=[{"module": site.name, "row": 5, "col": 7}])
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=config)
    quantized.save_pretrained(tmp_path / "q", max_shard_size="200KB")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "q")), _logits(quantized))
