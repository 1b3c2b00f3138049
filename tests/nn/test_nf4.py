"""The bitsandbytes NF4 form: bnb's own layout and kernels, exact super weights, the absmax search, save/reload,
the verifier, and PEFT's QLoRA layer on top."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

import optimum_superweight  # noqa: F401  (registers the quantizer)
from optimum_superweight import SuperWeightConfig
from optimum_superweight.format import CheckpointFormatError
from optimum_superweight.nn.nf4 import SuperWeightNF4Linear
from optimum_superweight.tensor.nf4 import (
    DEFAULT_ABSMAX_GRID,
    NF4_LEVELS,
    NF4_ZERO_CODE,
    bf16_exact,
    nf4_code_at,
    nf4_codes,
    nf4_dequantize,
)

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
MODULE, ROW, COL = "model.layers.1.mlp.down_proj", 5, 7


def _bf16_blocks(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` rescaled so that every block's absmax is a bfloat16 value (bitsandbytes then picks the same)."""
    blocks = weight.reshape(-1, 64)
    peak = blocks.abs().amax(1, keepdim=True)
    return (blocks / peak * bf16_exact(peak)).reshape(weight.shape)


# -- codes -----------------------------------------------------------------------------------------------------
def test_levels_and_layout_are_bitsandbytes_own():
    assert torch.equal(bnbf.get_4bit_type("nf4", device="cpu"), NF4_LEVELS)
    assert NF4_LEVELS[NF4_ZERO_CODE] == 0.0
    torch.manual_seed(0)
    weight = _bf16_blocks(torch.randn(96, 576))
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours, absmax = nf4_codes(weight, grid=None)
    assert torch.equal(ours, packed) and torch.equal(absmax, state.absmax)
    assert torch.equal(nf4_dequantize(ours, absmax, (96, 576)), bnbf.dequantize_4bit(ours, state))


def test_super_weights_are_out_of_the_absmax_and_hold_the_zero_code():
    torch.manual_seed(1)
    weight = torch.randn(32, 128) * 0.02
    weight[3, 17], weight[30, 100] = 9.0, -4.0
    holdout = torch.tensor([[3, 17], [30, 100]])
    packed, absmax = nf4_codes(weight, holdout)
    flat = holdout[:, 0] * 128 + holdout[:, 1]
    assert nf4_code_at(packed, flat).tolist() == [NF4_ZERO_CODE] * 2
    assert float(absmax.max()) < 0.2  # neither 9.0 nor 4.0 set a block's absmax
    assert torch.equal(bf16_exact(absmax), absmax)  # what bitsandbytes' CPU kernel runs
    dense = nf4_dequantize(packed, absmax, (32, 128))
    assert dense[3, 17] == 0.0 and dense[30, 100] == 0.0


@pytest.mark.parametrize("weighted", [False, True])
def test_absmax_search_never_loses_to_the_plain_absmax_on_its_objective(weighted):
    torch.manual_seed(2)
    weight = torch.randn(64, 256) * torch.rand(1, 256)
    importance = torch.rand(256) ** 4 * 10 if weighted else None
    per_col = importance if weighted else torch.ones(256)

    def block_errors(grid):
        packed, absmax = nf4_codes(weight, importance=importance, grid=grid)
        error = (weight - nf4_dequantize(packed, absmax, (64, 256))).square() * per_col
        return error.reshape(-1, 64).sum(1)

    plain, searched = block_errors(None), block_errors(DEFAULT_ABSMAX_GRID)
    assert bool((searched <= plain * (1 + 1e-6)).all())
    assert float(searched.sum()) < 0.9 * float(plain.sum())


# -- the layer ----------------------------------------------------------------------------------------------------
def _layer(bias=True, seed=0):
    torch.manual_seed(seed)
    dense = nn.Linear(128, 64, bias=bias)
    with torch.no_grad():
        dense.weight[3, 17], dense.weight[40, 90] = 7.0, -3.0
    layer = SuperWeightNF4Linear.from_linear(dense, super_weights=[(3, 17), (40, 90)], importance=torch.rand(128))
    return dense, layer


