"""llama.cpp runs our GGUF export of SmolLM2: perplexity within 1% of transformers on our weights, same tokens.

Needs llama-cpp-python's bindings over a llama.cpp build: ``bash scripts/setup.sh`` builds both once per CPU
(scripts/build_llama_cpp.sh), so these run in ``scripts/test.sh`` and CI; ``bash scripts/test_llama_cpp.sh`` runs
only them.
"""

from __future__ import annotations

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
