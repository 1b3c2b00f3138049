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
    data, name, _ = encode(layer, rows)  # encode() itself compares gguf-py's dequantize with ours
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
    assert result["super_weight_tensors"] == ["blk.1.ffn_down.weight"] and not result["dense_super_weight_tensors"]
    assert set(result["encoded"].values()) == {"Q4_0"} and len(result["encoded"]) == 28  # the super-weight layer too
    assert result["file_type"] == "MOSTLY_Q4_0"
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
    # The super-weight layer stays Q4_0; only the block of 32 around the super weight differs from our weights.
    down = tensors["blk.1.ffn_down.weight"]
    assert down.tensor_type == gguf.GGMLQuantizationType.Q4_0
    exact = model.get_submodule(MODULE).super_weight_values[0].item()
    back = gguf.quants.dequantize(down.data, down.tensor_type).reshape(codes[MODULE].out_features, -1)
    assert back[ROW, COL] == exact
    differs = back != codes[MODULE].dequantize().numpy()
    block = COL // 32 * 32
    differs[ROW, block : block + 32] = False
    assert not differs.any()
    [carried] = result["carried_super_weights"]
    assert (carried["tensor"], carried["row"], carried["col"], carried["value"]) == ("blk.1.ffn_down.weight", ROW, COL, exact)
    # Embeddings and head: llama.cpp's choices for an untied model with rows of 64.
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q5_0
    assert tensors["output.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert {k: v["type"] for k, v in result["embeddings"].items()} == {"token_embd.weight": "Q5_0", "output.weight": "Q8_0"}
    assert result["tensor_types"]["Q4_0"] == 28 and result["size_bytes"] == out.stat().st_size

    fields = reader.fields
    assert int(fields["superweight.count"].parts[-1][0]) == 1
    assert fields["superweight.modules"].contents() == [MODULE]
    assert fields["superweight.rows"].contents() == [ROW] and fields["superweight.cols"].contents() == [COL]
    assert fields["superweight.values"].contents()[0] == pytest.approx(exact)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert key in fields, key
    assert int(fields["tokenizer.ggml.bos_token_id"].parts[-1][0]) == 257
    assert gguf.LlamaFileType(int(fields["general.file_type"].parts[-1][0])) == gguf.LlamaFileType.MOSTLY_Q4_0


def test_dense_super_weight_layer_and_kept_embeddings_on_request(tiny_checkpoint, tmp_path, converter):
    out = tmp_path / "dense.gguf"
    result = export(tiny_checkpoint, out, format="gguf", converter=converter, pre_tokenizer="default",
                    super_weight_type="auto", embedding_type="keep")
    assert not result["carried_super_weights"] and len(result["encoded"]) == 27
    model, codes = _codes(tiny_checkpoint)
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    down = tensors["blk.1.ffn_down.weight"]
    assert down.tensor_type.name == result["dense_super_weight_tensors"]["blk.1.ffn_down.weight"]
    assert down.tensor_type.name in ("F16", "BF16", "F32")
    back = gguf.quants.dequantize(down.data, down.tensor_type).reshape(codes[MODULE].out_features, -1)
    assert np.array_equal(back, codes[MODULE].dequantize().numpy())  # the whole layer, bit-exact
    assert tensors["token_embd.weight"].tensor_type.name in ("F16", "BF16", "F32") and not result["embeddings"]
    with pytest.raises(ValueError, match="embedding_type='q3_k' is invalid"):
        export(tiny_checkpoint, out, format="gguf", converter=converter, embedding_type="q3_k")


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


# -- type choices, labels, super weights carried inside blocks (no converter needed) ------------------------------
def test_embedding_types_follow_llama_quantize():
    from optimum_superweight.export.gguf_types import embedding_type

    assert embedding_type("output.weight", 576, has_output=True)[0] == "Q8_0"  # 576 % 256: llama.cpp falls back
    assert embedding_type("token_embd.weight", 640, has_output=False)[0] == "Q8_0"  # tied: treated as the head
    assert embedding_type("token_embd.weight", 576, has_output=True)[0] == "Q5_0"  # untied: Q4_K's fallback
    assert embedding_type("output.weight", 1024, has_output=True, k_quants=False) == (
        "Q8_0", "llama.cpp's quantizer picks Q6_K for the output head; llama.cpp's quantizer is not used (k_quants=False), "
        "and gguf-py cannot write Q6_K, so Q8_0")
    assert embedding_type("token_embd.weight", 1024, has_output=True, k_quants=False)[0] == "Q5_0"
    assert embedding_type("token_embd.weight", 1024, has_output=False, k_quants=True)[0] == "Q6_K"  # tied
    written = embedding_type("token_embd.weight", 512, has_output=True, k_quants=True)
    assert written == ("Q4_K", "llama.cpp's quantizer picks Q4_K for the token embeddings; written by llama.cpp's own ggml_quantize_chunk")
    with pytest.raises(ValueError, match="gguf_name='blk.0.attn_q.weight'"):
        embedding_type("blk.0.attn_q.weight", 64, has_output=True)


def test_file_type_label_names_most_layer_weights():
    from optimum_superweight.export.gguf_types import file_type_label

    assert file_type_label({"Q4_1": 1000, "F32": 10}) == "MOSTLY_Q4_1"
    assert file_type_label({"Q4_0": 10, "Q8_0": 1000}) == "MOSTLY_Q8_0"
    assert file_type_label({}) == "ALL_F32"
    for label in ("MOSTLY_Q4_1", "MOSTLY_Q4_0", "MOSTLY_Q8_0", "MOSTLY_F16", "MOSTLY_BF16", "ALL_F32"):
        assert label in gguf.LlamaFileType.__members__


def _block_tensor(block_type, rows=4, cols=96, seed=0):
    """Random weights on a ``block_type`` grid (gguf-py's quantizer) as ``(bytes, exact float32)``."""
    values = np.random.default_rng(seed).normal(0, 0.02, (rows, cols)).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[block_type]
    data = gguf.quants.quantize(values, qtype)
    return data, gguf.quants.dequantize(data, qtype).reshape(rows, cols)


@pytest.mark.parametrize("block_type", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("value", [-3.5078125, 2.28125])
def test_super_weight_carried_exactly_in_one_block(block_type, value):
    from optimum_superweight.export.gguf_types import carry_super_weights

    data, exact = _block_tensor(block_type)
    exact[2, 40] = value
    new, expected, records = carry_super_weights("t", block_type, data, exact, [(2, 40)])
    back = gguf.quants.dequantize(new, gguf.GGMLQuantizationType[block_type]).reshape(exact.shape)
    assert np.array_equal(back, expected) and back[2, 40] == value
    changed = back != exact
    assert not changed[:, :32].any() and not changed[:, 64:].any() and not changed[[0, 1, 3]].any()  # other blocks untouched
    assert records[0].row == 2 and records[0].col == 40 and records[0].value == value
    assert records[0].neighbours_max_change == pytest.approx(np.abs(np.delete(back[2, 32:64] - exact[2, 32:64], 8)).max())
    assert records[0].neighbours_max_change < 0.1  # the 31 neighbours stay near their values


def test_super_weight_not_carried_when_no_block_holds_it():
    from optimum_superweight.export.gguf_types import carry_super_weights

    data, exact = _block_tensor("Q4_1")
    exact[0, 3] = 1e6  # beyond float16: no scale reaches it in 15 steps
    assert carry_super_weights("t", "Q4_1", data, exact, [(0, 3)]) is None
    exact[0, 3], exact[0, 4] = 3.0, -3.0  # two super weights in one block of 32
    assert carry_super_weights("t", "Q4_1", data, exact, [(0, 3), (0, 4)]) is None


def test_super_weight_beyond_float16_precision_carried_as_top_level():
    from optimum_superweight.export.gguf_types import carry_super_weights

    data, exact = _block_tensor("Q4_1")
    exact[1, 70] = 5.875732421875  # SmolLM2's super weight: 14 significant bits, not a float16 value
    new, expected, [record] = carry_super_weights("t", "Q4_1", data, exact, [(1, 70)])
    back = gguf.quants.dequantize(new, gguf.GGMLQuantizationType.Q4_1).reshape(exact.shape)
    assert back[1, 70] == exact[1, 70] and np.array_equal(back, expected)
    assert record.neighbours_max_change < 5.875732421875 / 15  # within half a level of a grid spanning the block


def test_dense_type_is_the_smallest_exact():
    from optimum_superweight.export.gguf_types import dense_type_for

    assert dense_type_for(torch.tensor([1.5, -2.25])) == "F16"
    assert dense_type_for(torch.tensor([2.0**100, 1.0])) == "BF16"
    assert dense_type_for(torch.tensor([1 + 2**-20])) == "F32"
