"""Row-block quantization: the codes of a whole matrix computed a block of rows at a time.

Groups lie within a row, so the result equals the whole-matrix computation while the temporaries stay those
of one block. Both quantize paths (in memory, :func:`optimum_superweight.models.replace.quantize_model`, and
while loading, :mod:`optimum_superweight.models.loading`) call :func:`quantize_by_rows`, so they write the
same codes.
"""

from __future__ import annotations

import torch

from ..config import SuperWeightConfig
from .methods import code_chooser, code_settings
from .quantize import GroupLayout, QuantizedWeight

__all__ = ["BLOCK_BYTES", "quantize_by_rows"]

#: Rows quantized together hold at most this many bytes of float32: the quantization temporaries (about ten
#: times the block: float32 copies, masks, int64 packing words) then stay a few MiB whatever the matrix size.
BLOCK_BYTES = 2 * 2**20


def quantize_by_rows(
    weight: torch.Tensor, coordinates: list[tuple[int, int]], config: SuperWeightConfig, hessian: torch.Tensor | None = None
) -> QuantizedWeight:
    """The codes of ``weight`` chosen as ``config`` asks (:func:`~.methods.code_chooser`), a block of rows at a time.

    ``hessian`` (the inputs' ``E[x xᵀ]``, or only its diagonal) is given to the chooser, which reads it when it
    needs it (the clip search with ``config.clip_objective == "output"``, HQQ grids weighted by activations);
    those objectives are per row too, so row blocks change nothing. GPTQ's codes do not come from here (:func:`~.methods.code_method` batches its layers instead).

    Groups lie within a row, so every scale, code and zero-point equals the whole-matrix computation's (the
    in-memory path's), but the temporaries are those of one block instead of ~10x the weight: for a 16384 x
    53248 down projection that is the difference between ~35 GB and ~20 MB of transient private memory.

    >>> q = quantize_by_rows(torch.randn(300, 64), [(5, 7)], SuperWeightConfig(bits=4, group_size=32))
    >>> q.packed.shape
    torch.Size([300, 2, 16])
    """
    out_features, in_features = weight.shape
    rows = max(1, BLOCK_BYTES // (4 * in_features))
    choose, settings = code_chooser(config), code_settings(config)
    held = torch.tensor(coordinates, dtype=torch.int32).reshape(-1, 2)
    parts = []
    for start in range(0, out_features, rows):
        block = weight[start : start + rows]
        inside = held[(held[:, 0] >= start) & (held[:, 0] < start + block.shape[0])]
        inside = inside - torch.tensor([start, 0], dtype=torch.int32)
        parts.append(choose(block, settings, inside.to(block.device), hessian))
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
