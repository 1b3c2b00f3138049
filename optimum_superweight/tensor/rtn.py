"""Round-to-nearest: every weight to its nearest code on its group's min-max (absmax) grid, in every storage form.

The grid and the rounding themselves are the format's (:func:`~.quantize.quantize_weight`, integer zero-points
or symmetric codes); float offsets (``w = s·q + m``) are HQQ's min-max starting grid with no optimisation step
(:func:`~.hqq.hqq_quantize_weight` with ``iters=0``), so both forms round the same way they are stored.

>>> q = rtn_codes(torch.randn(8, 64), CodeSettings(bits=4, group_size=32), torch.tensor([[3, 5]]))
>>> q.dequantize()[3, 5].item()
0.0
"""

from __future__ import annotations

import torch

from .hqq import hqq_quantize_weight
from .quantize import QuantizedWeight, quantize_weight
from .settings import CodeSettings

__all__ = ["rtn_codes"]


def rtn_codes(
    weight: torch.Tensor, settings: CodeSettings, holdout: torch.Tensor | None, hessian: torch.Tensor | None = None
) -> QuantizedWeight:
    """Round-to-nearest codes (the common :data:`~.settings.CodeChooser` signature; ``hessian`` is not read).

    >>> rtn_codes(torch.randn(4, 16), CodeSettings(bits=4, group_size=8, symmetric=False, zero_point="float"), None).offset.shape
    torch.Size([4, 2])
    """
    if not settings.symmetric and settings.zero_point == "float":  # min-max float offsets: HQQ's start, no steps
        return hqq_quantize_weight(weight, holdout=holdout, zero_point="float", iters=0, **settings.format_options())
    return quantize_weight(weight, holdout=holdout, **settings.format_options())
