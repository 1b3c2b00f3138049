"""Round-to-nearest with a per-group clip search: each group's range shrunk to where its error is smallest.

Round-to-nearest takes a group's range (absmax, or min and max) as its grid. A few large weights then
stretch the grid for all the others; shrinking the range by a factor (clipping those few) often lowers the
group's error. :func:`search_group_params` tries the factors of a grid (:data:`DEFAULT_CLIP_GRID`) per group
and keeps the best under one of :data:`CLIP_OBJECTIVES`: the weight error (data-free, or weighted by the
calibration Hessian's diagonal) or the group's output error ``eᵀ H_g e`` (activation-aware clipping, needs the
layer inputs' second moment). Held-out coordinates (super weights) never set a range and count as exact.

The result has the layout and encoding of :func:`~.quantize.quantize_weight`; GPTQ (:mod:`.gptq`) fixes its
static group grids with the same search before its column sweep.

>>> q = clip_quantize_weight(torch.randn(8, 64), bits=4, group_size=32, holdout=torch.tensor([[3, 5]]))
>>> q.dequantize()[3, 5].item()
0.0
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .packing import pack_codes
from .quantize import GroupLayout, QuantizedWeight, store_scale
from .settings import CodeSettings

__all__ = [
    "clip_codes",
    "clip_quantize_weight",
    "search_group_params",
    "hessian_group_blocks",
    "CLIP_OBJECTIVES",
    "DEFAULT_CLIP_GRID",
]

#: Shrink factors tried by the clip search: the group's range (absmax, or min and max) times each factor.
DEFAULT_CLIP_GRID: tuple[float, ...] = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.0 ... 0.5


#: What the clip search minimises per group (see :func:`search_group_params`):
#: ``"diagonal"``: ``Σ_j H_jj (w_j - q_j)²`` (uniform weights without a Hessian: plain weight MSE);
#: ``"hessian"``: ``(w - q)ᵀ H_g (w - q)`` with ``H_g`` the group's diagonal block of the calibration second
#: moment — the exact output error ``E‖(w - q)·x‖²`` of a per-channel layer, the within-group part otherwise.
CLIP_OBJECTIVES: tuple[str, ...] = ("diagonal", "hessian")


def check_hessian(hessian: torch.Tensor, in_features: int) -> None:
    """Refuse a second moment of the wrong shape or with non-finite values (shared with :mod:`.gptq`)."""
    if hessian.shape != (in_features, in_features):
        raise ValueError(
            f"hessian has shape {tuple(hessian.shape)}; expected ({in_features}, {in_features}) = (in_features, in_features)."
        )
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("hessian holds non-finite values; the calibration activations overflowed.")


def holdout_dense(shape: tuple[int, int], holdout: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Bool ``shape`` mask, True at the ``[k, 2]`` ``(row, col)`` coordinates of ``holdout``."""
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    if holdout is not None and holdout.numel():
        mask[holdout[:, 0].long().to(device), holdout[:, 1].long().to(device)] = True
    return mask


