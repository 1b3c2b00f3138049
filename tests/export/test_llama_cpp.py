"""llama.cpp runs our GGUF export of SmolLM2: perplexity within 1% of transformers on our weights, same tokens.

Needs llama-cpp-python's bindings over a llama.cpp build: ``bash scripts/setup.sh`` builds both once per CPU
(scripts/build_llama_cpp.sh), so these run in ``scripts/test.sh`` and CI; ``bash scripts/test_llama_cpp.sh`` runs
only them.
"""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import optimum_superweight as osw
from optimum_superweight.evaluation import builtin_text, tokenize_text
from optimum_superweight.export import export

pytestmark = [pytest.mark.llama_cpp, pytest.mark.slow]
pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: run bash scripts/setup.sh (tests/test_setup.py fails too)")


def test_smollm2_gguf_in_llama_cpp(tmp_path, converter):
    from optimum_superweight.export.llama_cpp_eval import llama_perplexity, load_llama

    source = osw.default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    quantized = AutoModelForCausalLM.from_pretrained(source, quantization_config=osw.SuperWeightConfig(bits=4, group_size=64, method="rtn", symmetric=True))
    quantized.save_pretrained(tmp_path / "q")
    tokenizer.save_pretrained(tmp_path / "q")
    result = export(tmp_path / "q", tmp_path / "smollm2.gguf", format="gguf", converter=converter)
    assert set(result["encoded"].values()) == {"Q4_0"}
    assert "blk.11.ffn_down.weight" in result["super_weight_tensors"]
    assert result["file_type"] == "MOSTLY_Q4_0" and result["embeddings"]["token_embd.weight"]["type"] == "Q8_0"

    text = builtin_text()
    ids = tokenize_text(tokenizer, text, max_tokens=2048)
    llm = load_llama(tmp_path / "smollm2.gguf", n_ctx=1024)
    snippet = text[:20000]
    assert llm.tokenize(snippet.encode(), add_bos=False, special=False) == tokenize_text(tokenizer, snippet, None)
    ours = float(osw.perplexity(osw.dequantize_model(quantized), tokenizer, token_ids=ids))
    theirs = llama_perplexity(llm, ids, tokenizer.bos_token_id)
    print(f"perplexity on {len(ids)} tokens: transformers {ours:.4f}, llama.cpp {theirs:.4f}, ratio {theirs / ours:.4f}")
    assert abs(theirs / ours - 1) < 0.01


def test_llama_quantize_keeps_super_weight_tensor(tiny_checkpoint, tmp_path, converter):
    import gguf

    out = tmp_path / "tiny-q4km.gguf"
    result = export(tiny_checkpoint, out, format="gguf", converter=converter, pre_tokenizer="default",
                    llama_quantize="Q4_K_M", super_weight_type="f32")
    assert result["llama_quantize"] == "Q4_K_M" and not result["encoded"]
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["blk.1.ffn_down.weight"] == gguf.GGMLQuantizationType.F32  # pinned by the override
    assert types["blk.0.ffn_down.weight"] not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    assert not out.with_suffix(".f32.gguf").exists()


def test_k_quant_embeddings_are_llama_quantize_bytes(tiny_llama_dir, tmp_path, converter):
    """Rows of 256: the export's Q4_K embeddings and Q6_K head are byte for byte what llama-quantize writes."""
    import subprocess

    import gguf
    import torch

    from optimum_superweight.export import ggml_quants
    from optimum_superweight.export.llama_cpp_eval import llama_perplexity, load_llama
    from optimum_superweight.testing import build_tiny_model

    from .conftest import quantize_tiny

    reason = ggml_quants.unavailable_reason()
    if reason is not None:
        pytest.skip(f"llama.cpp's quantizer is unavailable: {reason}")
    tool = ggml_quants.library_path().parent / "llama-quantize"
    if not tool.is_file():
        pytest.skip(f"no llama-quantize beside {ggml_quants.library_path()} (scripts/build_llama_cpp.sh builds it)")
    # Rows of 256 and SmolLM2's vocabulary: llama.cpp cannot load the byte-level tiny tokenizer (no merges).
    tokenizer = AutoTokenizer.from_pretrained(osw.default_model_path())
    build_tiny_model("llama", super_weights=[(1, 5, 7)], hidden_size=256, head_dim=64, vocab_size=len(tokenizer),
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(tmp_path / "wide")
    checkpoint = quantize_tiny(tmp_path / "wide", tmp_path / "wide-q", group_size=64)
    tokenizer.save_pretrained(checkpoint)
    ours = export(checkpoint, tmp_path / "ours.gguf", format="gguf", converter=converter)
    assert {k: (v["type"], v["quantizer"]) for k, v in ours["embeddings"].items()} == {
        "token_embd.weight": ("Q4_K", "llama.cpp (ggml_quantize_chunk)"), "output.weight": ("Q6_K", "llama.cpp (ggml_quantize_chunk)")}
    assert "ggml_quantize_chunk" in ours["embeddings"]["output.weight"]["reason"]
    # llama-quantize on the same export with float embeddings: --pure keeps our Q4_0 layers (same type: copied).
    export(checkpoint, tmp_path / "keep.gguf", format="gguf", converter=converter, embedding_type="keep")
    done = subprocess.run([str(tool), "--pure", "--token-embedding-type", "q4_k", "--output-tensor-type", "q6_k",
                           str(tmp_path / "keep.gguf"), str(tmp_path / "theirs.gguf"), "Q4_0", "1"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    mine = {t.name: t for t in gguf.GGUFReader(tmp_path / "ours.gguf").tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(tmp_path / "theirs.gguf").tensors}
    assert sorted(mine) == sorted(theirs)
    for name, tensor in mine.items():
        assert tensor.tensor_type == theirs[name].tensor_type, name
        assert np.array_equal(np.asarray(tensor.data).view(np.uint8), np.asarray(theirs[name].data).view(np.uint8)), name

    # llama.cpp runs the file and computes what transformers computes with the same weights.
    dense = osw.dequantize_model(AutoModelForCausalLM.from_pretrained(checkpoint))
    for hf, name in ((dense.get_input_embeddings(), "token_embd.weight"), (dense.get_output_embeddings(), "output.weight")):
        back = gguf.quants.dequantize(mine[name].data, mine[name].tensor_type).reshape(hf.weight.shape)
        with torch.no_grad():
            hf.weight.copy_(torch.from_numpy(back))
    ids = tokenize_text(tokenizer, builtin_text(), max_tokens=400)
    expected = float(osw.perplexity(dense, tokenizer, token_ids=ids, window=200))
    llm = load_llama(tmp_path / "ours.gguf", n_ctx=256)
    measured = llama_perplexity(llm, ids, tokenizer.bos_token_id, window=200)
    window = [tokenizer.bos_token_id, *ids[:200]]
    llm.reset()
    llm.eval(window)
    with torch.no_grad():
        logits = dense(torch.tensor([window])).logits[0].numpy()
    correlation = np.corrcoef(np.asarray(llm.scores[: len(window)]).ravel(), logits.ravel())[0, 1]
    print(f"tiny model, Q4_K/Q6_K embeddings: perplexity transformers {expected:.1f}, llama.cpp {measured:.1f}; logits r={correlation:.5f}")
    # A random model: perplexity near the vocabulary size, and llama.cpp's 8-bit activations move it by a few %.
    assert abs(measured / expected - 1) < 0.03 and correlation > 0.99
