"""The reference kernel: dequantize the whole weight, then a dense ``F.linear``.

It runs on every device, for every dtype, bit width and group size, and it is what every faster kernel is
tested against. It is slow for decoding (the full dense weight is rebuilt on every call) and keeps no
state between calls, so it costs no memory beyond the packed weight.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ReferenceKernel"]


class ReferenceKernel:
    """``y = x @ dequantize(W)^T + b`` with the super weights written back exactly into ``W``.

    >>> from optimum_superweight.nn.linear import SuperWeightLinear
    >>> layer = SuperWeightLinear.from_linear(nn.Linear(64, 32), bits=4, group_size=32)
    >>> ReferenceKernel().run(layer, None, torch.randn(3, 64)).shape
    torch.Size([3, 32])
    """

    name = "reference"

    def unsupported(self, module: nn.Module, dtype: torch.dtype, device: torch.device, tokens: int) -> str | None:
        return None

    def prepare(self, module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        return None

    def run(self, module: nn.Module, state: None, x: torch.Tensor) -> torch.Tensor:
        weight = module.dequantize_weight(x.dtype)
        bias = None if module.bias is None else module.bias.to(x.dtype)
        return nn.functional.linear(x, weight, bias)