def test_layer_is_bitsandbytes_linear4bit_with_exact_super_weights():
    dense, layer = _layer()
    assert isinstance(layer, bnb.nn.Linear4bit) and isinstance(layer.weight, bnb.nn.Params4bit)
    state = layer.weight.quant_state
    assert (state.quant_type, state.blocksize, state.nested) == ("nf4", 64, False)
    assert state.absmax.data_ptr() == layer.weight_absmax.data_ptr()  # one tensor: the stored one runs
    weight = layer.dequantize_weight()
    assert weight[3, 17] == dense.weight[3, 17] and weight[40, 90] == dense.weight[40, 90]
    assert torch.equal(layer.to_linear().weight, weight)
    assert layer.storage_bytes() * 8 / (128 * 64) == pytest.approx(4.5, abs=0.05)  # codes + float32 absmax (+ 2 exact)


@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_dequantize_and_linear(bias):
    dense, layer = _layer(bias=bias)
    x = torch.randn(3, 5, 128)
    expected = nn.functional.linear(x, layer.dequantize_weight(), layer.bias)
    layer.train()  # bitsandbytes' dequantize + matmul in float32
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.eval()
    with torch.no_grad():  # bitsandbytes' inference kernel (bfloat16 on CPUs with AVX-512 BF16)
        fast = layer(x)
    assert (fast - expected).abs().max() <= 2e-2 * expected.abs().max()


def test_inference_repacking_leaves_the_stored_tensors_bit_exact():
    _, layer = _layer()
    before = {k: v.clone() for k, v in layer.stored_tensors().items()}
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 128))
    after = layer.stored_tensors()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert set(layer.state_dict()) == set(before)  # none of bitsandbytes' serialized QuantState entries


def test_input_gradient_flows_and_nothing_stored_is_trainable():
    _, layer = _layer()
    layer.train()
    x = torch.randn(4, 128, requires_grad=True)
    layer(x).sum().backward()
    expected = layer.dequantize_weight().sum(0).expand(4, -1)
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)
    assert all(not p.requires_grad for n, p in layer.named_parameters() if n != "bias")


def test_training_after_an_inference_call_still_has_the_input_gradient():
    """bitsandbytes' CPU inference layout (made at the first eval-mode call) has no backward: plain ``Linear4bit``
    then gives no input gradient at all; ours converts back before a training call."""
    _, layer = _layer()
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 128))
    layer.train()
    x = torch.randn(4, 128, requires_grad=True)
    layer(x).sum().backward()
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    torch.testing.assert_close(x.grad, layer.dequantize_weight().sum(0).expand(4, -1), rtol=1e-5, atol=1e-5)


def test_model_dtype_cast_keeps_absmax_and_exact_values_float32():
    dense, layer = _layer()
    layer.to(torch.bfloat16)
    assert layer.weight_absmax.dtype == torch.float32 and layer.super_weight_values.dtype == torch.float32
    assert layer.dequantize_weight(torch.float32)[3, 17] == dense.weight[3, 17]


# -- config -----------------------------------------------------------------------------------------------------------
def test_config_resolves_and_validates_the_form():
    config = SuperWeightConfig(weight_format="bnb-nf4")
    assert (config.bits, config.group_size, config.symmetric, config.scale_dtype) == (4, 64, True, "float32")
    assert config.algorithm.clip_search and config.algorithm.needs_input_energy and config.bits_per_weight == 4.5
    assert SuperWeightConfig.from_dict(config.to_dict()).weight_format == "bnb-nf4"
    assert SuperWeightConfig().weight_format == "affine" and SuperWeightConfig().scale_dtype == "float16"
    for options, field in (({"bits": 3}, "bits"), ({"group_size": 128}, "group_size"), ({"low_memory": True}, "low_memory"),
                           ({"method": "hqq"}, "method"), ({"scale_dtype": "float16"}, "scale_dtype"),
                           ({"symmetric": False}, "symmetric"), ({"clip_objective": "output"}, "clip_objective")):
        with pytest.raises(ValueError, match=f"SuperWeightConfig.{field}=.*weight_format='bnb-nf4'"):
            SuperWeightConfig(weight_format="bnb-nf4", **options)


