"""Exports of an ``embedding_bits=8`` checkpoint: the packed embeddings and head are written dequantized (dense in
compressed-tensors and AWQ, GGUF's embedding types in GGUF), tied heads left to the reader's tie."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from optimum_superweight import dequantize_model
from optimum_superweight.export import export
from optimum_superweight.export.codes import quantized_modules
from optimum_superweight.testing import build_tiny_model

from .conftest import IDS, ROW, load_isolated, quantize_tiny


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def packed_checkpoint(request, tmp_path):
    build_tiny_model("llama", super_weights=[(1, ROW, 7)], tie_word_embeddings=request.param).save_pretrained(tmp_path / "fp")
    return quantize_tiny(tmp_path / "fp", tmp_path / "q", group_size=64, embedding_bits=8), request.param


def _dense(checkpoint):
    return dequantize_model(AutoModelForCausalLM.from_pretrained(checkpoint))


def test_packed_head_is_no_affine_layer_of_the_writers(packed_checkpoint):
    names = {c.name for c in quantized_modules(AutoModelForCausalLM.from_pretrained(packed_checkpoint[0]))}
    assert "lm_head" not in names and len(names) == 28


def test_compressed_tensors_plain_transformers_bit_equal(packed_checkpoint, tmp_path):
    pytest.importorskip("compressed_tensors")
    checkpoint, tied = packed_checkpoint
    export(checkpoint, tmp_path / "ct", format="compressed-tensors")
    stored = load_file(tmp_path / "ct" / "model.safetensors")
    assert stored["model.embed_tokens.weight"].dtype == torch.float32 and ("lm_head.weight" in stored) is not tied
    assert not any("held_out" in k for k in stored)
    assert f"hidden channels [{ROW}] exact" in (tmp_path / "ct" / "README.md").read_text()
    loaded = load_isolated(tmp_path / "ct", tmp_path)  # plain transformers, without this package
    dense = _dense(checkpoint)
    with torch.no_grad():
        assert torch.equal(loaded["logits"], dense(IDS).logits)
    assert torch.equal(stored["model.embed_tokens.weight"], dense.model.embed_tokens.weight)


def test_awq_writes_the_dequantized_embeddings(packed_checkpoint, tmp_path):
    checkpoint, tied = packed_checkpoint
    export(checkpoint, tmp_path / "awq", format="awq")
    stored = load_file(tmp_path / "awq" / "model.safetensors")
    dense = _dense(checkpoint)
    embedding = stored["model.embed_tokens.weight"]
    assert embedding.dtype == torch.float16  # AWQ's dense dtype: the dequantized values, rounded once more
    assert torch.equal(embedding, dense.model.embed_tokens.weight.to(torch.float16))
    if not tied:
        assert torch.equal(stored["lm_head.weight"], dense.lm_head.weight.to(torch.float16))


def test_gguf_writes_q8_0_embeddings_close_to_ours(packed_checkpoint, tmp_path, converter):
    gguf = pytest.importorskip("gguf")
    checkpoint, tied = packed_checkpoint
    result = export(checkpoint, tmp_path / "m.gguf", format="gguf", converter=converter, pre_tokenizer="default")
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    dense = _dense(checkpoint)
    head = tensors["token_embd.weight" if tied else "output.weight"]
    assert head.tensor_type == gguf.GGMLQuantizationType.Q8_0 and ("output.weight" in tensors) is not tied
    ours = dense.lm_head.weight.detach().numpy()
    back = gguf.quants.dequantize(head.data, head.tensor_type).reshape(ours.shape)
    step = np.abs(ours).max(axis=1, keepdims=True) / 127  # Q8_0 blocks of 32 are no coarser than a row's grid
    assert np.all(np.abs(back - ours) <= step)
    assert set(result["embeddings"]) == ({"token_embd.weight"} if tied else {"token_embd.weight", "output.weight"})
