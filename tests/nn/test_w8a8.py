"""SuperWeightW8A8Linear: the int8 kernel against the fake-quant reference, and the exact hold-out."""

import pytest
import torch
from torch import nn

from optimum_superweight import SuperWeightConfig
from optimum_superweight.kernels import dense_threshold, force_reference, set_dense_threshold
from optimum_superweight.kernels import w8a8 as w8a8_kernels
from optimum_superweight.kernels.fused import fused_quantization_enabled, set_fused_quantization
from optimum_superweight.kernels.w8a8 import fake_quantize_activations, quantize_activations
from optimum_superweight.nn.w8a8 import SuperWeightW8A8Linear

SCALES = ("per_tensor", "per_token")


def _layer(scale, holdout=(5,), super_weights=((3, 5), (7, 11)), bias=True, seed=0):
    torch.manual_seed(seed)
    dense = nn.Linear(70, 37, bias=bias)  # odd sizes: no padding assumptions on CPU
    with torch.no_grad():
        for row, col in super_weights:
            dense.weight[row, col] = 4.0
    layer = SuperWeightW8A8Linear.from_linear(dense, activation_scale=scale, holdout_channels=holdout, super_weights=super_weights)
    return dense, layer


def _run(layer, x, reference):
    force_reference(reference)
    try:
        with torch.no_grad():
            return layer(x)
    finally:
        force_reference(False)


