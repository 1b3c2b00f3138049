"""LoRA (PEFT) on quantized models: targets, the backward, training, adapters, merging (issue 22, items 1-3)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from optimum_superweight import SuperWeightConfig, SuperWeightLinear, quantize_model  # noqa: E402
from optimum_superweight.nn.autograd import input_gradient  # noqa: E402
from optimum_superweight.nn.lora import SuperWeightLoraLinear  # noqa: E402
from optimum_superweight.peft import load_adapter, prepare_lora_config  # noqa: E402
from optimum_superweight.testing import build_tiny_model  # noqa: E402

from .conftest import PLANTED  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MODULE, ROW, COL = PLANTED
SW = [{"module": MODULE, "row": ROW, "col": COL}]
FORMATS = [
    {"bits": 2, "group_size": 32},
    {"bits": 3, "group_size": 32, "symmetric": False},
    {"bits": 4, "group_size": 32},
    {"bits": 4, "group_size": 32, "symmetric": True},
    {"bits": 3, "group_size": 32, "symmetric": False, "zero_point": "float"},
    {"bits": 8, "group_size": -1, "symmetric": False, "zero_point": "uint8"},
]


def _quantized(tiny_llama, **options):
    return quantize_model(tiny_llama, SuperWeightConfig(super_weights=SW, importance="none", **options))


def _packed_state(model):
    """Every stored tensor of every quantized layer, by module name (copies)."""
    return {
        name.removesuffix(".base_layer"): {k: v.detach().clone() for k, v in m.stored_tensors().items() if k != "bias"}
        for name, m in model.named_modules()
        if isinstance(m, SuperWeightLinear)
    }


def _random_adapters(peft_model, seed=0):
    """Non-zero B (PEFT starts B at zero, which would hide every masking or merging error)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def _lora(model, **options):
    options = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **options}
    return get_peft_model(model, prepare_lora_config(LoraConfig(**options), model))


@pytest.mark.parametrize("options", FORMATS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_every_format_gets_masked_adapters_and_merges_exactly(tiny_llama, options):
    model = _quantized(tiny_llama, **options)
    quantized = {n for n, m in model.named_modules() if isinstance(m, SuperWeightLinear)}
    exact = model.get_submodule(MODULE).dequantize_weight()[ROW, COL].item()
    peft_model = _lora(model)
    wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, SuperWeightLoraLinear)}
    assert wrapped == quantized and "lm_head" not in wrapped  # "all-linear" found every quantized layer, no head
    _random_adapters(peft_model)
    layer = peft_model.base_model.model.get_submodule(MODULE)
    assert layer.get_delta_weight("default")[ROW, COL].item() == 0.0
    ids = torch.arange(2, 34).reshape(2, 16)
    with torch.no_grad():
        adapted = peft_model(ids).logits
        peft_model.merge_adapter()
        assert isinstance(layer.base_layer, nn.Linear) and layer.base_layer.weight[ROW, COL].item() == exact
        merged = peft_model(ids).logits
        peft_model.unmerge_adapter()
        assert isinstance(layer.base_layer, SuperWeightLinear)
        again = peft_model(ids).logits
    assert torch.allclose(adapted, merged, atol=1e-4, rtol=1e-4)  # forward masks what the merge leaves out
    assert torch.equal(adapted, again)  # unmerge puts the packed layer back, unchanged


def test_forward_masks_the_update_at_the_super_weight():
    torch.manual_seed(0)
    base = SuperWeightLinear.from_linear(nn.Linear(64, 16), bits=4, group_size=32, super_weights=[(3, 9)])
    layer = SuperWeightLoraLinear(base, "default", config=LoraConfig(r=4, init_lora_weights=False), r=4, lora_alpha=8)
    x = torch.zeros(1, 64)
    x[0, 9] = 1.0  # only the super weight's input column: the adapted output differs from the base everywhere but row 3
    with torch.no_grad():
        delta = layer(x) - base(x)
    full = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)[:, 9] * layer.scaling["default"]
    assert delta[0, 3].abs().item() < 1e-6 and full[3].abs().item() > 1e-4
    assert torch.allclose(delta[0, torch.arange(16) != 3], full[torch.arange(16) != 3], atol=1e-6)


