"""Super-weight coordinates are checked wherever a kernel state is built, and inside the compiled kernel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optimum_superweight import SuperWeightLinear, kernels
from optimum_superweight.kernels import build, tiled
from optimum_superweight.kernels.tiled import TiledCpuKernel

CPU = torch.device("cpu")


def _layer() -> SuperWeightLinear:
    torch.manual_seed(0)
    return SuperWeightLinear.from_linear(
        nn.Linear(128, 64), bits=4, group_size=64, symmetric=False, zero_point="float", super_weights=[(5, 7), (9, 3)]
    )


@pytest.mark.parametrize("dtype, tokens", [(torch.bfloat16, 1), (torch.bfloat16, 100), (torch.float32, 3)])
@pytest.mark.parametrize("where, bad", [(1, 128), (1, -1), (0, 64), (0, -3)])
def test_indices_changed_after_the_load_are_refused_when_the_state_is_rebuilt(dtype, tokens, where, bad):
    layer = _layer()
    x = torch.randn(tokens, 128, dtype=dtype)
    with torch.no_grad():
        layer(x)  # a state built from valid indices
        layer.super_weight_indices[1, where] = bad  # in place: the state is rebuilt at the next call
        with pytest.raises(ValueError, match=r"super_weight_indices: entry #1 is .* outside the matrix; accepted are rows 0\.\.63 and columns 0\.\.127"):
            layer(x)


def test_a_state_of_mismatched_indices_and_values_is_refused():
    layer = _layer()
    layer.super_weight_values = nn.Parameter(torch.ones(3), requires_grad=False)
    with pytest.raises(ValueError, match="accepted are \\[k, 2\\] coordinates and k values"), torch.no_grad():
        layer(torch.randn(2, 128, dtype=torch.bfloat16))


def test_the_compiled_kernel_checks_coordinates_itself():
    if build.load("tiled_linear", requires=tiled.CPU_FEATURES) is None or tiled.unavailable():
        pytest.skip(tiled.unavailable() or "native kernels unavailable")
    layer = _layer()
    kernel = TiledCpuKernel()
    state = kernel.prepare(layer, CPU, torch.float32)
    state.cols[1] = 128  # past the row: a state changed behind the dispatcher's back
    for tokens in (2, 40):  # registers, tiles
        with pytest.raises(RuntimeError, match=r"super weight #1 at \(9, 128\) is outside the 64x128 matrix"):
            kernel.run(layer, state, torch.randn(tokens, 128))
    with pytest.raises(RuntimeError, match="outside the 64x128 matrix"):
        kernel.dequantize(layer, state, torch.float32)