def _params_for_ratio(
    w: torch.Tensor, excluded: torch.Tensor, bits: int, symmetric: bool, ratio: float, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stored scale ``[..., G]`` (and float zero-point) of ``[..., G, group]`` groups with the range times ``ratio``.

    ``ratio=1`` reproduces :func:`~.quantize.quantize_weight` exactly.
    """
    if symmetric:
        absmax = torch.where(excluded, 0.0, w.abs()).amax(dim=-1) * ratio
        stored = store_scale(absmax / (2 ** (bits - 1) - 1), scale_dtype)
        return stored, None
    qmax = 2**bits - 1
    wmin = torch.where(excluded, torch.inf, w).amin(dim=-1).clamp(max=0.0) * ratio
    wmax = torch.where(excluded, -torch.inf, w).amax(dim=-1).clamp(min=0.0) * ratio
    stored = store_scale((wmax - wmin) / qmax, scale_dtype)
    zero = torch.round(-wmin / stored.to(torch.float32)).clamp(0, qmax)
    return stored, zero


def round_to_grid(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (float) and dequantized values of ``w`` with broadcastable ``scale``/``zero`` (float32)."""
    if zero is None:
        offset = 2 ** (bits - 1)
        q = torch.round(w / scale).clamp(-offset, offset - 1)
        return q + offset, q * scale
    codes = (torch.round(w / scale) + zero).clamp(0, 2**bits - 1)
    return codes, (codes - zero) * scale


def search_group_params(
    w: torch.Tensor,
    excluded: torch.Tensor,
    *,
    bits: int,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.float16,
    importance: torch.Tensor | None = None,
    hessian_blocks: torch.Tensor | None = None,
    grid: Sequence[float] = DEFAULT_CLIP_GRID,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group scale (and zero-point) minimising the group's error over clip ratios in ``grid``.

    The error is ``Σ importance·(w - Q(w))²`` or, with ``hessian_blocks``, ``eᵀ H_g e`` with ``e = w - Q(w)``:
    the output error the group causes when the layer's inputs have second moment ``H`` (activation-aware
    clipping; weight MSE ignores that a few input channels carry most of the signal, which is why it hurts
    coarse groups). Held-out coordinates count as exact (``e = 0``) and never set the range.

    Args:
        w: Grouped weight ``[out, G, group]`` (float32).
        excluded: Bool mask broadcastable to ``w``: padding and held-out coordinates, ignored by the
            range and by the error (held-out weights are kept exact, so their error is zero anyway).
        importance: Per-input weights ``[G, group]`` (e.g. the Hessian diagonal); ``None`` = uniform.
        hessian_blocks: ``[G, group, group]`` diagonal blocks of the inputs' second moment (zero on padding,
            see :func:`hessian_group_blocks`); replaces ``importance``.
        grid: Clip ratios to try; ``(1.0,)`` is plain absmax / min-max.

    Returns ``(stored_scale [out, G] in scale_dtype, zero [out, G] float or None)``.

    >>> w = torch.randn(4, 2, 8); ex = torch.zeros(2, 8, dtype=torch.bool)
    >>> s, z = search_group_params(w, ex, bits=4, symmetric=True)
    >>> s.shape, z is None
    (torch.Size([4, 2]), True)
    """
    excluded = excluded.expand_as(w)
    if importance is not None and hessian_blocks is not None:
        raise ValueError("search_group_params takes importance or hessian_blocks, not both.")
    if hessian_blocks is not None:
        if hessian_blocks.shape != (w.shape[-2], w.shape[-1], w.shape[-1]):
            raise ValueError(
                f"hessian_blocks has shape {tuple(hessian_blocks.shape)}; expected "
                f"{(w.shape[-2], w.shape[-1], w.shape[-1])} = (groups, group, group)."
            )
        blocks = hessian_blocks.to(w)
        weight = None
    else:
        weight = torch.ones_like(w) if importance is None else importance.to(w).expand_as(w)
        weight = torch.where(excluded, 0.0, weight)
    best_scale, best_zero, best_err = None, None, None
    for ratio in grid:
        scale, zero = _params_for_ratio(w, excluded, bits, symmetric, float(ratio), scale_dtype)
        s = scale.to(torch.float32).unsqueeze(-1)
        _, deq = round_to_grid(w, s, None if zero is None else zero.unsqueeze(-1), bits)
        if weight is None:
            e = torch.where(excluded, 0.0, w - deq)
            # eᵀ H_g e per (row, group): one batched matmul per group, no [out, G, group, group] temporary.
            err = (torch.einsum("...gi,gij->...gj", e, blocks) * e).sum(dim=-1)
        else:
            err = ((w - deq) ** 2 * weight).sum(dim=-1)
        if best_err is None:
            best_scale, best_zero, best_err = scale, zero, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def hessian_group_blocks(hessian: torch.Tensor, group_size: int) -> torch.Tensor:
    """The ``[G, group, group]`` diagonal blocks of an ``[in, in]`` second moment, zero-padded like the groups.

    ``group_size=-1`` gives the whole matrix as one block (per-channel quantization).

    >>> hessian_group_blocks(torch.eye(5), 2).shape
    torch.Size([3, 2, 2])
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}; expected a square (in_features, in_features) matrix.")
    in_features = hessian.shape[0]
    layout = GroupLayout(1, in_features, 8, group_size)
    group, groups = layout.effective_group_size, layout.num_groups
    pad = groups * group - in_features
    H = torch.nn.functional.pad(hessian.to(torch.float32), (0, pad, 0, pad))
    index = torch.arange(groups, device=H.device)
    return H.reshape(groups, group, groups, group)[index, :, index, :]