@pytest.mark.parametrize("options", FORMATS[:3] + FORMATS[4:], ids=lambda o: f"bits{o['bits']}")
def test_input_gradient_is_grad_output_times_the_exact_weight(options):
    torch.manual_seed(0)
    dense = nn.Linear(96, 40)
    with torch.no_grad():
        dense.weight[5, 17] = 4.0
    kwargs = {k: v for k, v in options.items() if k != "group_size"}
    layer = SuperWeightLinear.from_linear(dense, group_size=options["group_size"] if options["group_size"] > 0 else 96, super_weights=[(5, 17)], **kwargs)
    g = torch.randn(3, 7, 40)
    assert torch.allclose(input_gradient(layer, g), g @ layer.dequantize_weight(), atol=1e-5)
    x = torch.randn(3, 7, 96, requires_grad=True)
    layer(x).backward(g)
    assert torch.allclose(x.grad, g @ layer.dequantize_weight(), atol=1e-5)
    assert torch.allclose(layer.bias.grad, g.sum((0, 1)), atol=1e-5)  # a bias trains as nn.Linear's does
    assert all(p.grad is None for n, p in layer.named_parameters() if n != "bias")


def test_backward_keeps_no_dense_weight_and_gives_no_gradient_to_the_format(tiny_llama):
    model = _quantized(tiny_llama, bits=4, group_size=32)
    peft_model = _lora(model)
    shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, SuperWeightLinear)}
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    ids = torch.arange(2, 23).reshape(3, 7)  # 21 tokens: no activation shares a weight's shape
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = peft_model(ids, labels=ids).loss
    assert not shapes & set(saved)  # no layer's [out, in] weight is kept for the backward
    loss.backward()
    with_grad = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_A" in n or "lora_B" in n for n in with_grad)
    assert all(not p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n)


def test_adapters_drop_the_decode_layouts_that_training_never_uses(tiny_llama):
    from optimum_superweight import prepare_kernels

    model = _quantized(tiny_llama, bits=4, group_size=32).to(torch.bfloat16)
    prepare_kernels(model)  # what a load does: decode and prefill layouts for every layer
    layers = [m for m in model.modules() if isinstance(m, SuperWeightLinear)]
    assert all(m.__dict__.get("_kernel_states") for m in layers)
    ids = torch.arange(2, 10).reshape(1, 8)
    with torch.no_grad():
        before = model(ids).logits
    peft_model = _lora(model)
    assert not any(m.__dict__.get("_kernel_states") for m in layers)  # the adapters' wrap released them
    with torch.no_grad():
        assert torch.equal(peft_model(ids).logits, before)  # rebuilt on demand, same outputs (B starts at zero)


