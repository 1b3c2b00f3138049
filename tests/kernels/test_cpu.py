"""Every kernel path against the reference, on random inputs.

Error bounds (relative Frobenius error of the layer output against the exact float32 computation
``x @ dequantize_weight(float32)^T + b`` on the same codes):

- float32 reference kernel: 1e-5 (it *is* that computation, up to summation order);
- bfloat16 paths (``cpu-int4``, ``cpu-int8``, ``cpu-dense``, ``reference`` with bfloat16 input): 1e-2.
  Sources: activations rounded to bfloat16 (2^-9 relative), scales rounded to bfloat16 in the int kernels
  (2^-9), bfloat16 outputs (2^-9). Observed at most 3.4e-3 for every path, the same as the reference
  kernel itself with bfloat16 input (3.3e-3).
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from optimum_superweight import SuperWeightLinear
from optimum_superweight import kernels
from optimum_superweight.kernels import (
    kernel_summary,
    prepare_kernels,
    select_kernel,
    set_dense_threshold,
    set_float32_policy,
)
from optimum_superweight.kernels.cpu import int4_kernel_group

BF16_BOUND = 1e-2
FP32_BOUND = 1e-5
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _default_settings():
    threshold, policy = kernels.dense_threshold(), kernels.float32_policy()
    yield
    set_dense_threshold(threshold)
    set_float32_policy(policy)
    kernels.set_native_kernels(True)


def _native() -> bool:
    """Whether cpu-tiled is available here (built once per machine; OPTIMUM_SUPERWEIGHT_NATIVE=0 turns it off)."""
    return kernels.tiled.unavailable() is None


def _without_native():
    # These tests are about the PyTorch kernels, which also serve as cpu-tiled's fallback (tests/kernels/test_tiled.py).
    kernels.set_native_kernels(False)


def _layer(out_features, in_features, *, bits, group_size, symmetric=True, bias=False, super_weights=(), seed=0, zero_point="uint8"):
    torch.manual_seed(seed)
    dense = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        for row, col in super_weights:
            dense.weight[row, col] = 4.0  # far outside the group's range: clearly a held-out outlier
    quantized = None
    if zero_point == "float":  # the default method's codes (HQQ grids, float offsets)
        from optimum_superweight.tensor.hqq import hqq_quantize_weight

        holdout = torch.tensor(list(super_weights), dtype=torch.long).reshape(-1, 2)
        quantized = hqq_quantize_weight(dense.weight, bits=bits, group_size=group_size, holdout=holdout)
    return SuperWeightLinear.from_linear(
        dense, bits=bits, group_size=group_size, symmetric=symmetric, super_weights=list(super_weights),
        quantized=quantized, zero_point=zero_point,
    )


def _exact(layer, x):
    """float32 ground truth on the layer's own codes (super weights exact)."""
    weight = layer.dequantize_weight(torch.float32)
    bias = None if layer.bias is None else layer.bias.float()
    return nn.functional.linear(x.float(), weight, bias)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# batch 1 (decode) and 8 x 16 tokens; the SmolLM2 shapes, 2048-wide, and a ragged one
SHAPES = [(576, 1536), (1536, 576), (192, 576), (64, 200)]
INPUTS = [(1, 1), (8, 16)]


def _decode_everything():
    # Forces the int kernels even for 8 x 16 tokens, so that they are tested on many rows too.
    set_dense_threshold(10**9)
    _without_native()


@pytest.mark.parametrize("out_features, in_features", SHAPES)
@pytest.mark.parametrize("bits, group_size, symmetric", [(4, 32, True), (4, 64, False), (4, 128, True), (4, 256, False), (4, -1, True), (3, 64, True), (2, 128, False)])
@pytest.mark.parametrize("batch, seq", INPUTS)
def test_int4_kernel_matches_reference(out_features, in_features, bits, group_size, symmetric, batch, seq):
    _decode_everything()
    layer = _layer(out_features, in_features, bits=bits, group_size=group_size, symmetric=symmetric, bias=True, super_weights=[(5, 7)])
    group = layer.layout.effective_group_size
    x = torch.randn(batch, seq, in_features)
    expected = _exact(layer, x)
    out = layer(x.bfloat16())
    if int4_kernel_group(group) is None:
        assert layer.kernel == "cpu-dense"  # e.g. group 200 (per row of 200 inputs): not a multiple of 32
    else:
        assert layer.kernel == "cpu-int4"
    assert out.dtype == torch.bfloat16 and out.shape == (batch, seq, out_features)
    assert _rel(out, expected) < BF16_BOUND
    reference = kernels.REFERENCE.run(layer, None, x.bfloat16())
    assert _rel(out, reference) < BF16_BOUND


