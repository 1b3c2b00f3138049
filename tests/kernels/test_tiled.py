"""``cpu-tiled``, the compiled 4-bit kernel: bit-exact weights, reference outputs, clean fallback.

The decoded weights must be bit-identical to ``dequantize_weight(dtype)`` for every storage form; the outputs
then equal the reference kernel's up to GEMM summation order (bounds: bfloat16 2e-3 relative, a few output
roundings flipped by a different blocking; float32 1e-5). The library is built once per machine (about 30-60 s
the first time, then cached); without a C++ compiler set ``OPTIMUM_SUPERWEIGHT_NATIVE=0`` to skip these tests.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from torch import nn

from optimum_superweight import SuperWeightLinear, kernels
from optimum_superweight.kernels import build, tiled
from optimum_superweight.kernels.tiled import TiledCpuKernel

CPU = torch.device("cpu")
KERNEL = TiledCpuKernel()
BF16_BOUND = 2e-3
FP32_BOUND = 1e-5


@pytest.fixture(scope="module")
def built():
    """The compiled library (built where the CPU has AVX-512: see tiled.CPU_FEATURES)."""
    if os.environ.get("OPTIMUM_SUPERWEIGHT_NATIVE", "1").strip().lower() in ("0", "false"):
        pytest.skip("OPTIMUM_SUPERWEIGHT_NATIVE=0")
    module = build.load("tiled_linear", requires=tiled.CPU_FEATURES)
    if module is None and "this CPU lacks" in (build.native_failure("tiled_linear") or ""):
        pytest.skip(build.native_failure("tiled_linear"))
    assert module is not None, build.native_failure("tiled_linear")  # a machine with g++ and ninja must build it
    return module


@pytest.fixture(scope="module")
def library(built):
    """The kernel in the dispatcher: needs the AVX-512 decoder (the scalar one would lose to cpu-dense)."""
    if tiled.unavailable() is not None:
        pytest.skip(tiled.unavailable())
    return built


#: (symmetric, zero_point): float offsets (the default method), uint8 zero-points, symmetric codes.
FORMS = [(False, "float"), (False, "uint8"), (True, "uint8")]


def _layer(out_features, in_features, *, group_size, symmetric, zero_point, bias=True, super_weights=((5, 7),), seed=0, bits=4):
    torch.manual_seed(seed)
    dense = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        for row, col in super_weights:
            dense.weight[row, col] = 4.0
    return SuperWeightLinear.from_linear(
        dense, bits=bits, group_size=group_size, symmetric=symmetric, zero_point=zero_point, super_weights=list(super_weights)
    )


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("symmetric, zero_point", FORMS)
@pytest.mark.parametrize("out_features, in_features, group_size", [(64, 256, 32), (96, 200, 64), (48, 384, 128), (40, 100, -1), (32, 144, 48)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_decoded_weights_are_the_reference_bit_for_bit(built, symmetric, zero_point, out_features, in_features, group_size, dtype, bits):
    layer = _layer(out_features, in_features, group_size=group_size, symmetric=symmetric, zero_point=zero_point,
                   super_weights=[(5, 7), (out_features - 1, in_features - 1)], bits=bits)
    state = KERNEL.prepare(layer, CPU, dtype)
    decoded = KERNEL.dequantize(layer, state, dtype)
    expected = layer.dequantize_weight(dtype)
    assert decoded.dtype == dtype and torch.equal(decoded, expected)
    assert decoded[5, 7] == torch.tensor(4.0, dtype=dtype)  # the super weight, exact


@pytest.mark.parametrize("symmetric, zero_point", FORMS)
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("tokens", [1, 16, 100])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_outputs_match_the_reference_kernel(library, symmetric, zero_point, group_size, tokens, dtype):
    layer = _layer(96, 384, group_size=group_size, symmetric=symmetric, zero_point=zero_point)
    _check_outputs(layer, tokens, dtype, "cpu-int4")


@pytest.mark.parametrize("symmetric, zero_point", FORMS)
@pytest.mark.parametrize("group_size", [64, -1])
@pytest.mark.parametrize("tokens", [1, 16, 100])
@pytest.mark.parametrize("bits", [2, 3, 6, 8])
def test_other_widths_outputs_match_the_reference_kernel(library, symmetric, zero_point, group_size, tokens, bits):
    layer = _layer(48, 200, group_size=group_size, symmetric=symmetric, zero_point=zero_point, bits=bits)
    # Up to INT4_TOKENS: cpu-int4 where it takes the layout (groups of a multiple of 32; a 200-wide row is not one),
    # cpu-tiled's register path everywhere else (5- to 8-bit per-row layers too: faster than cpu-int8).
    decode = "cpu-int4" if group_size == 64 and bits <= 4 else "cpu-tiled"
    _check_outputs(layer, tokens, torch.bfloat16, decode)


#: Per-element bounds against float64 arithmetic: the output's rounding (half a unit in the last place, with
#: margin) plus float32 accumulation over the products' magnitudes.
ROUNDING = {torch.bfloat16: 2**-8, torch.float16: 2**-10, torch.float32: 2**-22}


def _float64_reference(layer, x):
    """x @ W^T + b in float64, W as the kernel multiplies it: the reference's decoded weights (bfloat16 input: in
    bfloat16, as the register path rounds them; otherwise float32), the bias in the input dtype."""
    weight = layer.dequantize_weight(torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32).double()
    y = x.double() @ weight.T
    if layer.bias is not None:
        y = y + layer.bias.detach().to(x.dtype).double()
    return y, x.double().abs() @ weight.abs().T


def _assert_close_to_float64(out, layer, x):
    expected, magnitude = _float64_reference(layer, x)
    error = (out.double() - expected).abs()
    bound = ROUNDING[x.dtype] * expected.abs() + 1e-6 * (magnitude + 1)
    assert (error <= bound).all(), f"max error {error.max().item():.3g}, worst ratio {(error / bound).max().item():.3g}"


class _Calls:
    """The native library, counting which entry point ran."""

    def __init__(self, library):
        self.library, self.names = library, []

    def __getattr__(self, name):
        self.names.append(name)
        return getattr(self.library, name)


@pytest.mark.parametrize("symmetric, zero_point", FORMS)
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_few_tokens_multiply_in_registers(library, monkeypatch, symmetric, zero_point, group_size, dtype, bits):
    """1 to 11 tokens (16 for byte codes): no tile, every storage form and width; odd shapes (rows not a multiple of the row block,
    a ragged last group, groups not a multiple of 32 per row); super weights at their exact value."""
    calls = _Calls(library)
    monkeypatch.setattr(tiled, "_library", lambda: calls)
    for out_features, in_features in ((37, 200), (66, 2 * max(group_size, 48) + 16)):
        layer = _layer(out_features, in_features, group_size=group_size, symmetric=symmetric, zero_point=zero_point,
                       super_weights=[(5, 7), (out_features - 1, in_features - 1)], bits=bits, seed=bits)
        state = KERNEL.prepare(layer, CPU, dtype)
        for tokens in range(1, (tiled.BYTE_TOKENS if bits >= 5 else tiled.MIN_TOKENS - 1) + 1):
            x = torch.randn(tokens, in_features, dtype=dtype)
            with torch.no_grad():
                out = KERNEL.run(layer, state, x)
            assert out.dtype == dtype and out.shape == (tokens, out_features)
            _assert_close_to_float64(out, layer, x)
    assert set(calls.names) == {"small_linear"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("symmetric, zero_point", FORMS)
def test_few_tokens_count_super_weights_at_their_exact_value(library, dtype, symmetric, zero_point):
    row, col, value = 11, 1229, 5.875
    layer = _layer(576, 1536, group_size=64, symmetric=symmetric, zero_point=zero_point, super_weights=[(row, col)],
                   bits=6)
    x = (torch.randn(4, 1536) * 0.01).to(dtype)
    x[:, col] = 2996.0  # the super activation
    with torch.no_grad():
        layer.super_weight_values.fill_(value)
        with_sw = layer(x)
        layer.super_weight_values.zero_()
        without = layer(x)
    assert layer.kernel == "cpu-tiled"
    assert torch.equal(with_sw[:, :row], without[:, :row]) and torch.equal(with_sw[:, row + 1 :], without[:, row + 1 :])
    contribution = with_sw[:, row].float() - without[:, row].float()
    spacing = 128.0 if dtype == torch.bfloat16 else 0.01  # output near 17,600: bfloat16 spacing 128
    assert (contribution - x[:, col].float() * value).abs().max().item() <= spacing


def test_few_tokens_give_the_same_rows_on_any_thread_count(library):
    layer = _layer(200, 256, group_size=64, symmetric=False, zero_point="float", bits=6, super_weights=[(5, 7), (150, 9)])
    state = KERNEL.prepare(layer, CPU, torch.bfloat16)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    before = torch.get_num_threads()
    try:
        outputs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                outputs.append(KERNEL.run(layer, state, x))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outputs[0], outputs[1])  # rows are independent: blocks of rows split over threads


def test_few_tokens_pick_per_layer_format(library):
    """bfloat16 decode: cpu-int4 up to INT4_TOKENS where it takes the layer, else the register path (5- to 8-bit
    layers, grouped or one scale per row, at every count); float32/float16 input: the register path."""
    torch.manual_seed(0)
    cases = [(4, 64, "cpu-int4"), (3, 64, "cpu-int4"), (2, 32, "cpu-int4"), (6, 64, "cpu-tiled"), (8, -1, "cpu-tiled"),
             (5, -1, "cpu-tiled"), (7, 128, "cpu-tiled")]
    for bits, group_size, few in cases:
        layer = SuperWeightLinear.from_linear(nn.Linear(256, 64), bits=bits, group_size=group_size)
        for tokens in (1, tiled.INT4_TOKENS):
            assert kernels.select_kernel(layer, torch.bfloat16, CPU, tokens).label == few, (bits, group_size, tokens)
        for tokens in (tiled.INT4_TOKENS + 1, tiled.MIN_TOKENS - 1):
            assert kernels.select_kernel(layer, torch.bfloat16, CPU, tokens).label == "cpu-tiled", (bits, tokens)
        assert kernels.select_kernel(layer, torch.float16, CPU, 1).label == "cpu-tiled"


def _check_outputs(layer, tokens, dtype, decode_kernel):
    x = torch.randn(tokens, layer.in_features, dtype=dtype)
    with torch.no_grad():
        out = layer(x)
        expected = kernels.REFERENCE.run(layer, None, x)
    uses_tiled = dtype == torch.float32 or tokens >= tiled.MIN_TOKENS
    assert layer.kernel == ("cpu-tiled" if uses_tiled else decode_kernel)
    assert out.dtype == dtype and out.shape == (tokens, layer.out_features)
    assert _rel(out, expected) < (FP32_BOUND if dtype == torch.float32 else 1e-2 if not uses_tiled else BF16_BOUND)


@pytest.mark.parametrize("threads", [1, 2])
def test_many_tiles_and_threads_give_the_one_tile_result(library, monkeypatch, threads):
    layer = _layer(200, 256, group_size=64, symmetric=False, zero_point="float", super_weights=[(5, 7), (150, 9)])
    x = torch.randn(3, 40, 256, dtype=torch.bfloat16)
    state = KERNEL.prepare(layer, CPU, torch.bfloat16)
    with torch.no_grad():
        one_tile = KERNEL.run(layer, state, x)
        monkeypatch.setattr(tiled, "_TILE_BYTES", 16 * 256 * 2)  # 16 rows per tile: 13 tiles, a short last one
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            assert tiled.tile_rows(200, 256, 2, threads) == 16
            tiles = KERNEL.run(layer, state, x)
        finally:
            torch.set_num_threads(before)
    assert tiles.shape == (3, 40, 200)
    assert _rel(tiles, one_tile) < BF16_BOUND
    assert _rel(tiles, kernels.REFERENCE.run(layer, None, x)) < BF16_BOUND


def test_super_weight_contribution_is_exact(library):
    row, col, value = 11, 1229, 5.875
    layer = _layer(576, 1536, group_size=64, symmetric=False, zero_point="float", super_weights=[(row, col)])
    x = torch.randn(64, 1536).bfloat16() * 0.01
    x[:, col] = 2996.0  # the super activation
    with torch.no_grad():
        layer.super_weight_values.fill_(value)
        with_sw = layer(x)
        layer.super_weight_values.zero_()  # in-place change: the kernel state must notice
        without = layer(x)
    assert layer.kernel == "cpu-tiled"
    # The tile holds the exact value (then 0) at the super weight, not the code's nearest value: the rest agrees.
    assert torch.equal(with_sw[:, :row], without[:, :row]) and torch.equal(with_sw[:, row + 1 :], without[:, row + 1 :])
    contribution = with_sw[:, row].float() - without[:, row].float()
    expected = x[:, col].float() * value
    assert (contribution - expected).abs().max().item() <= 128.0  # bfloat16 output near 17,600: spacing 128


def test_token_bands_pick_per_call(library):
    layer = _layer(64, 256, group_size=64, symmetric=False, zero_point="float")
    with torch.no_grad():
        cases = ((1, "cpu-int4"), (tiled.MIN_TOKENS, "cpu-tiled"), (200, "cpu-tiled"), (3, "cpu-int4"), (8, "cpu-tiled"), (4, "cpu-int4"))
        for tokens, expected in cases:
            layer(torch.randn(tokens, 256, dtype=torch.bfloat16))
            assert layer.kernel == expected, tokens


def test_inputs_that_need_gradients_run_it_and_get_the_weights_gradient(library):
    layer = _layer(64, 256, group_size=64, symmetric=True, zero_point="uint8")
    x = torch.randn(20, 256, requires_grad=True)
    layer(x).sum().backward()
    assert layer.kernel == "cpu-tiled"
    expected = layer.dequantize_weight(torch.float32).sum(0).expand(20, -1)  # d(sum y)/dx, super weights exact
    assert torch.allclose(x.grad, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer(x)
    assert layer.kernel == "cpu-tiled"


@pytest.mark.parametrize("bits", [5, 6, 7])
def test_five_to_seven_bit_layers_run_as_byte_codes(library, bits):
    torch.manual_seed(0)
    layer = SuperWeightLinear.from_linear(nn.Linear(256, 64), bits=bits, group_size=64)
    assert kernels.select_kernel(layer, torch.bfloat16, CPU, 100).label == "cpu-tiled"
    state = KERNEL.prepare(layer, CPU, torch.bfloat16)
    assert state.bits == 8 and state.codes.shape == (64, 4, 64)


def test_a_failing_build_falls_back_with_one_log_line(monkeypatch, caplog):
    def broken(name, requires=()):
        raise RuntimeError("Error building extension 'tiled_linear': g++: not found")

    monkeypatch.setattr(build, "_compile", broken)
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(build, "_failures", {})
    layer = _layer(96, 384, group_size=64, symmetric=False, zero_point="float")
    x = torch.randn(100, 384, dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger=build.__name__), torch.no_grad():
        out = layer(x)
        _layer(96, 384, group_size=64, symmetric=False, zero_point="float", seed=1)(x)
    assert layer.kernel == "cpu-dense"
    assert _rel(out, kernels.REFERENCE.run(layer, None, x)) < 1e-2
    reason = kernels.select_kernel(layer, torch.bfloat16, CPU, 100).reason
    assert "cpu-tiled: native build failed (RuntimeError: Error building extension 'tiled_linear': g++: not found)" in reason
    failures = [r for r in caplog.records if "no native CPU kernel" in r.getMessage()]
    assert len(failures) == 1 and "g++: not found" in failures[0].getMessage()
    with torch.no_grad():  # float32 inputs: the bfloat16 kernels (the default float32 policy, "auto") ...
        layer(x.float())
    assert layer.kernel == "cpu-dense+bf16-cast"
    policy = kernels.float32_policy()
    kernels.set_float32_policy("reference")
    try:
        with torch.no_grad():  # ... or, with float32 arithmetic only, the reference kernel
            layer(x.float())
    finally:
        kernels.set_float32_policy(policy)
    assert layer.kernel == "reference"


def test_it_can_be_turned_off(library):
    layer = _layer(96, 384, group_size=64, symmetric=False, zero_point="float")
    kernels.set_native_kernels(False)
    try:
        selection = kernels.select_kernel(layer, torch.bfloat16, CPU, 100)
        assert selection.label == "cpu-dense" and "OPTIMUM_SUPERWEIGHT_NATIVE=0" in selection.reason
    finally:
        kernels.set_native_kernels(True)
    assert kernels.select_kernel(layer, torch.bfloat16, CPU, 100).label == "cpu-tiled"


def test_invalid_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("OPTIMUM_SUPERWEIGHT_NATIVE", "maybe")
    with pytest.raises(ValueError, match="OPTIMUM_SUPERWEIGHT_NATIVE='maybe'"):
        build._env_enabled()


@pytest.mark.slow
def test_a_build_without_avx512_decodes_exactly_and_steps_aside(built, monkeypatch):
    """CPUs without AVX-512 get the scalar decoder: still bit-exact, but the dispatcher leaves it (cpu-dense is
    faster). Compiled here for x86-64-v2 (a second build, about a minute)."""
    monkeypatch.setattr(build, "_FLAGS", ["-O3", "-march=x86-64-v2", "-ffp-contract=off"])
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(build, "_failures", {})
    scalar = build.load("tiled_linear")
    assert scalar is not None and not scalar.vectorized()
    for bits in (2, 3, 4, 6, 8):
        for symmetric, zero_point in FORMS:
            layer = _layer(40, 200, group_size=64, symmetric=symmetric, zero_point=zero_point, bits=bits)
            for dtype in (torch.bfloat16, torch.float32, torch.float16):
                state = KERNEL.prepare(layer, CPU, dtype)
                assert torch.equal(KERNEL.dequantize(layer, state, dtype), layer.dequantize_weight(dtype))
    assert "without AVX-512" in tiled.unavailable()
    assert kernels.select_kernel(layer, torch.bfloat16, CPU, 100).label == "cpu-dense"
