"""Exports of a checkpoint whose modules have their own widths (``module_widths``): each layer is written in the
block type that holds it exactly, or refused naming the layer; a re-fit (``allow_requantize``) takes the rest."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from optimum_superweight.export import NotExpressibleError, export
from optimum_superweight.export.codes import quantized_modules
from optimum_superweight.export.gguf import encoding_for

from .conftest import quantize_tiny

THREE, EIGHT = "model.layers.0.self_attn.v_proj", "model.layers.2.mlp.down_proj"
WIDTHS = {THREE: {"bits": 3, "group_size": 32}, EIGHT: {"bits": 8, "group_size": 64}}


@pytest.fixture()
def mixed_checkpoint(tiny_llama_dir, tmp_path):
    """Symmetric int4 groups of 64, but one 3-bit layer (groups of 32) and one 8-bit layer."""
    return quantize_tiny(tiny_llama_dir, tmp_path / "mixed", group_size=64, module_widths=WIDTHS)


def test_gguf_takes_each_layer_in_its_own_block_type_or_refuses_it_by_name(mixed_checkpoint):
    codes = {c.name: c for c in quantized_modules(AutoModelForCausalLM.from_pretrained(mixed_checkpoint))}
    assert encoding_for(codes[EIGHT]).name == "Q8_0"
    assert encoding_for(codes["model.layers.0.self_attn.q_proj"]).name == "Q4_0"
    with pytest.raises(NotExpressibleError, match=rf"{THREE}: .*3-bit codes \(Q4_0 holds 4\)"):
        encoding_for(codes[THREE])


def test_one_width_formats_refuse_the_first_other_layer_by_name_or_refit_it(mixed_checkpoint, tmp_path):
    with pytest.raises(NotExpressibleError, match=rf"{THREE}: cannot be exported exactly: 3-bit codes \(the format holds 4\)"):
        export(mixed_checkpoint, tmp_path / "ct", "compressed-tensors")
    summary = export(mixed_checkpoint, tmp_path / "ct", "compressed-tensors", allow_requantize=True)
    assert set(summary["requantized"]) == {THREE, EIGHT}
