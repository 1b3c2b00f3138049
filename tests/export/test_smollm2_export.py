"""compressed-tensors export of SmolLM2 (default int4 g64): bit-equal in plain transformers; the super weight matters."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import optimum_superweight as osw
from optimum_superweight.evaluation import builtin_text, tokenize_text
from optimum_superweight.export import export

from .conftest import load_isolated

pytestmark = pytest.mark.slow
pytest.importorskip("compressed_tensors")
SUPER = "model.layers.11.mlp.down_proj"


def _ppl(logits: torch.Tensor, ids: torch.Tensor) -> float:
    loss = torch.nn.functional.cross_entropy(logits[0, :-1].double(), ids[0, 1:])
    return math.exp(loss.item())


def test_smollm2_compressed_tensors(tmp_path):
    source = osw.default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=osw.SuperWeightConfig(bits=4, group_size=64, method="rtn", symmetric=True))
    model.save_pretrained(tmp_path / "q")
    tokenizer.save_pretrained(tmp_path / "q")
    result = export(model, tmp_path / "ct", format="compressed-tensors", tokenizer=tokenizer)  # from the loaded model
    assert SUPER in result["dense"]
    exact = model.get_submodule(SUPER).super_weight_values.clone()
    rows_cols = model.get_submodule(SUPER).super_weight_indices.long()

    ids = torch.tensor([[tokenizer.bos_token_id] + tokenize_text(tokenizer, builtin_text(), max_tokens=255)])
    loaded = load_isolated(tmp_path / "ct", tmp_path, ids, modules=[SUPER])
    dense = osw.dequantize_model(model)
    with torch.no_grad():
        reference = dense(ids).logits
    assert torch.equal(loaded["logits"], reference)
    assert torch.equal(loaded["weights"][SUPER][rows_cols[:, 0], rows_cols[:, 1]], exact)

    # Negative control: the same export with the super weight zeroed.
    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    tensors[f"{SUPER}.weight"][rows_cols[:, 0], rows_cols[:, 1]] = 0.0
    save_file(tensors, tmp_path / "ct" / "model.safetensors", metadata={"format": "pt"})
    zeroed = load_isolated(tmp_path / "ct", tmp_path, ids, modules=[])
    good, broken = _ppl(reference, ids), _ppl(zeroed["logits"], ids)
    print(f"SmolLM2 export perplexity on {ids.shape[1]} tokens: {good:.3f}; super weight zeroed: {broken:.3f}")
    assert broken > 2 * good
