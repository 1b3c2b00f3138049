"""Model-level W8A8: quantize a tiny planted model, save/reload, and the SmolLM2 hold-out gain (slow)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import optimum_superweight  # noqa: F401  (registers the quantizer)
from optimum_superweight import SuperWeightConfig
from optimum_superweight.kernels import force_reference, kernel_summary
from optimum_superweight.models.replace import quantize_model
from optimum_superweight.models.w8a8 import super_activation_channels
from optimum_superweight.nn.w8a8 import SuperWeightW8A8Linear
from optimum_superweight.records import SuperWeight

MODULE, ROW, COL = "model.layers.1.mlp.down_proj", 5, 7


def _config(scale="per_tensor", holdout=True):
    return SuperWeightConfig(bits=8, group_size=-1, activation_bits=8, activation_scale=scale,
                             hold_out_super_activation=holdout, super_weights=[{"module": MODULE, "row": ROW, "col": COL}])


def _logits(model, seed=0):
    torch.manual_seed(seed)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_quantize_model_records_channels_and_holds_them_out(tiny_llama):
    reference = _logits(tiny_llama)
    config = _config()
    quantize_model(tiny_llama, config)
    assert config.super_activation_channels == [ROW]
    layers = tiny_llama.model.layers
    assert isinstance(layers[2].self_attn.q_proj, SuperWeightW8A8Linear)
    assert layers[2].self_attn.q_proj.holdout_channels == [ROW]  # hidden-size input: the residual channel
    assert layers[1].mlp.down_proj.holdout_channels == [COL]  # its own super weight's input spike
    assert layers[2].mlp.down_proj.holdout_channels == []  # intermediate-size input
    assert not isinstance(tiny_llama.lm_head, SuperWeightW8A8Linear)
    assert kernel_summary(tiny_llama, torch.float32) == {"cpu-w8a8": 28}
    fast = _logits(tiny_llama)
    force_reference(True)
    try:
        ref = _logits(tiny_llama)
    finally:
        force_reference(False)
    assert (fast - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert (fast - reference).abs().max() < 0.05 * reference.abs().max()


def test_naive_config_holds_nothing_out(tiny_llama):
    config = _config(holdout=False)
    quantize_model(tiny_llama, config)
    assert all(m.holdout_channels == [] for m in tiny_llama.modules() if isinstance(m, SuperWeightW8A8Linear))


@pytest.mark.parametrize("scale", ["per_tensor", "per_token"])
def test_save_reload_resave_identical_logits(tiny_llama_dir, tmp_path, scale):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=_config(scale))
    expected = _logits(model)
    model.save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert config["activation_bits"] == 8 and config["activation_scale"] == scale
    assert config["super_activation_channels"] == [ROW]
    tensors = load_file(tmp_path / "a" / "model.safetensors")  # the plain weight-only 8-bit layout
    assert tensors[f"{MODULE}.weight"].dtype == torch.uint8 and tensors[f"{MODULE}.weight"].dim() == 3
    assert not any("holdout" in key for key in tensors)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    layer = again.get_submodule(MODULE)
    assert isinstance(layer, SuperWeightW8A8Linear) and layer.activation_scale == scale
    assert layer.holdout_channels == [COL]
    assert again.model.layers[3].mlp.up_proj.holdout_channels == [ROW]
    assert torch.equal(_logits(again), expected)
    again.save_pretrained(tmp_path / "b")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "b")), expected)


def test_super_activation_channels_sources():
    records = [SuperWeight("model.layers.2.mlp.down_proj", 9, 3), SuperWeight("model.layers.3.mlp.down_proj", 9, 4)]
    assert super_activation_channels(records) == [9]


@pytest.mark.slow
def test_smollm2_holdout_recovers_naive_w8a8_loss(smollm2_path):
    """Per-tensor W8A8, 1024 tokens. Measured on 4096 tokens (benchmarks/w8a8.py): full precision 14.99, naive
    x2.10, super activation held out x1.96 (13% of the loss recovered: SmolLM2's per-tensor loss comes mostly
    from other massive down_proj inputs on the first token, e.g. L28 ch 678 ~2400, L11 ch 1487 ~1100). The test
    checks the direction with margin, not the issue's 75% goal, which this model does not reach."""
    from transformers import AutoTokenizer

    from optimum_superweight.evaluation import perplexity

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    sw = {"module": "model.layers.11.mlp.down_proj", "row": 507, "col": 1229}
    ppl = {}
    for name, config in (
        ("fp", None),
        ("naive", SuperWeightConfig(bits=8, group_size=-1, activation_bits=8, activation_scale="per_tensor",
                                    hold_out_super_activation=False, super_weights=[sw])),
        ("held", SuperWeightConfig(bits=8, group_size=-1, activation_bits=8, activation_scale="per_tensor",
                                   super_weights=[sw])),
    ):
        kwargs = {} if config is None else {"quantization_config": config}
        model = AutoModelForCausalLM.from_pretrained(smollm2_path, **kwargs)
        with torch.no_grad():
            ppl[name] = float(perplexity(model, tokenizer, max_tokens=1024, window=512))
    recovered = (ppl["naive"] - ppl["held"]) / (ppl["naive"] - ppl["fp"])
    assert ppl["naive"] > 1.3 * ppl["fp"]
    assert recovered > 0.03, ppl