@pytest.mark.parametrize("out_features, in_features", SHAPES + [(48, 100)])
@pytest.mark.parametrize("bits, symmetric", [(8, True), (8, False), (6, True), (5, False)])
@pytest.mark.parametrize("batch, seq", INPUTS)
def test_int8_kernel_matches_reference(out_features, in_features, bits, symmetric, batch, seq):
    _decode_everything()
    layer = _layer(out_features, in_features, bits=bits, group_size=-1, symmetric=symmetric, bias=True, super_weights=[(3, 9)])
    x = torch.randn(batch, seq, in_features)
    out = layer(x.bfloat16())
    assert layer.kernel == "cpu-int8"
    assert _rel(out, _exact(layer, x)) < BF16_BOUND


@pytest.mark.parametrize("out_features, in_features", SHAPES)
@pytest.mark.parametrize("bits, group_size, symmetric", [(4, 64, True), (4, 128, False), (8, 128, True), (3, 48, False), (8, -1, False)])
def test_dense_prefill_kernel_matches_reference(out_features, in_features, bits, group_size, symmetric):
    _without_native()
    layer = _layer(out_features, in_features, bits=bits, group_size=group_size, symmetric=symmetric, super_weights=[(2, 3)])
    x = torch.randn(8, 16, in_features)  # 128 tokens >= the default threshold of 64
    out = layer(x.bfloat16())
    assert layer.kernel == "cpu-dense"
    assert _rel(out, _exact(layer, x)) < BF16_BOUND


@pytest.mark.parametrize("bits, group_size", [(4, 64), (8, -1), (8, 64)])
def test_float32_default_is_exact(bits, group_size):
    layer = _layer(576, 1536, bits=bits, group_size=group_size, bias=True)
    x = torch.randn(2, 3, 1536)
    out = layer(x)
    # 4- and 8-bit layers run the compiled kernel, exact float32 arithmetic on the reference's weights.
    assert layer.kernel == ("cpu-tiled" if _native() else "reference") and out.dtype == torch.float32
    assert _rel(out, _exact(layer, x)) < FP32_BOUND


def test_float32_opt_in_casts_to_bfloat16_kernels():
    layer = _layer(576, 1536, bits=4, group_size=128)
    x = torch.randn(1, 1, 1536)
    set_float32_policy("bfloat16")
    out = layer(x)
    assert layer.kernel == "cpu-int4+bf16-cast" and out.dtype == torch.float32
    assert _rel(out, _exact(layer, x)) < BF16_BOUND
    set_float32_policy("reference")
    layer(x)
    assert layer.kernel == ("cpu-tiled" if _native() else "reference")  # exact float32 (tests/kernels/test_tiled.py)


def test_float32_reference_is_announced_once(caplog):
    _without_native()
    set_float32_policy("reference")  # float32 arithmetic only: the (slow) reference kernel, said once
    layer = _layer(64, 128, bits=4, group_size=64, seed=3)
    kernels._announced.clear()
    with caplog.at_level(logging.INFO, logger="optimum_superweight.kernels"):
        layer(torch.randn(1, 128))
        layer(torch.randn(1, 128))
        _layer(64, 128, bits=4, group_size=64, seed=4)(torch.randn(1, 128))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "set_float32_policy" in warnings[0].getMessage()