# -- a model: quantize, save, reload, re-save, verify ---------------------------------------------------------------
def _config(**kwargs):
    return SuperWeightConfig(weight_format="bnb-nf4", super_weights=[{"module": MODULE, "row": ROW, "col": COL}], **kwargs)


def _logits(model, seed=0):
    torch.manual_seed(seed)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture()
def saved(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=_config())
    model.save_pretrained(tmp_path / "a")
    return tiny_llama_dir, model, tmp_path / "a"


def test_quantized_model_round_trips_bit_exactly(saved, tmp_path):
    source, model, folder = saved
    layer = model.get_submodule(MODULE)
    assert isinstance(layer, SuperWeightNF4Linear) and model.is_loaded_in_4bit
    assert not isinstance(model.lm_head, SuperWeightNF4Linear)
    exact = load_file(source / "model.safetensors")[f"{MODULE}.weight"][ROW, COL]
    assert layer.dequantize_weight()[ROW, COL] == exact
    tensors = load_file(folder / "model.safetensors")
    assert {k.rpartition(".")[2] for k in tensors if k.startswith(MODULE)} == {
        "weight", "weight_absmax", "super_weight_indices", "super_weight_values"}
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["weight_format"] == "bnb-nf4" and MODULE in config["digests"]
    expected = _logits(model)
    again = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(again.get_submodule(MODULE), SuperWeightNF4Linear) and again.is_loaded_in_4bit
    assert torch.equal(_logits(again), expected)
    again.save_pretrained(tmp_path / "b")
    resaved = load_file(tmp_path / "b" / "model.safetensors")
    assert resaved.keys() == tensors.keys() and all(torch.equal(resaved[k], tensors[k]) for k in tensors)
    dense = again.dequantize()
    assert type(dense.get_submodule(MODULE)) is nn.Linear
    assert dense.get_submodule(MODULE).weight[ROW, COL] == exact


def _rewrite(folder, edit):
    path = folder / "model.safetensors"
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata=metadata)


def _set(key, index, value):
    def edit(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key].reshape(-1)[index] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_set(f"{MODULE}.weight_absmax", 0, -1.0), r"weight_absmax holds -1.0.*bfloat16 values >= 0"),
    (_set(f"{MODULE}.weight_absmax", 0, 0.1), r"weight_absmax holds 0.1.*bfloat16"),  # not a bfloat16 value
    (_set(f"{MODULE}.weight_absmax", 0, 0.5), r"does not match the content digest.*changed: weight_absmax"),
    (_set(f"{MODULE}.weight", (ROW * 128 + COL) // 2, 0x88), r"holds NF4 code 8 at super weight #0"),
    (lambda t: t.pop(f"{MODULE}.weight_absmax"), r"weight_absmax is missing.*weight_format"),
    (lambda t: t.__setitem__(f"{MODULE}.weight_scale", torch.ones(128, 2, dtype=torch.float16)),
     r"weight_scale is in the checkpoint.*weight_format"),
])
def test_verifier_refuses_a_tampered_checkpoint(saved, edit, message):
    _, _, folder = saved
    _rewrite(folder, edit)
    with pytest.raises(CheckpointFormatError, match=message):
        AutoModelForCausalLM.from_pretrained(folder)


