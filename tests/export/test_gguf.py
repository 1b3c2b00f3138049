"""GGUF export: every quantized tensor dequantizes (gguf-py) bit-exactly to our weights, llama.cpp's layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_superweight.export import NotExpressibleError, export
from optimum_superweight.export.codes import quantized_modules
from optimum_superweight.export.gguf import encode, encoding_for

from .conftest import COL, MODULE, ROW, quantize_tiny

gguf = pytest.importorskip("gguf")


def _codes(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    return model, {c.name: c for c in quantized_modules(model)}


@pytest.mark.parametrize(("bits", "symmetric", "expected"), [(4, True, "Q4_0"), (8, True, "Q8_0")])
def test_blocks_dequantize_to_our_weights(tiny_llama_dir, tmp_path, bits, symmetric, expected):
    checkpoint = quantize_tiny(tiny_llama_dir, tmp_path / "q", bits=bits, group_size=64, symmetric=symmetric)
    _, codes = _codes(checkpoint)
    layer = codes["model.layers.0.self_attn.q_proj"]
    rows = torch.randperm(layer.out_features)
    data, name = encode(layer, rows)  # encode() itself compares gguf-py's dequantize with ours
    assert name == expected
    back = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[name])
    assert np.array_equal(back, layer.dequantize()[rows].numpy())


def test_integer_zero_points_refused_when_offset_not_fp16(tiny_llama_dir, tmp_path):
    # Q4_1 stores m = -d*z in float16; d*z of a float16 d rarely fits float16 exactly: refused, never rounded.
    checkpoint = quantize_tiny(tiny_llama_dir, tmp_path / "asym", group_size=64, symmetric=False)
    _, codes = _codes(checkpoint)
    with pytest.raises(NotExpressibleError, match="offsets not representable in Q4_1's float16"):
        encoding_for(codes["model.layers.0.self_attn.q_proj"])


def test_float_offset_variant_goes_to_q4_1(tiny_checkpoint):
    _, codes = _codes(tiny_checkpoint)
    layer = codes["model.layers.0.mlp.up_proj"]
    d, m = layer.affine()
    layer.variant, layer.offset = "float_offset", (m + d * 0.5).to(torch.float16)  # an offset no zero-point gives
    assert encoding_for(layer).name == "Q4_1"
    blocks = encoding_for(layer).encode(layer, torch.arange(layer.out_features))
    back = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_1)
    expected = layer.codes.float() * layer.scale.float().repeat_interleave(64, 1) + layer.offset.float().repeat_interleave(64, 1)
    assert np.array_equal(back, expected.numpy())


def test_group_not_multiple_of_block_refused(tiny_llama_dir, tmp_path):
    checkpoint = quantize_tiny(tiny_llama_dir, tmp_path / "g48", group_size=48)
    _, codes = _codes(checkpoint)
    with pytest.raises(NotExpressibleError, match="not a multiple of Q4_0's block of 32"):
        encoding_for(codes["model.layers.0.self_attn.q_proj"])


def test_export_tensors_layout_metadata(tiny_checkpoint, tmp_path, converter):
    out = tmp_path / "tiny.gguf"
    result = export(tiny_checkpoint, out, format="gguf", converter=converter, pre_tokenizer="default")
    assert result["super_weight_tensors"] == ["blk.1.ffn_down.weight"]
    assert set(result["encoded"].values()) == {"Q4_0"} and len(result["encoded"]) == 27
    model, codes = _codes(tiny_checkpoint)
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads

    def permute(w, n_head):  # llama.cpp's q/k row order (interleaved rotary halves)
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    for layer in range(model.config.num_hidden_layers):
        for hf, name, n_head in (("self_attn.q_proj", "attn_q", heads), ("self_attn.k_proj", "attn_k", kv_heads),
                                 ("self_attn.v_proj", "attn_v", None), ("mlp.gate_proj", "ffn_gate", None)):
            ours = codes[f"model.layers.{layer}.{hf}"].dequantize()
            expected = permute(ours, n_head) if n_head else ours
            tensor = tensors[f"blk.{layer}.{name}.weight"]
            assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_0
            back = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(expected.shape)
            assert np.array_equal(back, expected.numpy()), (layer, name)
    down = tensors["blk.1.ffn_down.weight"]
    assert down.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    exact = model.get_submodule(MODULE).super_weight_values[0].item()
    assert float(np.asarray(down.data).reshape(codes[MODULE].out_features, -1)[ROW, COL]) == exact

    fields = reader.fields
    assert int(fields["superweight.count"].parts[-1][0]) == 1
    assert fields["superweight.modules"].contents() == [MODULE]
    assert fields["superweight.rows"].contents() == [ROW] and fields["superweight.cols"].contents() == [COL]
    assert fields["superweight.values"].contents()[0] == pytest.approx(exact)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert key in fields, key
    assert int(fields["tokenizer.ggml.bos_token_id"].parts[-1][0]) == 257


def test_missing_converter_names_what_to_install(tiny_checkpoint, tmp_path, monkeypatch):
    from optimum_superweight.export.gguf import CONVERTER_ENV

    monkeypatch.delenv(CONVERTER_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="pip download --no-binary :all: --no-deps llama-cpp-python"):
        export(tiny_checkpoint, tmp_path / "x.gguf", format="gguf")


def test_export_refuses_then_requantizes_on_request(tiny_llama_dir, tmp_path, converter):
    checkpoint = quantize_tiny(tiny_llama_dir, tmp_path / "g48", group_size=48)
    out = tmp_path / "g48.gguf"
    with pytest.raises(NotExpressibleError, match="group_size 48"):
        export(checkpoint, out, format="gguf", converter=converter, pre_tokenizer="default")
    assert not out.exists() and not list(tmp_path.glob("*.gguf"))
    result = export(checkpoint, out, format="gguf", converter=converter, pre_tokenizer="default", allow_requantize=True)
    assert "model.layers.0.self_attn.q_proj" in result["requantized"] and not result["encoded"]
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0


def test_float_offset_checkpoint_exports_losslessly_as_q4_1(tiny_llama_dir, tmp_path, converter):
    import inspect

    from optimum_superweight import SuperWeightConfig

    if "zero_point" not in inspect.signature(SuperWeightConfig).parameters:
        pytest.skip("this checkpoint format has no float offsets (SuperWeightConfig(zero_point='float'))")
    checkpoint = quantize_tiny(tiny_llama_dir, tmp_path / "fo", group_size=64, symmetric=False, zero_point="float")
    result = export(checkpoint, tmp_path / "fo.gguf", format="gguf", converter=converter, pre_tokenizer="default")
    assert set(result["encoded"].values()) == {"Q4_1"}  # encode() checked every block against our weights
    _, codes = _codes(checkpoint)
    layer = codes["model.layers.0.mlp.up_proj"]
    tensor = {t.name: t for t in gguf.GGUFReader(tmp_path / "fo.gguf").tensors}["blk.0.ffn_up.weight"]
    back = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(layer.out_features, layer.in_features)
    assert np.array_equal(back, layer.dequantize().numpy())
