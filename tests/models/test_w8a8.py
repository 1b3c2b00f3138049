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


def _config(scale="per_tensor", holdout=True, massive=None, **kwargs):
    """Without the massive-activation scan by default: the channels then follow from the coordinates alone."""
    return SuperWeightConfig(bits=8, group_size=-1, activation_bits=8, activation_scale=scale,
                             hold_out_super_activation=holdout, massive_activation_ratio=massive,
                             super_weights=[{"module": MODULE, "row": ROW, "col": COL}], **kwargs)


def _logits(model, seed=0):
    torch.manual_seed(seed)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_quantize_model_records_channels_and_holds_them_out(tiny_llama):
    reference = _logits(tiny_llama)
    config = _config()
    quantize_model(tiny_llama, config)
    # recorded on the model's config (what save_pretrained writes), not on the caller's
    assert tiny_llama.config.quantization_config.super_activation_channels == [ROW]
    assert config.super_activation_channels is None and config.activation_holdout is None
    layers = tiny_llama.model.layers
    assert isinstance(layers[2].self_attn.q_proj, SuperWeightW8A8Linear)
    assert layers[2].self_attn.q_proj.holdout_channels == [ROW]  # hidden-size input: the residual channel
    assert layers[1].mlp.down_proj.holdout_channels == [COL]  # its own super weight's input spike
    assert layers[2].mlp.down_proj.holdout_channels == []  # intermediate-size input
    assert not isinstance(tiny_llama.lm_head, SuperWeightW8A8Linear)
    summary = kernel_summary(tiny_llama, torch.float32)
    assert set(summary) <= {"cpu-onednn-w8a8", "cpu-w8a8"} and sum(summary.values()) == 28
    fast = _logits(tiny_llama)
    force_reference(True)
    try:
        ref = _logits(tiny_llama)
    finally:
        force_reference(False)
    assert (fast - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert (fast - reference).abs().max() < 0.05 * reference.abs().max()


def test_massive_activation_scan_finds_the_super_activation_and_respects_the_cap(tiny_llama):
    # No channel given: the calibration scan alone must find the residual channel the super weight inflates.
    config = _config(massive=20.0, super_activation_channels=[], max_holdout_channels=2)
    quantize_model(tiny_llama, config)
    layers = tiny_llama.model.layers
    assert ROW in layers[2].self_attn.q_proj.holdout_channels
    assert ROW in layers[3].mlp.gate_proj.holdout_channels
    assert COL in layers[1].mlp.down_proj.holdout_channels  # its own super weight's column, always
    modules = {n: m for n, m in tiny_llama.named_modules() if isinstance(m, SuperWeightW8A8Linear)}
    assert all(len(m.holdout_channels) <= 2 for m in modules.values())
    # what the modules hold out is what config.json records
    recorded = tiny_llama.config.quantization_config.activation_holdout
    assert recorded == {n: m.holdout_channels for n, m in modules.items() if m.holdout_channels}


def test_recorded_holdout_is_validated_against_the_model(tiny_llama):
    with pytest.raises(ValueError, match="activation_holdout names modules"):
        quantize_model(tiny_llama, _config(activation_holdout={"model.layers.9.mlp.nope": [1]}))
    with pytest.raises(ValueError, match=r"activation_holdout\['model.layers.0.mlp.down_proj'\].*\[0, 128\)"):
        quantize_model(tiny_llama, _config(activation_holdout={"model.layers.0.mlp.down_proj": [4096]}))


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
    assert config["activation_holdout"][MODULE] == [COL]
    assert config["activation_holdout"]["model.layers.3.mlp.up_proj"] == [ROW]
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
    """Per-tensor W8A8, 1024 tokens; the issue's goal is 75% of naive W8A8's loss recovered. On 4096 tokens
    (benchmarks/w8a8.py): full precision 14.99, naive x2.15, super activation alone held out x1.98 (15%:
    other massive down_proj inputs on the first token, e.g. L28 ch 678, L11 ch 1487, also set the scale),
    with the massive-activation scan (ratio 20, <= 8 channels per layer, on calibration text) x1.11 (90%)."""
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
    assert recovered >= 0.75, ppl


def test_smoothquant_migration_keeps_the_function_and_flattens_activations(tiny_llama):
    from optimum_superweight.models.calibration import calibration_token_ids, collect_input_absmax
    from optimum_superweight.models.w8a8 import smooth_activations, smoothing_groups

    groups = dict(smoothing_groups(tiny_llama))
    assert len(groups) == 12  # per layer: two norms and the gated up projection
    assert groups["model.layers.0.post_attention_layernorm"] == [
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"
    ]
    assert groups["model.layers.1.mlp.up_proj"] == ["model.layers.1.mlp.down_proj"]
    ids = calibration_token_ids(None, 256, vocab_size=260)
    probe = "model.layers.3.mlp.gate_proj"  # reads the residual stream that carries the super activation
    before_peaks = collect_input_absmax(tiny_llama, [probe], ids, window=128)[probe]
    expected = _logits(tiny_llama)
    factors = smooth_activations(tiny_llama, 0.5)
    assert torch.allclose(_logits(tiny_llama), expected, rtol=1e-4, atol=1e-4)
    after_peaks = collect_input_absmax(tiny_llama, [probe], ids, window=128)[probe]
    spread = lambda peaks: (peaks.max() / peaks.median()).item()  # noqa: E731
    assert spread(after_peaks) < spread(before_peaks) / 4
    assert factors["model.layers.3.post_attention_layernorm"].argmax().item() == ROW
    assert factors[MODULE.replace("down_proj", "up_proj")].argmax().item() == COL  # the super weight's input spike


def _projection_output(model, name="model.layers.3.self_attn.q_proj"):
    captured = []
    handle = model.get_submodule(name).register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        _logits(model)
    finally:
        handle.remove()
    return captured[0]


def test_smoothquant_w8a8_beats_naive_and_round_trips(tiny_llama_dir, tmp_path):
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    target = _projection_output(reference)
    naive = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=_config(holdout=False))
    smooth = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=_config(holdout=False, smoothquant_alpha=0.5)
    )
    # q_proj of layer 3 reads the residual stream that carries the super activation: per tensor, naively, that
    # one channel sets the scale of all. The migration leaves q_proj's full-precision output unchanged.
    error = lambda model: (_projection_output(model) - target).abs().mean().item()  # noqa: E731
    assert error(smooth) < error(naive) / 3
    smooth.save_pretrained(tmp_path / "s")
    saved = json.loads((tmp_path / "s" / "config.json").read_text())["quantization_config"]
    assert saved["smoothquant_alpha"] == 0.5
    norm = "model.layers.0.input_layernorm.weight"
    tensors = load_file(tmp_path / "s" / "model.safetensors")
    assert not torch.equal(tensors[norm], load_file(tiny_llama_dir / "model.safetensors")[norm])  # migrated
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "s")  # loads the migrated norms, migrates nothing
    assert torch.equal(_logits(again), _logits(smooth))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"smoothquant_alpha": 1.0}, r"smoothquant_alpha=1.0.*\(0, 1\)"),
        ({"smoothquant_alpha": True}, r"smoothquant_alpha=True"),
        ({"activation_bits": None, "bits": 4, "group_size": 64, "smoothquant_alpha": 0.5},
         r"smoothquant_alpha=0.5.*activation_bits=8"),
    ],
)
def test_smoothquant_config_validation(kwargs, message):
    base = {"bits": 8, "group_size": -1, "activation_bits": 8}
    with pytest.raises(ValueError, match=message):
        SuperWeightConfig(**{**base, **kwargs})


