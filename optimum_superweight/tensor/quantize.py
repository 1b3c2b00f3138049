"""Group-wise round-to-nearest quantization with held-out coordinates.

A weight ``[out_features, in_features]`` is cut along its input dimension into groups of ``group_size``
(the last group of a row may be shorter: it is padded, and the padding never influences a scale). Each
group gets one scale and, when asymmetric, either one integer zero-point (``w = s * (q - z)``) or one
float offset (``w = s * q + m``, what GGUF's Q4_1 stores as ``d * q + m``). Held-out coordinates — the
super weights — are excluded from the group statistics and encoded as the group's zero code, so the
dequantized matrix is exactly 0 there and the exact value can be written back (or added as a sparse
correction after a matmul) without any rounding. With float offsets no code need decode to exactly 0: a
held-out coordinate gets the code nearest to 0 and the exact value overwrites it (kernels add the
difference, see :func:`held_out_decoded`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import pack_codes, packed_size, unpack_codes

__all__ = [
    "GroupLayout",
    "QuantizedWeight",
    "quantize_weight",
    "store_scale",
    "store_offset",
    "dequantize_weight",
    "restore_exact",
    "held_out_decoded",
    "ZERO_POINTS",
]

#: How an asymmetric group stores its zero: ``"uint8"`` (``w = s * (q - z)``, integer ``z`` in
#: ``weight_zero_point``) or ``"float"`` (``w = s * q + m``, ``m`` in ``weight_offset``, scale dtype).
ZERO_POINTS = ("uint8", "float")


@dataclass(frozen=True)
class GroupLayout:
    """Shape bookkeeping of a group-quantized ``[out_features, in_features]`` matrix.

    >>> layout = GroupLayout(out_features=576, in_features=1536, bits=4, group_size=128)
    >>> layout.num_groups, layout.bytes_per_group
    (12, 64)
    """

    out_features: int
    in_features: int
    bits: int
    group_size: int  # -1: one group per row

    @property
    def effective_group_size(self) -> int:
        return self.in_features if self.group_size == -1 else self.group_size

    @property
    def num_groups(self) -> int:
        return -(-self.in_features // self.effective_group_size)

    @property
    def bytes_per_group(self) -> int:
        return packed_size(self.effective_group_size, self.bits)

    @property
    def packed_shape(self) -> tuple[int, int, int]:
        """Shape of the stored ``weight``: 3-D, so it can never be mistaken for a dense 2-D weight."""
        return (self.out_features, self.num_groups, self.bytes_per_group)

    @property
    def scale_shape(self) -> tuple[int, int]:
        return (self.out_features, self.num_groups)


@dataclass
class QuantizedWeight:
    """Packed codes, scales and optional zero-points of one matrix, plus its layout."""

    packed: torch.Tensor  # uint8 [out, num_groups, bytes_per_group]
    scale: torch.Tensor  # [out, num_groups]
    zero_point: torch.Tensor | None  # uint8 [out, num_groups], asymmetric with integer zero-points only
    layout: GroupLayout
    symmetric: bool
    offset: torch.Tensor | None = None  # [out, num_groups] in the scale dtype: w = scale * q + offset

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight(
            self.packed, self.scale, self.zero_point, self.layout, symmetric=self.symmetric, dtype=dtype,
            offset=self.offset,
        )


def _grouped(weight: torch.Tensor, layout: GroupLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 ``[out, groups, group]`` view of ``weight`` and a mask of its padding positions."""
    group = layout.effective_group_size
    padded_in = layout.num_groups * group
    w = weight.detach().to(torch.float32)
    pad = padded_in - layout.in_features
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    padding = torch.zeros(padded_in, dtype=torch.bool, device=w.device)
    padding[layout.in_features :] = True
    return w.reshape(layout.out_features, layout.num_groups, group), padding.reshape(layout.num_groups, group)