def test_config_json_saying_affine_is_refused(saved):
    _, _, folder = saved
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data["quantization_config"]["weight_format"] = "affine"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="importance='activations' is invalid"):  # rtn reads no activations
        AutoModelForCausalLM.from_pretrained(folder)
    data["quantization_config"]["importance"] = "none"  # a consistent affine config: the tensors disagree
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointFormatError, match=r"weight is stored as U8 \[\d+, 1\], but config.json"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_bitsandbytes_hub_kernel_warning_is_kept_quiet():
    import os
    import subprocess
    import sys

    # A fresh interpreter: bitsandbytes logs it once, when its CPU backend is first imported.
    code = "import logging; logging.basicConfig(); import optimum_superweight.nn.nf4"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert run.returncode == 0, run.stderr
    assert "kernels-community" not in run.stderr + run.stdout


# -- PEFT's QLoRA path --------------------------------------------------------------------------------------------
def test_peft_wraps_the_layer_with_its_bitsandbytes_lora_and_trains(tiny_llama_dir):
    peft = pytest.importorskip("peft", reason="peft is not installed")
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=_config())
    before = _logits(model)  # also puts bitsandbytes' CPU inference layout in place: training must leave it
    exact = model.get_submodule(MODULE).dequantize_weight()[ROW, COL]
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    wrapped = lora.get_submodule(f"base_model.model.{MODULE}")
    assert isinstance(wrapped, LoraLinear4bit) and isinstance(wrapped.get_base_layer(), SuperWeightNF4Linear)
    assert torch.equal(_logits(lora), before)  # LoRA's B starts at zero
    lora.train()
    ids = torch.randint(0, 256, (2, 16))
    lora(input_ids=ids, labels=ids).loss.backward()
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora.named_parameters() if "lora_B" in n)
    # the input gradient through the NF4 layer: q_proj's LoRA A sees it only through down_proj of earlier layers
    assert all(p.grad is not None for n, p in lora.named_parameters() if "lora_A" in n)
    assert wrapped.get_base_layer().dequantize_weight()[ROW, COL] == exact


def test_plain_peft_calls_train_save_reload_and_merge_through_dequantize(tiny_llama_dir, tmp_path):
    """No prepare call: "all-linear" and a name list find the layers (bitsandbytes' ``Linear4bit`` is an
    ``nn.Linear``), the adapter reloads with ``PeftModel.from_pretrained`` alone, PEFT's 4-bit merge is refused
    without touching the layer, and the dense route merges with the super weight at its exact value plus the update."""
    peft = pytest.importorskip("peft", reason="peft is not installed")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=_config())
    model.save_pretrained(tmp_path / "q")
    exact = model.get_submodule(MODULE).super_weight_values.clone()
    names = {n for n, m in model.named_modules() if isinstance(m, SuperWeightNF4Linear)}
    by_list = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(tmp_path / "q"), peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"])
    )
    assert {n.split(".")[-1] for n, m in by_list.named_modules() if hasattr(m, "lora_A")} == {"q_proj", "down_proj"}
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    assert {n.removeprefix("base_model.model.") for n, m in lora.named_modules() if hasattr(m, "lora_A")} == names
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    lora.train()
    lora(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    lora.eval()
    adapted = _logits(lora)
    lora.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "q"), tmp_path / "adapter")
    assert torch.equal(_logits(reloaded), adapted)
    with pytest.raises(ValueError, match="re-quantized by bitsandbytes"):
        lora.merge_and_unload()
    assert torch.equal(_logits(lora), adapted)  # the refused merge left every layer as it was
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    dense.dequantize()
    merged = peft.PeftModel.from_pretrained(dense, tmp_path / "adapter").merge_and_unload()
    assert type(merged.get_submodule(MODULE)) is nn.Linear
    delta = lora.get_submodule(f"base_model.model.{MODULE}").get_delta_weight("default")[ROW, COL]
    assert merged.get_submodule(MODULE).weight[ROW, COL].item() == pytest.approx((exact + delta).item(), abs=1e-6)
    assert torch.allclose(_logits(merged), adapted, atol=0.02)  # bitsandbytes' kernel against the dense weight
