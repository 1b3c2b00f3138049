"""The CUDA W8A8 kernel's host-side logic, run on a CPU.

``cuda-w8a8`` is :class:`W8A8Int8Kernel` with the shape rules of ``torch._int_mm`` on CUDA (M > 16 rows, K and N
multiples of 8), which it meets by padding. The registered object with only its device switched to CPU runs
every line of its ``prepare`` and ``run`` here (row, K and N padding, the held-out columns, the sparse super-weight
correction, the bias and the output slice), with ``torch._int_mm`` on CPU in place of the CUDA op, whose
arguments are checked against the CUDA rules. What cannot run without a GPU: the CUDA ``_int_mm`` itself and the
device transfers (``tests/nn/test_w8a8.py::test_cuda_kernel_matches_reference`` does, where CUDA is present).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from optimum_superweight.kernels import force_reference
from optimum_superweight.kernels import w8a8 as w8a8_kernels
from optimum_superweight.nn.w8a8 import SuperWeightW8A8Linear

pytestmark = pytest.mark.usefixtures("one_thread")


def _cuda_kernel():
    return next(k for k in w8a8_kernels._W8A8_KERNELS if k.name == "cuda-w8a8")


@pytest.fixture()
def cuda_kernel_on_cpu(monkeypatch):
    """The registered CUDA kernel, device switched to CPU, alone before the reference; every ``_int_mm`` call
    checked against what CUDA accepts."""
    kernel = copy.copy(_cuda_kernel())
    kernel.device_type = "cpu"
    monkeypatch.setattr(w8a8_kernels, "_W8A8_KERNELS", [kernel, w8a8_kernels.W8A8_REFERENCE])
    calls = []
    int_mm = torch._int_mm

    def checked(a, b):
        calls.append((tuple(a.shape), tuple(b.shape)))
        assert a.dtype == b.dtype == torch.int8
        assert a.shape[0] > 16 and a.shape[1] % 8 == 0 and b.shape[1] % 8 == 0, f"CUDA _int_mm refuses {a.shape} @ {b.shape}"
        return int_mm(a, b)

    monkeypatch.setattr(torch, "_int_mm", checked)
    return calls


def _layer(scale):
    torch.manual_seed(0)
    dense = nn.Linear(70, 37)  # neither size a multiple of 8: the kernel must pad both
    super_weights = ((3, 5), (7, 11))  # (3, 5) in a held-out column, (7, 11) in a quantized one
    with torch.no_grad():
        for row, col in super_weights:
            dense.weight[row, col] = 4.0
    return SuperWeightW8A8Linear.from_linear(dense, activation_scale=scale, holdout_channels=[5], super_weights=super_weights)


def test_cuda_kernel_is_registered_with_the_cuda_shape_rules():
    kernel = _cuda_kernel()
    assert (kernel.device_type, kernel.k_multiple, kernel.n_multiple, kernel.min_rows) == ("cuda", 8, 8, 17)
    assert kernel.unsupported(_layer("per_token"), torch.float32, torch.device("cpu"), 1) == "device cpu"


@pytest.mark.parametrize("scale", ["per_tensor", "per_token"])
@pytest.mark.parametrize("tokens", [1, 16, 17, 40])
def test_cuda_kernel_host_logic_matches_reference(cuda_kernel_on_cpu, scale, tokens):
    layer = _layer(scale)
    torch.manual_seed(tokens)
    x = torch.randn(2, tokens, 70)  # 3-D input: the kernel flattens and restores the leading dimensions
    x[0, 0, 5] = 300.0  # a massive activation in the held-out channel
    with torch.no_grad():
        fast = layer(x)
        assert layer.kernel == "cuda-w8a8"
        force_reference(True)
        try:
            ref = layer(x)
        finally:
            force_reference(False)
    assert fast.shape == ref.shape == (2, tokens, 37)
    # Same bound as the GPU test: int32 accumulation is exact, only the float epilogue's order differs.
    assert (fast - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-6
    (rows, k), (k_weight, n) = cuda_kernel_on_cpu[-1]
    assert (rows, k, k_weight, n) == (max(17, 2 * tokens), 72, 72, 40)


def test_padding_never_reaches_the_output(cuda_kernel_on_cpu):
    """Padded rows, K and N hold zero codes: a zero input gives exactly the bias, nothing from the padding."""
    layer = _layer("per_token")
    with torch.no_grad():
        y = layer(torch.zeros(3, 70))
    assert layer.kernel == "cuda-w8a8"
    assert torch.equal(y, layer.bias.detach().expand(3, 37))