def test_smoothquant_names_unsupported_architectures():
    from optimum_superweight.models.w8a8 import smooth_activations
    from optimum_superweight.testing import build_tiny_model

    with pytest.raises(ValueError, match=r"model_type='gpt2'.*Llama-style.*smoothquant_alpha=None"):
        smooth_activations(build_tiny_model("gpt2"), 0.5)


def test_calibration_is_needed_for_the_scan_and_the_migration():
    scan = _config(massive=20.0)
    assert scan.needs_calibration  # the tokenizer is loaded: massive channels are found on real text
    assert not _config(massive=20.0, activation_holdout={MODULE: [COL]}).needs_calibration  # recorded already
    assert not _config(massive=None).needs_calibration
    assert _config(massive=None, smoothquant_alpha=0.5).needs_calibration


@pytest.mark.slow
def test_torch_compiled_model_matches_eager(tiny_llama):
    """A user's torch.compile(model) works: the oneDNN kernel is a graph break (Inductor lowers oneDNN's int8
    linear only for frozen weights), everything around it compiles."""
    quantize_model(tiny_llama, _config())
    ids = torch.randint(4, 250, (2, 64))  # 128 tokens per call: the oneDNN prefill kernel
    with torch.no_grad():
        eager = tiny_llama(input_ids=ids).logits
        compiled = torch.compile(tiny_llama)(input_ids=ids).logits
    assert tiny_llama.model.layers[2].self_attn.q_proj.kernel == "cpu-onednn-w8a8"
    assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-4)