def test_bfloat16_autocast_and_gradient_checkpointing(tiny_llama):
    model = _quantized(tiny_llama, bits=4, group_size=32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    peft_model = _lora(model)
    _random_adapters(peft_model)
    peft_model.train()
    ids = torch.arange(2, 34).reshape(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = peft_model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    reference = _quantized(build_tiny_model("llama", super_weights=[(1, 5, 7)]), bits=4, group_size=32)
    reference_peft = _lora(reference)
    _random_adapters(reference_peft)
    reference_peft.train()
    reference_peft(ids, labels=ids).loss.backward()  # float32, no checkpointing: the same gradients up to bfloat16
    first = next(p.grad for n, p in reference_peft.named_parameters() if "lora_A" in n)
    assert torch.allclose(grads[0], first, rtol=0.1, atol=0.05 * first.abs().max().item())


def test_quantizer_is_trainable_for_weight_only_not_w8a8():
    from optimum_superweight.models.quantizer import SuperWeightQuantizer

    assert SuperWeightQuantizer(SuperWeightConfig()).is_trainable
    w8a8 = SuperWeightConfig(bits=8, group_size=-1, activation_bits=8, massive_activation_ratio=None)
    assert not SuperWeightQuantizer(w8a8).is_trainable


def test_unsupported_lora_options_are_refused(tiny_llama):
    model = _quantized(tiny_llama, bits=4, group_size=32)
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        _lora(model, use_dora=True)


def _dataset(ids):
    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return {"input_ids": ids[i % len(ids)], "labels": ids[i % len(ids)]}

    return Rows()


def test_trainer_trains_saves_reloads_merges_and_requantizes(tiny_llama_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    config = SuperWeightConfig(bits=4, group_size=32, super_weights=SW, importance="none")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config)
    model.save_pretrained(tmp_path / "quantized")
    before = _packed_state(model)
    exact = model.get_submodule(MODULE).super_weight_values.clone()
    # Layers 2-3 only: adapters on layers 0-1 of this random model, trained on random tokens, learn to cancel the
    # planted mechanism itself (the driver channel, or a huge output column read from the massive input), and
    # detection would then rightly find nothing after the merge. Masking in layer 1 is tested above.
    linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = _lora(model, r=8, lora_alpha=16, target_modules=linear, layers_to_transform=[2, 3])
    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=12, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, gradient_checkpointing=True,
    )
    Trainer(model=peft_model, args=args, train_dataset=_dataset(ids)).train()
    after = _packed_state(peft_model.base_model.model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n][k], after[n][k]) for n in before for k in before[n])  # bit-exact codes, scales, super weights
    assert torch.equal(peft_model.base_model.model.get_submodule(MODULE).super_weight_values, exact)
    peft_model.eval()
    with torch.no_grad():
        trained_loss = peft_model(ids, labels=ids).loss.item()
        with peft_model.disable_adapter():
            base_loss = peft_model(ids, labels=ids).loss.item()
    assert trained_loss < base_loss - 0.05  # the adapters learnt the four sequences

    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = load_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "quantized"), str(tmp_path / "adapter"))
    same = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "quantized"), tmp_path / "adapter",
        config=prepare_lora_config(LoraConfig.from_pretrained(tmp_path / "adapter"), model),
    )
    with torch.no_grad():
        logits = peft_model(ids).logits
        assert torch.equal(reloaded(ids).logits, logits) and torch.equal(same(ids).logits, logits)

    merged = peft_model.merge_and_unload()
    assert type(merged.get_submodule("model.layers.2.mlp.down_proj")) is nn.Linear  # adapted: merged, dense
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, logits, atol=1e-4, rtol=1e-4)
    merged.dequantize()  # the layers left packed become dense too, and the quantization config goes
    assert not any(isinstance(m, SuperWeightLinear) for m in merged.modules())
    assert merged.get_submodule(MODULE).weight[ROW, COL].item() == exact.item()
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", quantization_config=SuperWeightConfig(bits=4, group_size=32))
    found = [(sw["module"], sw["row"], sw["col"]) for sw in again.config.quantization_config.super_weights]
    assert found == [PLANTED]  # detection finds the super weight the merge kept exact


def test_trainer_refuses_a_w8a8_model(tiny_llama_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    config = SuperWeightConfig(bits=8, group_size=-1, activation_bits=8, massive_activation_ratio=None, super_weights=SW)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config)
    peft_model = _lora(model)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="do not support training"):
        Trainer(model=peft_model, args=args, train_dataset=_dataset(torch.zeros(1, 8, dtype=torch.long)))


@pytest.mark.slow
def test_smollm2_lora_steps_lower_the_loss(smollm2_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.bfloat16, quantization_config=SuperWeightConfig())
    before = _packed_state(model)
    peft_model = _lora(model, r=8, lora_alpha=16)
    text = "The quick brown fox jumps over the lazy dog. " * 6
    batch = tokenizer([text], return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-3)
    peft_model.train()
    losses = []
    for _ in range(6):
        loss = peft_model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = _packed_state(peft_model.base_model.model)
    assert all(torch.equal(before[n][k], after[n][k]) for n in before for k in before[n])


@pytest.mark.parametrize("target", ["all-linear", ["q_proj", "down_proj"]], ids=["all-linear", "names"])
def test_plain_lora_config_is_refused_loudly_on_the_default_form(tiny_llama, target):
    """PEFT cannot reach our LoRA class without the config's mapping (see optimum_superweight.peft): the plain call
    must fail, never adapt only the layers left dense. If a PEFT release changes this, the prepare call may go."""
    model = _quantized(tiny_llama, bits=4, group_size=32)
    with pytest.raises(ValueError):  # PEFT's NoMatchingPeftModuleError is a ValueError too
        get_peft_model(model, LoraConfig(r=4, target_modules=target))
