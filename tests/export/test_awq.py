"""AWQ (GEMM layout) export, checked by a decoder written here from the layout's spec, not by the writer's code.

The spec (AutoAWQ's GEMM packing; vLLM's ``awq``/``cpu_awq`` loaders undo it): ``qweight`` int32 ``[in, out/8]``,
``qzeros`` int32 ``[in/group, out/8]``, ``scales`` float16 ``[in/group, out]``; output channel ``8k + c`` is the
4-bit field ``REVERSE[c]`` (bits ``4*REVERSE[c]`` .. ``+3``) of int32 ``k``, with ``REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)``;
the weight is ``(q - z) * s``.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from optimum_superweight.export import NotExpressibleError, export
from optimum_superweight.export.refit import input_importance
from optimum_superweight.tensor.quantize import quantize_weight
from optimum_superweight.testing import tiny_tokenizer

from .conftest import COL, MODULE, ROW, quantize_tiny

REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)


def decode_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, order=REVERSE) -> torch.Tensor:
    """float32 ``[out, in]`` from the three AWQ tensors, per the spec in the module doc."""
    def unpack(packed: torch.Tensor) -> torch.Tensor:
        rows, words = packed.shape
        out = torch.empty(rows, words * 8, dtype=torch.int64)
        for channel in range(8):
            out[:, channel::8] = (packed.to(torch.int64) >> (4 * order[channel])) & 0xF
        return out

    q, z, s = unpack(qweight).double(), unpack(qzeros).double(), scales.double()
    group = q.shape[0] // s.shape[0]
    return ((q - z.repeat_interleave(group, 0)) * s.repeat_interleave(group, 0)).T.float()


def _checkpoint_weights(checkpoint) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    return {n: m.dequantize_weight(torch.float32) for n, m in model.named_modules() if hasattr(m, "dequantize_weight")}


@pytest.mark.parametrize("symmetric", [False, True])
def test_awq_layout_decodes_to_our_weights_bit_exactly(tiny_llama_dir, tmp_path, symmetric):
    checkpoint = quantize_tiny(tiny_llama_dir, tmp_path / "q", group_size=32, symmetric=symmetric)
    result = export(checkpoint, tmp_path / "awq", format="awq")
    assert result["dense"] == [MODULE] and result["quantized"] == 27 and not result["requantized"]
    config = json.loads((tmp_path / "awq" / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "awq" and quant["bits"] == 4 and quant["group_size"] == 32
    assert quant["zero_point"] is True and quant["version"] == "gemm"
    assert MODULE in quant["modules_to_not_convert"] and "lm_head" in quant["modules_to_not_convert"]

    state = load_file(tmp_path / "awq" / "model.safetensors")
    expected = _checkpoint_weights(checkpoint)
    decoded_layers = 0
    for name, weight in expected.items():
        if name == MODULE:
            dense = state[f"{name}.weight"]
            assert dense.dtype == torch.float16 and f"{name}.qweight" not in state
            assert dense[ROW, COL].float() == weight[ROW, COL]  # the super weight, exact
            continue
        qweight, qzeros, scales = state[f"{name}.qweight"], state[f"{name}.qzeros"], state[f"{name}.scales"]
        out_features, in_features = weight.shape
        assert qweight.dtype == torch.int32 and qweight.shape == (in_features, out_features // 8)
        assert qzeros.dtype == torch.int32 and qzeros.shape == (in_features // 32, out_features // 8)
        assert scales.dtype == torch.float16 and scales.shape == (in_features // 32, out_features)
        assert f"{name}.weight" not in state
        assert torch.equal(decode_awq(qweight, qzeros, scales), weight), name
        # Negative control: the same tensors read in plain field order are a different matrix.
        assert not torch.equal(decode_awq(qweight, qzeros, scales, order=tuple(range(8))), weight)
        if symmetric:
            assert torch.equal(decode_awq(qzeros, qzeros, torch.ones_like(scales)), torch.zeros(out_features, in_features // 32))
        decoded_layers += 1
    assert decoded_layers == 27
    readme = (tmp_path / "awq" / "README.md").read_text()
    assert "no value was changed" in readme and "modules_to_not_convert" in readme and "cpu_awq" in readme


def test_awq_float_offsets_refused_then_refitted(tiny_llama_dir, tmp_path):
    checkpoint = quantize_tiny(tiny_llama_dir, tmp_path / "f", group_size=32, symmetric=False, zero_point="float", method="hqq")
    with pytest.raises(NotExpressibleError, match=r"model\.layers\.0\.self_attn\.q_proj.*float offsets"):
        export(checkpoint, tmp_path / "awq", format="awq")
    assert not (tmp_path / "awq").exists()

    result = export(checkpoint, tmp_path / "awq", format="awq", allow_requantize=True)
    assert len(result["requantized"]) == 27 and MODULE not in result["requantized"]
    assert result["refit"]["importance"].startswith("activations")
    effect = result["refit"]["effect"]
    assert effect["checkpoint_perplexity"] > 0 and effect["export_perplexity"] > 0
    readme = (tmp_path / "awq" / "README.md").read_text()
    assert "re-fitted" in readme and "no value was changed" not in readme and "unchanged" not in readme
    assert all(f"`{name}`" in readme for name in result["requantized"])

    # A re-fit, not a rounding: in the objective it minimises (the error weighted by each input channel's mean
    # squared activation on the calibration text) far below round-to-nearest on the min-max grid.
    state = load_file(tmp_path / "awq" / "model.safetensors")
    expected = _checkpoint_weights(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    importance, _ = input_importance(model, tiny_tokenizer(), result["requantized"])
    refit_error = rtn_error = 0.0
    for name in result["requantized"]:
        decoded = decode_awq(state[f"{name}.qweight"], state[f"{name}.qzeros"], state[f"{name}.scales"])
        rtn = quantize_weight(expected[name], bits=4, group_size=32, symmetric=False).dequantize()
        refit_error += ((decoded - expected[name]).square() * importance[name]).sum().item()
        rtn_error += ((rtn - expected[name]).square() * importance[name]).sum().item()
    assert refit_error < 0.5 * rtn_error
    dense = state[f"{MODULE}.weight"]
    assert dense[ROW, COL].float() == expected[MODULE][ROW, COL]


def test_awq_remainder_group_regrouped_exactly_on_request(tiny_llama_dir, tmp_path):
    checkpoint = quantize_tiny(tiny_llama_dir, tmp_path / "g48", group_size=48, symmetric=False)  # 64 inputs: 48 + 16
    with pytest.raises(NotExpressibleError, match="not a multiple of group_size 48"):
        export(checkpoint, tmp_path / "awq", format="awq")
    result = export(checkpoint, tmp_path / "awq", format="awq", allow_requantize=True)
    assert result["group_size"] == 16 and not result["requantized"] and result["regrouped"]
    state = load_file(tmp_path / "awq" / "model.safetensors")
    for name, weight in _checkpoint_weights(checkpoint).items():
        if name != MODULE:
            assert torch.equal(decode_awq(state[f"{name}.qweight"], state[f"{name}.qzeros"], state[f"{name}.scales"]), weight)


def test_awq_rejects_unknown_dtype(tiny_llama_dir, tmp_path):
    checkpoint = quantize_tiny(tiny_llama_dir, tmp_path / "q", group_size=32, symmetric=False)
    with pytest.raises(ValueError, match="dtype='float64' is invalid"):
        export(checkpoint, tmp_path / "awq", format="awq", dtype="float64")
