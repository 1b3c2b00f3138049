"""Whether a reference weight already sits on a low-bit grid (a model dequantized from a GGUF of 4-bit blocks).

>>> import torch
>>> grid_levels(torch.arange(16.0).repeat(4, 2))  # 16 values in every block of 32
16.0
"""

from __future__ import annotations

import torch

__all__ = ["grid_levels"]


def grid_levels(weight: torch.Tensor, block: int = 32, blocks: int = 4096) -> float:
    """Median number of distinct values per block of ``block`` consecutive weights (over the first ``blocks``
    blocks): 16 or fewer on a 4-bit GGUF block grid (Q4_0/Q4_1/Q4_K), 27-28 on Q6_K, about ``block`` on a model
    trained in 16 bits."""
    sorted_blocks = weight.detach().reshape(-1, block)[:blocks].sort(-1).values
    return float(1 + (sorted_blocks.diff(dim=-1) != 0).sum(-1).float().median())