def test_float32_without_a_float32_kernel_computes_in_bfloat16_by_default(caplog):
    _without_native()
    layer = _layer(64, 128, bits=4, group_size=64, seed=3)
    kernels._announced.clear()
    with caplog.at_level(logging.INFO, logger="optimum_superweight.kernels"):
        out = layer(torch.randn(1, 128))
    assert layer.kernel == "cpu-int4+bf16-cast" and out.dtype == torch.float32
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("float32 input computed in bfloat16" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("bits, group_size, tokens", [(4, 64, 1), (8, -1, 1), (4, 64, 64)])
def test_super_weight_contribution_is_exact(bits, group_size, tokens):
    """The sparse correction adds exactly x[col] * value (up to the output's bfloat16 rounding)."""
    row, col, value = 11, 1229, 5.875  # exactly representable: the product is exact
    layer = _layer(576, 1536, bits=bits, group_size=group_size, super_weights=[(row, col)])
    with torch.no_grad():
        layer.super_weight_values.fill_(value)
    x = torch.randn(tokens, 1536).bfloat16() * 0.01
    x[:, col] = 2996.0  # the super activation: ~10^4 x the other inputs
    with_sw = layer(x)
    with torch.no_grad():
        layer.super_weight_values.zero_()  # in-place change: the kernel state must notice
    without = layer(x)
    assert torch.equal(with_sw[:, :row], without[:, :row]) and torch.equal(with_sw[:, row + 1 :], without[:, row + 1 :])
    contribution = with_sw[:, row].float() - without[:, row].float()
    expected = x[:, col].float() * value
    # bfloat16 output: one rounding of a ~17,600 value (spacing 128) on each side.
    assert (contribution - expected).abs().max().item() <= 128.0


def test_duplicate_rows_accumulate():
    layer = _layer(64, 256, bits=4, group_size=64, super_weights=[(5, 10), (5, 200)])
    _decode_everything()
    x = torch.randn(1, 256)
    assert layer(x.bfloat16()) is not None and layer.kernel == "cpu-int4"
    assert _rel(layer(x.bfloat16()), _exact(layer, x)) < BF16_BOUND


def test_state_is_rebuilt_when_weights_change_and_never_saved():
    layer = _layer(576, 1536, bits=4, group_size=64)
    keys = set(layer.state_dict())
    x = torch.randn(1, 1536).bfloat16()
    first = layer(x)
    assert set(layer.state_dict()) == keys  # kernel layouts are not part of the checkpoint
    with torch.no_grad():
        layer.weight_scale.mul_(2)  # in place
    assert _rel(layer(x), 2 * first.float()) < 1e-2
    other = _layer(576, 1536, bits=4, group_size=64, seed=1)
    layer.weight.data = other.weight.data.clone()  # replaced
    layer.weight_scale.data = other.weight_scale.data.clone()
    assert _rel(layer(x), other(x)) < 1e-6


def test_state_dict_round_trip_keeps_fast_outputs():
    source = _layer(576, 1536, bits=4, group_size=128, symmetric=False, bias=True, super_weights=[(1, 2)])
    x = torch.randn(1, 1536).bfloat16()
    expected = source(x)
    target = SuperWeightLinear(1536, 576, bias=True, bits=4, group_size=128, symmetric=False, num_super_weights=1)
    target(x)  # builds a state for the initial (zero) weights first
    target.load_state_dict(source.state_dict())
    assert torch.equal(target(x), expected) and target.kernel == "cpu-int4"


def test_fallbacks_are_reported():
    # Decode-sized calls no int kernel takes: cpu-tiled when it is built, else cpu-dense with the reasons.
    fallback = "cpu-tiled" if _native() else "cpu-dense"
    assert select_kernel(_layer(100, 128, bits=4, group_size=64), torch.bfloat16, CPU).label == fallback
    grouped8 = _layer(64, 256, bits=8, group_size=64)
    assert select_kernel(grouped8, torch.bfloat16, CPU).label == fallback
    _without_native()
    odd = select_kernel(_layer(100, 128, bits=4, group_size=64), torch.bfloat16, CPU)
    assert odd.label == "cpu-dense" and "out_features=100" in odd.reason
    assert select_kernel(grouped8, torch.bfloat16, CPU).label == "cpu-dense"
    kernels.set_native_kernels(True)
    assert select_kernel(grouped8, torch.float32, CPU).label == ("cpu-tiled" if _native() else "reference")
    assert select_kernel(grouped8, torch.bfloat16, torch.device("meta")).label == "reference"
    assert "kernel=" in repr(grouped8)


def test_summary_and_prepare():
    model = nn.Sequential(_layer(64, 128, bits=4, group_size=64), _layer(128, 64, bits=8, group_size=-1), _layer(64, 128, bits=8, group_size=32))
    summary = prepare_kernels(model, torch.bfloat16)
    if _native():  # the 8-bit layers decode on cpu-tiled's register path (faster than cpu-int8 for few tokens)
        assert kernel_summary(model, torch.bfloat16) == {"cpu-int4": 1, "cpu-tiled": 2}
        assert summary == {"decode": {"cpu-int4": 1, "cpu-tiled": 2}, "prefill": {"cpu-tiled": 3}}
        assert kernel_summary(model, torch.float32) == {"cpu-tiled": 3}
    _without_native()
    assert kernel_summary(model, torch.bfloat16) == {"cpu-int4": 1, "cpu-int8": 1, "cpu-dense": 1}
    assert prepare_kernels(model, torch.bfloat16)["prefill"] == {"cpu-dense": 3}
    # float32 without a float32 kernel: the bfloat16 kernels by default ("auto"), the reference under "reference"
    assert kernel_summary(model, torch.float32) == {"cpu-int4+bf16-cast": 1, "cpu-int8+bf16-cast": 1, "cpu-dense+bf16-cast": 1}
    set_float32_policy("reference")
    assert kernel_summary(model, torch.float32) == {"reference": 3}


@pytest.mark.parametrize("bits, group_size", [(4, 64), (8, -1)])
def test_inputs_that_need_gradients_run_the_inference_kernel_and_get_the_weights_gradient(bits, group_size):
    # The forward of a training step runs the same kernel as inference (nn/autograd.py); the backward uses the
    # layer's dequantized weight, super weights exact.
    layer = _layer(64, 128, bits=bits, group_size=group_size)
    x = torch.randn(1, 128, dtype=torch.bfloat16, requires_grad=True)
    with torch.no_grad():
        inference = layer(x)
    kernel = layer.kernel
    y = layer(x)
    assert layer.kernel == kernel and torch.equal(y.detach(), inference)
    y.float().sum().backward()
    expected = layer.dequantize_weight(torch.float32).sum(0)  # d(sum y)/dx
    assert _rel(x.grad[0], expected) < BF16_BOUND
    with torch.no_grad():
        layer(x)
    assert layer.kernel == ("cpu-int4" if bits == 4 else "cpu-tiled" if _native() else "cpu-int8")


# -- float offsets (w = s*q + m, the default method's layout) ----------------------------------------------
@pytest.mark.parametrize("out_features, in_features", SHAPES)
@pytest.mark.parametrize("bits, group_size", [(4, 64), (4, 128), (4, -1), (3, 64), (2, 32)])
@pytest.mark.parametrize("batch, seq", INPUTS)
def test_float_offsets_on_the_int4_kernel(out_features, in_features, bits, group_size, batch, seq):
    _decode_everything()
    layer = _layer(out_features, in_features, bits=bits, group_size=group_size, symmetric=False, zero_point="float",
                   bias=True, super_weights=[(5, 7)])
    assert layer.weight_offset is not None and layer.weight_zero_point is None
    x = torch.randn(batch, seq, in_features)
    out = layer(x.bfloat16())
    group = layer.layout.effective_group_size
    assert layer.kernel == ("cpu-dense" if int4_kernel_group(group) is None else "cpu-int4")
    assert _rel(out, _exact(layer, x)) < BF16_BOUND


@pytest.mark.parametrize("out_features, in_features", [(576, 1536), (48, 100)])
@pytest.mark.parametrize("bits", [8, 6])
def test_float_offsets_on_the_int8_kernel(out_features, in_features, bits):
    _decode_everything()
    layer = _layer(out_features, in_features, bits=bits, group_size=-1, symmetric=False, zero_point="float",
                   bias=True, super_weights=[(3, 9)])
    x = torch.randn(2, 3, in_features)
    out = layer(x.bfloat16())
    assert layer.kernel == "cpu-int8"
    assert _rel(out, _exact(layer, x)) < BF16_BOUND


@pytest.mark.parametrize("bits, group_size", [(4, 64), (3, 48), (8, -1)])
def test_float_offsets_on_the_dense_prefill_kernel(bits, group_size):
    _without_native()
    layer = _layer(576, 1536, bits=bits, group_size=group_size, symmetric=False, zero_point="float", super_weights=[(2, 3)])
    x = torch.randn(8, 16, 1536)
    out = layer(x.bfloat16())
    assert layer.kernel == "cpu-dense"
    assert _rel(out, _exact(layer, x)) < BF16_BOUND


@pytest.mark.parametrize("tokens", [1, 64])
def test_float_offsets_super_weight_contribution_is_exact(tokens):
    """Float offsets: the held-out code decodes near 0, not to 0; the kernels add ``value - decoded``."""
    row, col, value = 11, 1229, 5.875
    layer = _layer(576, 1536, bits=4, group_size=64, symmetric=False, zero_point="float", super_weights=[(row, col)])
    with torch.no_grad():
        layer.super_weight_values.fill_(value)
    _decode_everything() if tokens == 1 else None
    x = torch.randn(tokens, 1536).bfloat16() * 0.01
    x[:, col] = 2996.0
    out = layer(x)
    assert layer.kernel == ("cpu-int4" if tokens == 1 else "cpu-tiled" if _native() else "cpu-dense")
    dense = layer.dequantize_weight(torch.float32)
    assert dense[row, col].item() == value
    expected = x.float() @ dense.T
    # bfloat16 output of a ~17,600 value: spacing 128; the rest of the row adds bfloat16 scale rounding.
    assert (out[:, row].float() - expected[:, row]).abs().max().item() <= 160.0
    assert _rel(out, expected) < BF16_BOUND


def test_float_offsets_state_dict_round_trip():
    source = _layer(576, 1536, bits=4, group_size=64, symmetric=False, zero_point="float", bias=True, super_weights=[(1, 2)])
    assert set(source.state_dict()) == {"weight", "weight_scale", "weight_offset", "super_weight_indices", "super_weight_values", "bias"}
    assert source.weight_offset.dtype == torch.float16 and source.weight_offset.shape == (576, 24)
    x = torch.randn(1, 1536).bfloat16()
    expected = source(x)
    target = SuperWeightLinear(1536, 576, bias=True, bits=4, group_size=64, symmetric=False, num_super_weights=1, zero_point="float")
    target(x)
    target.load_state_dict(source.state_dict())
    assert torch.equal(target(x), expected)


@pytest.mark.parametrize("zero_point", ["uint8", "float"])
def test_dense_kernel_in_row_blocks_equals_the_whole_matrix(monkeypatch, zero_point):
    """Large matrices are dequantized and multiplied in blocks of output rows: the same weights, and outputs
    equal to the one-block product up to bfloat16 GEMM rounding."""
    from optimum_superweight.kernels import cpu

    torch.manual_seed(3)
    layer = SuperWeightLinear.from_linear(
        nn.Linear(200, 96), bits=4, group_size=64, symmetric=False, zero_point=zero_point, super_weights=[(5, 7)]
    )
    kernel = cpu.DenseCpuKernel()
    state = kernel.prepare(layer, torch.device("cpu"), torch.bfloat16)
    whole = cpu.dequantize_fast(layer, state)
    assert torch.equal(torch.cat([cpu.dequantize_fast(layer, state, slice(r, r + 32)) for r in range(0, 96, 32)]), whole)
    x = torch.randn(3, 5, 200, dtype=torch.bfloat16)
    one_block = kernel.run(layer, state, x)
    monkeypatch.setattr(cpu, "_DENSE_BLOCKED_ABOVE", 0)
    monkeypatch.setattr(cpu, "_DENSE_BLOCK_WEIGHTS", 32 * 200)
    blocked = kernel.run(layer, state, x)
    assert blocked.shape == one_block.shape == (3, 5, 96)
    torch.testing.assert_close(blocked.float(), one_block.float(), rtol=1e-2, atol=1e-2)