@pytest.fixture(params=["cpu-onednn-w8a8", "cpu-w8a8"])
def int8_kernel(request, monkeypatch):
    """Each CPU int8 kernel alone before the reference (the others are taken out of the registry)."""
    kept = [k for k in w8a8_kernels._W8A8_KERNELS if k.name in (request.param, "w8a8-reference")]
    monkeypatch.setattr(w8a8_kernels, "_W8A8_KERNELS", kept)
    if request.param == "cpu-onednn-w8a8":
        if not w8a8_kernels._onednn_available():
            pytest.skip("this torch build has no oneDNN int8 linear")
        previous = dense_threshold()
        set_dense_threshold(1)  # oneDNN otherwise leaves calls of few tokens to torch._int_mm
        request.addfinalizer(lambda: set_dense_threshold(previous))
    return request.param


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_matches_reference(scale, dtype, int8_kernel):
    dense, layer = _layer(scale)
    for seed, tokens in ((1, 1), (2, 9), (3, 64)):
        torch.manual_seed(seed)
        x = torch.randn(tokens, 70)
        x[0, 5] = 300.0  # the held-out spike
        x = x.to(dtype)
        fast = _run(layer, x, False)
        assert layer.kernel == int8_kernel
        ref = _run(layer, x, True)
        # Same int8 codes in both paths: only float32 summation order differs (int32 accumulation is exact).
        # Outputs are then rounded to the input dtype: bound 1e-5 relative (float32), 1 bf16 ulp (bfloat16).
        tolerance = 1e-5 if dtype == torch.float32 else 2 ** -7
        scale_ = ref.float().abs().max()
        assert (fast.float() - ref.float()).abs().max() <= tolerance * scale_ + 1e-6
    # ... and both are close to the dense layer (8-bit weights and activations)
    x = torch.randn(16, 70)
    error = (_run(layer, x, False) - dense(x)).abs().max() / dense(x).abs().max()
    assert error < 0.03


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("reference", [False, True])
def test_holdout_adds_back_exactly_the_channel_contribution(scale, reference):
    dense, layer = _layer(scale, holdout=(5, 20))
    weight = layer.dequantize_weight(torch.float32)  # super weight (3, 5) exact inside the held-out column
    assert weight[3, 5].item() == 4.0
    torch.manual_seed(4)
    x = torch.randn(6, 70)
    x[0, 5], x[2, 20] = 5000.0, -800.0
    without = x.clone()
    without[:, [5, 20]] = 0
    delta = _run(layer, x, reference) - _run(layer, without, reference)
    expected = x[:, [5, 20]] @ weight[:, [5, 20]].t()
    # The held-out values do not touch the activation scale: the difference is their exact contribution.
    assert torch.allclose(delta, expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("scale", SCALES)
def test_without_holdout_the_spike_costs_the_other_tokens(scale):
    dense, held = _layer(scale, holdout=(5,))
    _, naive = _layer(scale, holdout=())
    torch.manual_seed(5)
    x = torch.randn(8, 70)
    x[0, 5] = 5000.0
    with torch.no_grad():
        target = dense(x)[1:]  # the tokens without the spike
        error_naive = (naive(x)[1:] - target).abs().mean()
        error_held = (held(x)[1:] - target).abs().mean()
    if scale == "per_tensor":  # one value sets every token's scale: naively, the other tokens are lost
        assert error_naive > 20 * error_held
    else:  # per token, only the spiking token's own scale is affected: the others are equally good
        assert error_naive < 1.5 * error_held


def test_quantize_activations_semantics():
    x = torch.tensor([[1.0, -2.0, 1000.0], [0.5, 0.0, 0.0]])
    codes, scale = quantize_activations(x, torch.tensor([2]), "per_token")
    assert codes.dtype == torch.int8 and codes[:, 2].tolist() == [0, 0]
    assert torch.allclose(scale.squeeze(1), torch.tensor([2 / 127, 0.5 / 127]))
    fake = fake_quantize_activations(x, torch.tensor([2]), "per_tensor")
    assert fake[0, 2].item() == 1000.0 and fake[0, 1].item() == -2.0
    zero_codes, zero_scale = quantize_activations(torch.zeros(2, 3), None, "per_tensor")
    assert zero_codes.abs().sum() == 0 and zero_scale.item() == 1.0
    with pytest.raises(ValueError, match="per_channel"):
        quantize_activations(x, None, "per_channel")


def test_module_validation_and_state_dict_layout():
    with pytest.raises(ValueError, match="activation_scale='x'"):
        SuperWeightW8A8Linear(8, 8, bias=False, activation_scale="x")
    with pytest.raises(ValueError, match="holdout_channels"):
        SuperWeightW8A8Linear(8, 8, bias=False, holdout_channels=[8])
    _, layer = _layer("per_token")
    state = layer.state_dict()
    assert set(state) == {"weight", "weight_scale", "super_weight_indices", "super_weight_values", "bias"}
    assert state["weight"].dtype == torch.uint8 and state["weight"].shape == (37, 1, 70)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"activation_bits": 4}, "activation_bits"),
        ({"activation_bits": True}, "activation_bits"),
        ({"activation_bits": 8, "activation_scale": "per_channel"}, "activation_scale"),
        ({"activation_bits": 8, "hold_out_super_activation": "yes"}, "hold_out_super_activation"),
        ({"activation_bits": 8, "super_activation_channels": [-1]}, "super_activation_channels"),
        ({"activation_bits": 8, "group_size": 64}, "group_size"),
        ({"activation_bits": 8, "bits": 4, "group_size": -1}, "bits"),
        ({"activation_bits": 8, "symmetric": False}, "symmetric"),
        ({"activation_bits": 8, "method": "gptq"}, "method"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    base = {"bits": 8, "group_size": -1}
    with pytest.raises(ValueError, match=f"SuperWeightConfig.{field}=.*accepted"):
        SuperWeightConfig(**{**base, **kwargs})


def test_config_defaults_are_weight_only_and_round_trip():
    assert SuperWeightConfig().activation_bits is None
    config = SuperWeightConfig(bits=8, group_size=-1, activation_bits=8, activation_scale="per_tensor",
                               super_activation_channels=[507])
    again = SuperWeightConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict() and again.super_activation_channels == [507]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scale", SCALES)
def test_cuda_kernel_matches_reference(scale):
    _, layer = _layer(scale)
    layer = layer.cuda()
    x = torch.randn(5, 70, device="cuda")
    x[0, 5] = 300.0
    fast = _run(layer, x, False)
    assert layer.kernel == "cuda-w8a8"
    ref = _run(layer, x, True)
    assert (fast - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-6


def test_cpu_kernel_choice_depends_on_tokens_per_call():
    if not w8a8_kernels._onednn_available():
        pytest.skip("this torch build has no oneDNN int8 linear")
    _, layer = _layer("per_tensor")
    with torch.no_grad():
        layer(torch.randn(1, 70))
        assert layer.kernel == "cpu-w8a8"  # decode: least per-call overhead
        layer(torch.randn(dense_threshold(), 70))
        assert layer.kernel == "cpu-onednn-w8a8"  # prefill: oneDNN's int8 GEMM


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "torch.compile"])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_quantizer_gives_the_reference_codes_and_scales(scale, dtype, fused):
    if not w8a8_kernels._onednn_available():
        pytest.skip("this torch build has no oneDNN int8 linear")
    torch.manual_seed(6)
    x = (torch.randn(33, 70) * 3).to(dtype)
    x[4, 9] = 900.0
    x[0, 0], x[0, 12], x[0, 13] = 127.0, 2.5, -3.5  # scale 1 for row 0 (and the tensor): codes on exact ties
    holdout = torch.tensor([9, 30])
    keep = None
    if fused:
        keep = torch.ones(70, dtype=dtype)
        keep[holdout] = 0
    codes, scales = quantize_activations(x, holdout, scale)
    fast = w8a8_kernels.quantize_activations_onednn(x, holdout, scale, keep)
    if fused:
        assert fused_quantization_enabled(), "torch.compile failed here: see the logged warning"
    # uint8 codes offset by 128 (the format oneDNN runs natively on every x86 CPU), the reference's otherwise.
    assert fast.codes.dtype == torch.uint8 and torch.equal(fast.codes.to(torch.int16) - 128, codes.to(torch.int16))
    signed = fast.signed_codes()
    assert signed.dtype == torch.int8 and torch.equal(signed, codes)
    assert signed[0, 12].item() == 2 and signed[0, 13].item() == -4  # round half to even, as torch.round
    if scale == "per_tensor":
        assert fast.token_scale is None and fast.x_scale == pytest.approx(scales.item(), rel=1e-7)
    else:
        assert fast.x_scale == 1.0 and torch.equal(fast.token_scale, scales)
    assert torch.equal(x[4, 9], torch.tensor(900.0, dtype=dtype))  # the caller's tensor is left intact
    # A tie that multiplying by 1/s rounds the other way: x / s = -63.5 exactly with s = 5.65625 / 127 in float32.
    small = (torch.randn(33, 70) * 0.5).clamp(-2, 2).to(dtype)
    small[0, 0], small[0, 1] = 5.65625, -2.828125
    tie = w8a8_kernels.quantize_activations_onednn(small, holdout, scale, keep)
    tie_codes = tie.signed_codes()
    assert tie_codes[0, 1].item() == -64 and torch.equal(tie_codes, quantize_activations(small, holdout, scale)[0])


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch, caplog):
    from optimum_superweight.kernels import fused

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(fused, "_compiled", {})
    monkeypatch.setattr(fused.torch, "compile", broken)
    x = torch.randn(8, 70)
    try:
        with caplog.at_level("WARNING", logger=fused.__name__):
            result = w8a8_kernels.quantize_activations_onednn(x, None, "per_tensor", torch.ones(70))
        assert "no C++ compiler found" in caplog.text and "OPTIMUM_SUPERWEIGHT_COMPILE=0" in caplog.text
        assert not fused_quantization_enabled()
        assert torch.equal(result.signed_codes(), quantize_activations(x, None, "per_tensor")[0])
    finally:
        set_fused_quantization(True)
    assert fused_quantization_enabled()


