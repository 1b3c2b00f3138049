"""compressed-tensors export: plain transformers, without this package, reproduces our dequantized model bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_superweight import dequantize_model
from optimum_superweight.export import NotExpressibleError, export
from optimum_superweight.export.compressed_tensors import fused_siblings, kernel_notes

from .conftest import IDS, MODULE, ROW, COL, load_isolated, quantize_tiny

pytest.importorskip("compressed_tensors")


def _reference(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    exact = model.get_submodule(MODULE).super_weight_values.clone()
    dense = dequantize_model(model)
    with torch.no_grad():
        return dense(IDS).logits, dense, exact


def test_plain_transformers_without_package_is_bit_equal(tiny_checkpoint, tmp_path):
    out = tmp_path / "ct"
    result = export(tiny_checkpoint, out, format="compressed-tensors")
    assert result["dense"] == [MODULE] and result["quantized"] == 27 and not result["requantized"]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and list(config["config_groups"]) == ["group_0"]
    assert MODULE in config["ignore"] and "lm_head" in config["ignore"]
    assert "vllm serve" in (out / "README.md").read_text()

    loaded = load_isolated(out, tmp_path)
    logits, dense, exact = _reference(tiny_checkpoint)
    assert torch.equal(loaded["logits"], logits)
    for name, weight in loaded["weights"].items():
        assert torch.equal(weight, dense.get_submodule(name).weight), name
    assert loaded["weights"][MODULE][ROW, COL].item() == exact.item()


def test_negative_control_zeroed_super_weight_changes_logits(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "ct"
    export(tiny_checkpoint, out, format="compressed-tensors")
    tensors = load_file(out / "model.safetensors")
    tensors[f"{MODULE}.weight"][ROW, COL] = 0.0
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    loaded = load_isolated(out, tmp_path)
    logits, _, _ = _reference(tiny_checkpoint)
    assert (loaded["logits"] - logits).abs().max() > 0.1 * logits.abs().max()


def test_remainder_group_refused_then_regrouped_exactly_on_request(tiny_llama_dir, tmp_path):
    checkpoint = quantize_tiny(tiny_llama_dir, tmp_path / "g48", group_size=48)  # 64 inputs: groups of 48 + 16
    with pytest.raises(NotExpressibleError, match="not a multiple of group_size 48"):
        export(checkpoint, tmp_path / "ct", format="compressed-tensors")
    assert not (tmp_path / "ct").exists()
    result = export(checkpoint, tmp_path / "ct", format="compressed-tensors", allow_requantize=True)
    # Groups of 16 (gcd(64, 48), one group for all) hold every layer exactly: regrouped, nothing re-fitted.
    assert not result["requantized"] and "model.layers.0.self_attn.q_proj" in result["regrouped"]
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["group_size"] == 16
    loaded = load_isolated(tmp_path / "ct", tmp_path)
    logits, _, _ = _reference(checkpoint)
    assert torch.equal(loaded["logits"], logits)


def _decompressed(folder) -> dict[str, torch.Tensor]:
    """Every packed layer of ``folder`` decoded by compressed-tensors' own decompressor."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    config = QuantizationConfig.model_validate(json.loads((folder / "config.json").read_text())["quantization_config"])
    scheme = config.config_groups["group_0"]
    state = load_file(folder / "model.safetensors")
    names = {key.rpartition(".")[0] for key in state if key.endswith(".weight_packed")}
    return {name: PackedQuantizationCompressor.decompress(
        {k.rpartition(".")[2]: v for k, v in state.items() if k.rpartition(".")[0] == name}, scheme)["weight"]
        for name in names}


def test_zero_points_exported_and_decoded_exactly_by_compressed_tensors(tiny_llama_dir, tmp_path):
    checkpoint = quantize_tiny(tiny_llama_dir, tmp_path / "asym", group_size=64, symmetric=False)
    result = export(checkpoint, tmp_path / "ct", format="compressed-tensors")
    assert result["symmetric"] is False and result["quantized"] == 27 and not result["requantized"]
    weights = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert weights["symmetric"] is False and weights["group_size"] == 64
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    decoded = _decompressed(tmp_path / "ct")
    assert len(decoded) == 27 and MODULE not in decoded
    zero_points_used = False
    for name, weight in decoded.items():
        module = model.get_submodule(name)
        assert torch.equal(weight.float(), module.dequantize_weight(torch.float32)), name
        zero_points_used |= bool((module.weight_zero_point != 8).any())
    assert zero_points_used  # the check covers zero-points other than the symmetric centre
    readme = (tmp_path / "ct" / "README.md").read_text()
    assert "Readers known to decode it" in readme and "Marlin" in readme and "transformers 5.x: **no**" in readme


def test_float_offsets_refitted_to_zero_points_on_request(tiny_llama_dir, tmp_path):
    checkpoint = quantize_tiny(tiny_llama_dir, tmp_path / "f", group_size=64, symmetric=False, zero_point="float", method="hqq")
    with pytest.raises(NotExpressibleError, match="float offsets"):
        export(checkpoint, tmp_path / "ct", format="compressed-tensors")
    result = export(checkpoint, tmp_path / "ct", format="compressed-tensors", allow_requantize=True)
    assert result["symmetric"] is False and len(result["requantized"]) == 27
    assert result["refit"]["effect"]["ratio"] > 0
    readme = (tmp_path / "ct" / "README.md").read_text()
    assert "re-fitted" in readme and "unchanged" not in readme
    # On request, symmetric: what plain transformers reads.
    result = export(checkpoint, tmp_path / "ct-sym", format="compressed-tensors", allow_requantize=True, zero_point="symmetric")
    assert result["symmetric"] is True and len(result["requantized"]) == 27
    assert len(_decompressed(tmp_path / "ct-sym")) == 27


def test_serving_dtype_that_rounds_super_weight_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(NotExpressibleError):
        export(tiny_checkpoint, tmp_path / "ct", format="compressed-tensors", dtype="bfloat16")


def test_fused_siblings_and_kernel_notes():
    assert fused_siblings("model.layers.3.self_attn.k_proj") == [f"model.layers.3.self_attn.{p}_proj" for p in "qkv"]
    assert fused_siblings("model.layers.3.mlp.up_proj") == ["model.layers.3.mlp.gate_proj", "model.layers.3.mlp.up_proj"]
    assert fused_siblings("model.layers.3.mlp.down_proj") == ["model.layers.3.mlp.down_proj"]
    marlin, machete = kernel_notes({"a": (576, 1536), "b": (1536, 576)})
    # SmolLM2's down_proj (576 out, 1536 in) fits Marlin, not Machete; its up_proj (1536 out, 576 in) the reverse
    assert "not met" in marlin and "1536x576" in marlin and "576x1536" not in marlin
    assert "not met" in machete and "576x1536" in machete and "1536x576" not in machete
    assert all("not met" not in note for note in kernel_notes({"a": (256, 256)}))