@torch.no_grad()
def clip_quantize_weight(
    weight: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    symmetric: bool = True,
    scale_dtype: torch.dtype = torch.float16,
    holdout: torch.Tensor | None = None,
    importance: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
    grid: Sequence[float] | None = DEFAULT_CLIP_GRID,
) -> QuantizedWeight:
    """Round-to-nearest with a per-group clip search.

    Data-free (weight MSE) by default; ``importance`` ``[in]`` weights the error per input (e.g. the
    calibration Hessian's diagonal); ``hessian`` ``[in, in]`` (the layer inputs' ``E[x xᵀ]``) makes the search
    minimise the output error ``(w - q)ᵀ H_g (w - q)`` of each group (activation-aware clipping: exact for
    ``group_size=-1``). Held-out coordinates never set a range and count as exact. Same layout and encoding
    as :func:`~.quantize.quantize_weight`; ``grid=None`` reproduces it exactly.

    >>> clip_quantize_weight(torch.randn(4, 16), bits=4, group_size=8).scale.shape
    torch.Size([4, 2])
    >>> x = torch.randn(64, 16)
    >>> clip_quantize_weight(torch.randn(4, 16), bits=4, group_size=-1, hessian=x.T @ x / 64).scale.shape
    torch.Size([4, 1])
    """
    if weight.dim() != 2:
        raise ValueError(f"clip_quantize_weight expects a 2-D weight, got shape {tuple(weight.shape)}.")
    out_features, in_features = weight.shape
    layout = GroupLayout(out_features, in_features, bits, group_size)
    group = layout.effective_group_size
    pad = layout.num_groups * group - in_features
    original = weight.detach().to(torch.float32)
    held = holdout_dense((out_features, in_features), holdout, weight.device)
    w = torch.nn.functional.pad(original, (0, pad)).reshape(out_features, layout.num_groups, group)
    excluded = torch.nn.functional.pad(held, (0, pad), value=True).reshape(out_features, layout.num_groups, group)
    if importance is not None:
        if importance.shape != (in_features,):
            raise ValueError(f"importance has shape {tuple(importance.shape)}; expected ({in_features},) = (in_features,).")
        importance = torch.nn.functional.pad(importance.to(torch.float32), (0, pad)).reshape(layout.num_groups, group)
    blocks = None
    if hessian is not None:
        if importance is not None:
            raise ValueError("clip_quantize_weight takes importance or hessian, not both.")
        check_hessian(hessian, in_features)
        blocks = hessian_group_blocks(hessian.to(weight.device), group_size)
    stored_scale, zero = search_group_params(
        w, excluded, bits=bits, symmetric=symmetric, scale_dtype=scale_dtype, importance=importance,
        hessian_blocks=blocks, grid=(1.0,) if not grid else tuple(grid),
    )
    codes, _ = round_to_grid(
        w, stored_scale.to(torch.float32).unsqueeze(-1), None if zero is None else zero.unsqueeze(-1), bits
    )
    codes = codes.reshape(out_features, -1)[:, :in_features]
    return pack_group_codes(codes, held, stored_scale, zero, layout, symmetric)


def pack_group_codes(
    codes: torch.Tensor,
    held: torch.Tensor,
    stored_scale: torch.Tensor,
    zero: torch.Tensor | None,
    layout: GroupLayout,
    symmetric: bool,
) -> QuantizedWeight:
    """Encode like :func:`~.quantize.quantize_weight`: held-out and padding positions get the zero code."""
    out_features, in_features = codes.shape
    group = layout.effective_group_size
    if symmetric:
        zero_code = torch.full((out_features, layout.num_groups), float(2 ** (layout.bits - 1)), device=codes.device)
    else:
        zero_code = zero
    zero_cols = zero_code[:, torch.arange(in_features, device=codes.device) // group]
    codes = torch.where(held, zero_cols, codes)
    pad = layout.num_groups * group - in_features
    if pad:
        codes = torch.cat([codes, zero_code.repeat_interleave(group, dim=1)[:, in_features:]], dim=1)
    codes = codes.reshape(out_features, layout.num_groups, group).to(torch.uint8)
    return QuantizedWeight(
        packed=pack_codes(codes, layout.bits),
        scale=stored_scale,
        zero_point=None if zero is None else zero.to(torch.uint8),
        layout=layout,
        symmetric=symmetric,
    )


def clip_codes(
    weight: torch.Tensor, settings: CodeSettings, holdout: torch.Tensor | None, hessian: torch.Tensor | None = None
) -> QuantizedWeight:
    """Clip-search codes (the common :data:`~.settings.CodeChooser` signature): :func:`clip_quantize_weight` over
    ``settings.clip_grid`` (:data:`DEFAULT_CLIP_GRID` when unset); ``hessian`` is read by the ``"hessian"``
    objective only, which needs it.

    >>> clip_codes(torch.randn(4, 16), CodeSettings(bits=4, group_size=8), None).scale.shape
    torch.Size([4, 2])
    """
    output = settings.clip_objective == "hessian"
    if output and hessian is None:
        raise ValueError("clip_objective='output' needs the layer's calibration statistics (hessian).")
    return clip_quantize_weight(
        weight, holdout=holdout, hessian=hessian if output else None, grid=settings.clip_grid or DEFAULT_CLIP_GRID,
        **settings.format_options(),
    )