def _holdout_mask(layout: GroupLayout, holdout: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    if holdout is None or holdout.numel() == 0:
        return None
    group = layout.effective_group_size
    mask = torch.zeros(layout.out_features, layout.num_groups * group, dtype=torch.bool, device=device)
    rows, cols = holdout[:, 0].long().to(device), holdout[:, 1].long().to(device)
    mask[rows, cols] = True
    return mask.reshape(layout.out_features, layout.num_groups, group)


def store_offset(offset: torch.Tensor, offset_dtype: torch.dtype) -> torch.Tensor:
    """A float offset as stored: rounded to ``offset_dtype``, clamped to its finite range."""
    limit = torch.finfo(offset_dtype).max
    return offset.clamp(-limit, limit).to(offset_dtype)


def store_scale(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """The scale as stored: rounded to ``scale_dtype``, clamped to its range.

    A group of zeros (or one whose scale underflows) gets scale 1: every code then rounds to the zero code.
    """
    stored = scale.clamp(max=torch.finfo(scale_dtype).max).to(scale_dtype)
    return torch.where(stored.to(torch.float32) > 0, stored, torch.ones_like(stored))


def quantize_weight(
    weight: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    symmetric: bool = True,
    scale_dtype: torch.dtype = torch.float16,
    holdout: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Round-to-nearest group quantization of a ``[out_features, in_features]`` weight.

    Args:
        weight: Dense weight (any float dtype).
        bits: Code width (2 to 8).
        group_size: Inputs per scale, or ``-1`` for one scale per row.
        symmetric: Signed codes around 0 (``w = s*q``) or unsigned codes with a zero-point (``w = s*(q-z)``).
        scale_dtype: Storage dtype of the scales; codes are rounded against the stored (rounded) scale.
        holdout: ``int`` tensor ``[k, 2]`` of ``(row, col)`` coordinates excluded from the scales and encoded
            as exactly 0 (the caller keeps their exact values).

    >>> w = torch.randn(8, 20)
    >>> q = quantize_weight(w, bits=4, group_size=16, holdout=torch.tensor([[3, 5]]))
    >>> q.packed.shape, q.dequantize()[3, 5].item()
    (torch.Size([8, 2, 8]), 0.0)
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2-D weight, got shape {tuple(weight.shape)}.")
    layout = GroupLayout(weight.shape[0], weight.shape[1], bits, group_size)
    w, padding = _grouped(weight, layout)
    excluded = padding.expand_as(w)
    held = _holdout_mask(layout, holdout, w.device)
    if held is not None:
        excluded = excluded | held

    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        absmax = torch.where(excluded, 0.0, w.abs()).amax(dim=-1)
        scale = absmax / qmax
    else:
        qmax = 2**bits - 1
        wmin = torch.where(excluded, torch.inf, w).amin(dim=-1).clamp(max=0.0)
        wmax = torch.where(excluded, -torch.inf, w).amax(dim=-1).clamp(min=0.0)
        scale = (wmax - wmin) / qmax

    stored_scale = store_scale(scale, scale_dtype)
    s = stored_scale.to(torch.float32).unsqueeze(-1)

    if symmetric:
        offset = 2 ** (bits - 1)
        codes = (torch.round(w / s).clamp(-offset, offset - 1) + offset)
        zero_code = torch.full_like(codes, float(offset))
        zero_point = None
    else:
        zero = torch.round(-wmin / s.squeeze(-1)).clamp(0, qmax)
        codes = (torch.round(w / s) + zero.unsqueeze(-1)).clamp(0, qmax)
        zero_code = zero.unsqueeze(-1).expand_as(codes)
        zero_point = zero.to(torch.uint8)
    codes = torch.where(excluded, zero_code, codes).to(torch.uint8)
    packed = pack_codes(codes, bits)
    return QuantizedWeight(packed=packed, scale=stored_scale, zero_point=zero_point, layout=layout, symmetric=symmetric)


def dequantize_weight(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    layout: GroupLayout,
    *,
    symmetric: bool,
    dtype: torch.dtype = torch.float32,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense ``[out_features, in_features]`` weight from packed codes; held-out coordinates come out as 0
    (as the code nearest to 0 with float ``offset``: ``w = scale * q + offset``)."""
    group = layout.effective_group_size
    codes = unpack_codes(packed, layout.bits, group).to(torch.float32)
    if offset is not None:
        if symmetric:
            raise ValueError("A symmetric weight has no offsets.")
        dense = codes * scale.to(torch.float32).unsqueeze(-1) + offset.to(torch.float32).unsqueeze(-1)
        return dense.reshape(layout.out_features, -1)[:, : layout.in_features].to(dtype)
    if symmetric:
        centered = codes - float(2 ** (layout.bits - 1))
    else:
        if zero_point is None:
            raise ValueError("An asymmetric weight needs its zero-points.")
        centered = codes - zero_point.to(torch.float32).unsqueeze(-1)
    dense = (centered * scale.to(torch.float32).unsqueeze(-1)).reshape(layout.out_features, -1)
    return dense[:, : layout.in_features].to(dtype)


def restore_exact(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Write exact values at ``(row, col)`` coordinates in place and return ``weight``."""
    if indices.numel():
        weight[indices[:, 0].long(), indices[:, 1].long()] = values.to(weight.dtype)
    return weight


def held_out_decoded(
    packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, layout: GroupLayout, indices: torch.Tensor
) -> torch.Tensor:
    """float32 ``[k]``: what the float-offset codes decode to at ``(row, col)`` ``indices`` (the exact value
    minus this is the sparse correction a kernel adds; integer zero-point layouts decode to 0 there)."""
    if indices.numel() == 0:
        return torch.zeros(0, dtype=torch.float32, device=packed.device)
    rows, cols = indices[:, 0].long(), indices[:, 1].long()
    group = layout.effective_group_size
    codes = unpack_codes(packed[rows], layout.bits, group).to(torch.float32)  # [k, groups, group]
    k = torch.arange(rows.numel(), device=packed.device)
    q = codes[k, cols // group, cols % group]
    return q * scale[rows, cols // group].to(torch.float32) + offset[rows, cols // group].to(torch.float32)
