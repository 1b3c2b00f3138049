"""Fast kernels inside a whole (tiny) model, through save and reload."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from optimum_superweight import SuperWeightConfig, kernels
from optimum_superweight.kernels import kernel_summary, prepare_kernels

MODULE, ROW, COL = "model.layers.1.mlp.down_proj", 5, 7


def _logits(model, ids, reference=False):
    kernels.force_reference(reference)
    try:
        with torch.no_grad():
            return model(ids).logits.float()
    finally:
        kernels.force_reference(False)


def _prefill_kernel() -> str:
    """The compiled kernel where it builds (it does wherever a C++ compiler and ninja are installed)."""
    return "cpu-tiled" if kernels.tiled.unavailable() is None else "cpu-dense"


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_bfloat16_model_runs_fast_kernels_after_reload(tiny_llama_dir, tmp_path):
    config = SuperWeightConfig(bits=4, group_size=32, super_weights=[{"module": MODULE, "row": ROW, "col": COL}])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    summary = prepare_kernels(reloaded)
    assert summary["decode"] == {"cpu-int4": sum(summary["decode"].values())}
    assert set(summary["prefill"]) == {_prefill_kernel()}

    decode_ids = torch.tensor([[5, 17, 33]])  # 3 tokens: int kernels
    prefill_ids = torch.arange(2, 66).reshape(2, 32)  # 64 tokens: the compiled dequantize + GEMM kernel
    for ids, expected_kernel in ((decode_ids, "cpu-int4"), (prefill_ids, _prefill_kernel())):
        fast = _logits(reloaded, ids)
        assert reloaded.get_submodule(MODULE).kernel == expected_kernel
        reference = _logits(reloaded, ids, reference=True)
        assert reloaded.get_submodule(MODULE).kernel == "reference"
        # bfloat16 through 4 decoder layers: same bound as one layer, doubled.
        assert _rel(fast, reference) < 2e-2
    # The kernel layouts never reach the checkpoint.
    assert not any("kernel" in key for key in reloaded.state_dict())


def test_float32_model_reports_reference_and_opt_in(tiny_llama_dir):
    config = SuperWeightConfig(bits=4, group_size=32, super_weights=[{"module": MODULE, "row": ROW, "col": COL}])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config, dtype=torch.float32)
    # 4-bit layers: exact float32 arithmetic, in the compiled kernel where it builds.
    assert set(kernel_summary(model)) == {"cpu-tiled" if _prefill_kernel() == "cpu-tiled" else "reference"}
    ids = torch.tensor([[5, 17, 33]])
    exact = _logits(model, ids)
    policy = kernels.float32_policy()
    kernels.set_float32_policy("bfloat16")
    try:
        assert set(kernel_summary(model)) == {"cpu-int4+bf16-cast"}
        cast = _logits(model, ids)
    finally:
        kernels.set_float32_policy(policy)
    assert cast.dtype == torch.float32 and _rel(cast, exact) < 2e-2
