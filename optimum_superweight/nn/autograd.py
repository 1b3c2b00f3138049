"""The backward pass of a quantized layer: gradients for its input (and bias), never for its codes.

``SuperWeightLinear`` weights are frozen (codes, scales, zero-points, offsets and super weights are integer or
``requires_grad=False`` tensors), so training on top of one (LoRA adapters, ...) only needs
``grad_input = grad_output @ W``. :func:`quantized_linear` runs the forward with whatever kernel the layer
would use for inference (the int and compiled kernels included: the forward computes no graph) and keeps
nothing of the weight for the backward; the backward dequantizes this one layer's weight in the gradient's
dtype, multiplies, and drops it (for 4-bit codes a block of output rows at a time, so not even one whole dense
matrix lives at once). The super weights enter exactly, as a sparse term. Plain ``F.linear`` on a dequantized
weight would instead keep every layer's dense weight alive from the forward to the backward: a dense copy
of the whole model during training.

Under ``torch.autocast`` the input is cast to the autocast dtype first (as ``nn.Linear`` would be), so the
layer's output and its gradient are in that dtype; activation checkpointing re-runs the forward, which is
deterministic.

>>> from optimum_superweight.nn.linear import SuperWeightLinear
>>> layer = SuperWeightLinear.from_linear(torch.nn.Linear(64, 32), bits=4, group_size=32, super_weights=[(1, 2)])
>>> x = torch.randn(3, 64, requires_grad=True)
>>> quantized_linear(layer, x).sum().backward()
>>> torch.allclose(x.grad, layer.dequantize_weight().sum(0).expand(3, 64), atol=1e-5)
True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..kernels import linear_forward
from ..kernels.cpu import DenseCpuKernel, _sparse_indices, dequantize_fast

__all__ = ["quantized_linear", "input_gradient", "needs_graph"]

# Output rows per block of the 4-bit backward: about a million weights per dequantized block.
_BLOCK_WEIGHTS = 1 << 20
_DENSE = DenseCpuKernel()


def needs_graph(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether a call must record a backward: grad mode on and the input or the bias needing a gradient."""
    if not torch.is_grad_enabled():
        return False
    bias = module.bias
    return x.requires_grad or (bias is not None and bias.requires_grad)


def input_gradient(module: nn.Module, grad_output: torch.Tensor) -> torch.Tensor:
    """``grad_output @ W`` with ``W`` the layer's weight (super weights exact), computed in ``grad_output``'s
    dtype from the packed codes, one block of output rows at a time for 4-bit codes; returns ``[..., in]``.

    >>> from optimum_superweight.nn.linear import SuperWeightLinear
    >>> layer = SuperWeightLinear.from_linear(torch.nn.Linear(64, 32), bits=3, group_size=32)
    >>> g = torch.randn(5, 32)
    >>> torch.allclose(input_gradient(layer, g), g @ layer.dequantize_weight(), atol=1e-5)
    True
    """
    shape = grad_output.shape
    g = grad_output.reshape(-1, shape[-1])
    with torch.no_grad():
        state = _DENSE.prepare(module, g.device, g.dtype)
        out_features = module.out_features
        if module.layout.bits == 4:
            step = max(1, _BLOCK_WEIGHTS // max(module.in_features, 1))
            grad = None
            for start in range(0, out_features, step):
                rows = slice(start, min(start + step, out_features))
                part = g[:, rows] @ dequantize_fast(module, state, rows)
                grad = part if grad is None else grad.add_(part)
        else:
            grad = g @ dequantize_fast(module, state)
        sparse = _sparse_indices(module)
        if sparse is not None:  # the super weights: grad[:, col] += g[:, row] * value, exactly as in the forward
            rows_, cols, values = sparse
            grad.index_add_(1, cols, (g[:, rows_].to(torch.float32) * values).to(grad.dtype))
    return grad.reshape(*shape[:-1], module.in_features)


class _QuantizedLinearFunction(torch.autograd.Function):
    """``y = x W^T + b``: forward by the layer's kernels, backward by :func:`input_gradient`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, module: nn.Module) -> torch.Tensor:
        ctx.module = module  # the layer itself, not a copy of its weight: nothing dense is kept
        ctx.input_dtype = x.dtype
        return linear_forward(module, x)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = input_gradient(ctx.module, grad_output.to(ctx.input_dtype)).to(ctx.input_dtype)
        if ctx.needs_input_grad[1]:
            bias = ctx.module.bias
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0).to(bias.dtype)
        return grad_x, grad_bias, None


def quantized_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's output with a backward for ``x`` (and a trainable bias); ``module`` is a ``SuperWeightLinear``.

    Under autocast on ``x``'s device, ``x`` is first cast to the autocast dtype (what ``nn.Linear`` does).
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.is_floating_point():
        x = x.to(torch.get_autocast_dtype(device_type))
        with torch.autocast(device_type, enabled=False):
            return _QuantizedLinearFunction.apply(x, module.bias, module)
    return _QuantizedLinearFunction.apply(x, module.bias, module)