def _count_quantizations(monkeypatch):
    calls = []
    original = w8a8_kernels.quantize_activations_onednn
    monkeypatch.setattr(w8a8_kernels, "quantize_activations_onednn", lambda *a: calls.append(1) or original(*a))
    return calls


def test_projections_fed_the_same_input_quantize_it_once(monkeypatch):
    if not w8a8_kernels._onednn_available():
        pytest.skip("this torch build has no oneDNN int8 linear")
    calls = _count_quantizations(monkeypatch)
    _, first = _layer("per_tensor", holdout=(5,), seed=0)
    _, second = _layer("per_tensor", holdout=(5,), seed=1)
    _, other_holdout = _layer("per_tensor", holdout=(6,), seed=2)
    x = torch.randn(80, 70, dtype=torch.bfloat16)  # >= dense_threshold(): the oneDNN kernel
    with torch.no_grad():
        shared = (first(x), second(x))
        assert first.kernel == second.kernel == "cpu-onednn-w8a8" and len(calls) == 1
        other_holdout(x)  # different held-out channels: its own codes
        assert len(calls) == 2
        first(x), second(x.clone())  # another tensor with the same values: quantized again
        assert len(calls) == 4
        x.mul_(2)  # changed in place: the version counter moves, the codes are recomputed
        doubled = second(x)
        assert len(calls) == 5
    force_reference(True)
    try:
        with torch.no_grad():
            assert torch.allclose(doubled.float(), second(x).float(), rtol=2 ** -7, atol=1e-2)
            assert torch.allclose(shared[1].float(), second(x / 2).float(), rtol=2 ** -7, atol=1e-2)
    finally:
        force_reference(False)


def test_inference_tensors_are_not_shared(monkeypatch):
    if not w8a8_kernels._onednn_available():
        pytest.skip("this torch build has no oneDNN int8 linear")
    calls = _count_quantizations(monkeypatch)
    _, layer = _layer("per_token")
    with torch.inference_mode():
        x = torch.randn(80, 70)
        layer(x)
        x.mul_(3)  # inference tensors keep no version counter: an in-place change would go unseen
        out = layer(x)
    assert len(calls) == 2
    force_reference(True)
    try:
        with torch.inference_mode():
            assert torch.allclose(out, layer(x), rtol=1e-5, atol=1e-4)
    finally:
        force_reference(False)
