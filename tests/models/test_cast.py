"""25.3: ``model.to(dtype)`` / ``.half()`` / ``.float()`` keep the stored state exact; activations follow the cast."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_superweight import SuperWeightConfig, SuperWeightLinear

MODULE, ROW, COL = "model.layers.1.mlp.down_proj", 5, 7
VALUE = 5.87573  # not representable in bfloat16 (5.875) nor float16 (5.875)
INPUT = torch.arange(2, 34).reshape(2, 16)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def checkpoint(tiny_llama, tmp_path):
    with torch.no_grad():
        tiny_llama.get_submodule(MODULE).weight[ROW, COL] = VALUE
    source = tmp_path / "fp"
    tiny_llama.save_pretrained(source)
    config = SuperWeightConfig(
        bits=4, group_size=32, symmetric=False, super_weights=[{"module": MODULE, "row": ROW, "col": COL}]
    )
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=config)
    out = tmp_path / "q"
    model.save_pretrained(out)
    return out


def _state(model):
    return {
        f"{name}.{t}": tensor.detach().clone()
        for name, module in model.named_modules() if isinstance(module, SuperWeightLinear)
        for t, tensor in module.stored_tensors().items() if t != "bias"
    }


def _share_rotary_buffers(model, reference):
    # transformers' own .to(dtype) casts the rotary inv_freq buffers, which from_pretrained(dtype=...) keeps in
    # float32 (a dense model differs the same way): compare what this package owns, the quantized layers.
    for name, buffer in reference.named_buffers():
        owner, _, leaf = name.rpartition(".")
        if "rotary" in owner:
            setattr(model.get_submodule(owner), leaf, buffer)


@pytest.mark.parametrize(
    "cast, dtype, loaded_as",
    [
        (lambda m: m.to(torch.bfloat16), torch.bfloat16, torch.bfloat16),
        (lambda m: m.to(dtype=torch.float16), torch.float16, torch.float16),
        # The dense layers keep what bfloat16 rounded: the reference is loaded in bfloat16, then cast back too.
        (lambda m: m.to(torch.bfloat16).to("cpu", torch.float32), torch.float32, torch.bfloat16),
    ],
    ids=["to-bfloat16", "to-dtype-float16", "bfloat16-then-float32"],
)
def test_cast_keeps_stored_state_and_saves_a_verified_checkpoint(checkpoint, tmp_path, cast, dtype, loaded_as):
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    before = _state(model)
    model = cast(model)
    after = _state(model)
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype, key
        assert torch.equal(after[key], tensor), key
    layer = model.get_submodule(MODULE)
    assert layer.super_weight_values.item() == torch.tensor(VALUE, dtype=torch.float32).item()
    assert layer.bias is None or layer.bias.dtype == dtype
    # The activations follow the cast: same logits as the checkpoint loaded in that dtype.
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=loaded_as).to(dtype)
    _share_rotary_buffers(model, reference)
    with torch.no_grad():
        got, want = model(INPUT).logits, reference(INPUT).logits
    assert got.dtype == dtype
    assert torch.equal(got, want)
    # ... and the cast model saves a checkpoint the package's own verifier accepts, with the exact value.
    model.save_pretrained(tmp_path / "cast")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "cast")
    assert again.get_submodule(MODULE).super_weight_values.item() == layer.super_weight_values.item()
    recorded = again.config.quantization_config.super_weights[0]["value"]
    assert torch.tensor(recorded, dtype=torch.float32).item() == layer.super_weight_values.item()


def test_half_and_float_on_the_model_are_refused_and_change_nothing(checkpoint):
    """transformers refuses ``.half()`` / ``.float()`` on any quantized model (saying to use ``.to(dtype)``-free
    loading); the refusal must come before anything was re-rounded."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    before = _state(model)
    for cast in (model.half, model.float):
        with pytest.raises(ValueError, match="not supported for quantized model"):
            cast()
    after = _state(model)
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items())
