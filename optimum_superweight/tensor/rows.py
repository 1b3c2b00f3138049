"""Row-block quantization: the codes of a whole matrix computed a block of rows at a time.

Groups lie within a row, so the result equals the whole-matrix computation while the temporaries stay those
of one block. Both quantize paths (in memory, :func:`optimum_superweight.models.replace.quantize_model`, and
while loading, :mod:`optimum_superweight.models.loading`) call :func:`quantize_by_rows`, so they write the
same codes.
"""

from __future__ import annotations

import torch

from ..config import SuperWeightConfig
from .gptq import clip_quantize_weight
from .hqq import DEFAULT_ITERS, hqq_quantize_weight
from .quantize import GroupLayout, QuantizedWeight, quantize_weight

__all__ = ["BLOCK_BYTES", "quantize_by_rows"]

#: Rows quantized together hold at most this many bytes of float32: the quantization temporaries (about ten
#: times the block: float32 copies, masks, int64 packing words) then stay a few MiB whatever the matrix size.
BLOCK_BYTES = 2 * 2**20


def quantize_by_rows(
    weight: torch.Tensor, coordinates: list[tuple[int, int]], config: SuperWeightConfig, hessian: torch.Tensor | None = None
) -> QuantizedWeight:
    """HQQ, round-to-nearest or clip-search codes of ``weight`` (``config.method``) computed a block of rows at a time.

    ``hessian`` (the inputs' ``E[x xᵀ]``) is used by the clip search when ``config.clip_objective == "output"``;
    its objective is per row too, so row blocks change nothing.

    Groups lie within a row, so every scale, code and zero-point equals the whole-matrix computation's (the
    in-memory path's), but the temporaries are those of one block instead of ~10x the weight: for a 16384 x
    53248 down projection that is the difference between ~35 GB and ~20 MB of transient private memory.

    >>> q = quantize_by_rows(torch.randn(300, 64), [(5, 7)], SuperWeightConfig(bits=4, group_size=32))
    >>> q.packed.shape
    torch.Size([300, 2, 16])
    """
    out_features, in_features = weight.shape
    rows = max(1, BLOCK_BYTES // (4 * in_features))
    scale_dtype = getattr(torch, config.scale_dtype)
    held = torch.tensor(coordinates, dtype=torch.int32).reshape(-1, 2)
    parts = []
    for start in range(0, out_features, rows):
        block = weight[start : start + rows]
        inside = held[(held[:, 0] >= start) & (held[:, 0] < start + block.shape[0])]
        inside = inside - torch.tensor([start, 0], dtype=torch.int32)
        options = dict(bits=config.bits, group_size=config.group_size, symmetric=config.symmetric, scale_dtype=scale_dtype)
        if config.method == "hqq" or config.zero_point == "float":  # float offsets with "rtn": min-max, no steps
            iters = DEFAULT_ITERS if config.method == "hqq" else 0
            parts.append(hqq_quantize_weight(
                block, holdout=inside.to(block.device), zero_point=config.zero_point, iters=iters, **options
            ))
        elif config.clip_search:
            output = config.clip_objective == "output"
            if output and hessian is None:
                raise ValueError("clip_objective='output' needs the layer's calibration statistics (hessian).")
            parts.append(clip_quantize_weight(block, holdout=inside.to(block.device), hessian=hessian if output else None, **options))
        else:
            parts.append(quantize_weight(block, holdout=inside.to(block.device), **options))
    zero_points = [p.zero_point for p in parts]
    offsets = [p.offset for p in parts]
    return QuantizedWeight(
        packed=torch.cat([p.packed for p in parts]),
        scale=torch.cat([p.scale for p in parts]),
        zero_point=None if zero_points[0] is None else torch.cat(zero_points),
        layout=GroupLayout(out_features, in_features, config.bits, config.group_size),
        symmetric=config.symmetric,
        offset=None if offsets[0] is None else torch.cat(offsets),
    )
