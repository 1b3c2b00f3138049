"""Error-feedback (GPTQ) quantization, with held-out super weights, in the RTN format.

:func:`quantize_weight` rounds every weight to its nearest code independently. :func:`gptq_quantize_weight`
uses the second moment ``H = E[x xᵀ]`` of a layer's inputs (collected on calibration text, see
:mod:`optimum_superweight.models.calibration`) to choose the codes column by column, pushing each column's
rounding error onto the columns not yet quantized so that ``‖(W - Q) x‖²`` — the error of the layer's
*output* — stays small (Frantar et al. 2022, "GPTQ"). Only the choice of codes and scales differs from
round-to-nearest: the result is a :class:`~.quantize.QuantizedWeight` with the same group layout, code
encoding, scales and zero-points, so it packs, saves and dequantizes exactly like an RTN weight.

Super weights (``holdout``) are handled explicitly:

- they are excluded from every scale and from the clip search, so they can neither stretch a group's
  range nor be clipped;
- they are encoded as the group's zero code (dequantized 0) and their exact value is written back by the
  caller, so the optimisation treats them as *fixed* at their exact original value: when GPTQ reaches
  such a coordinate its "quantized" value is the original weight. Any difference between that and the
  error-updated target is a real output error, which is fed forward to the remaining columns like any
  other rounding error (that is the optimal move under a fixed coordinate; dropping it would leave the
  output error of earlier columns uncompensated).

Scales are fixed per group before the column sweep ("static groups") from the original weight, optionally
shrunk by a per-group clip search that minimises the (Hessian-diagonal-weighted) reconstruction error
(:func:`.clip.search_group_params`; the clip search has its own module, :mod:`.clip`). Fixed scales are what allow the activation-order sweep (largest input
energy first) while keeping the contiguous group layout on disk.

Example:
    >>> x = torch.randn(512, 64)
    >>> w = torch.randn(16, 64)
    >>> q = gptq_quantize_weight(w, x.T @ x / 512, bits=4, group_size=32, holdout=torch.tensor([[3, 5]]))
    >>> q.dequantize()[3, 5].item()
    0.0
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .clip import (  # the clip search moved to .clip; its names stay importable from here
    CLIP_OBJECTIVES,
    DEFAULT_CLIP_GRID,
    check_hessian,
    clip_quantize_weight,
    hessian_group_blocks,
    holdout_dense,
    pack_group_codes,
    round_to_grid,
    search_group_params,
)
from .quantize import GroupLayout, QuantizedWeight
from .settings import CodeSettings

__all__ = [
    "gptq_codes",
    "gptq_codes_shared",
    "gptq_quantize_weight",
    "gptq_quantize_weights",
    "gptq_fixed_grid",
    "gptq_on_grid",
    # re-exported from .clip (imported from here before the clip search had its own module)
    "clip_quantize_weight",
    "search_group_params",
    "hessian_group_blocks",
    "CLIP_OBJECTIVES",
    "DEFAULT_CLIP_GRID",
]


@torch.no_grad()
def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    symmetric: bool = True,
    scale_dtype: torch.dtype = torch.float16,
    holdout: torch.Tensor | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    clip_grid: Sequence[float] | None = DEFAULT_CLIP_GRID,
    clip_objective: str = "diagonal",
) -> QuantizedWeight:
    """Quantize ``weight`` ``[out, in]`` with GPTQ error feedback under the input second moment ``hessian`` ``[in, in]``.

    Args:
        weight: Dense weight (any float dtype).
        hessian: ``E[x xᵀ]`` (or any positive multiple) of the layer's inputs on calibration data.
        bits, group_size, symmetric, scale_dtype: As in :func:`~.quantize.quantize_weight`; the result has the
            same layout and encoding.
        holdout: ``int`` ``[k, 2]`` ``(row, col)`` coordinates kept exact (excluded from scales, encoded as the
            zero code, treated as fixed at their original value by the error feedback).
        damp: Added to the diagonal, as a fraction of its mean, so ``hessian`` is safely invertible.
        block_size: Columns updated together (lazy batch updates; a speed knob, same result up to rounding).
        act_order: Quantize columns by decreasing input energy (``diag(hessian)``) first.
        clip_grid: Clip ratios searched per group; ``None`` = plain range.
        clip_objective: Error the clip search minimises, one of :data:`CLIP_OBJECTIVES`: ``"diagonal"``
            (Hessian-diagonal-weighted weight error) or ``"hessian"`` (the group's output error ``eᵀ H_g e``,
            measured on the undamped ``hessian``).

    >>> h = torch.eye(16)
    >>> gptq_quantize_weight(torch.randn(4, 16), h, bits=4, group_size=8).packed.shape
    torch.Size([4, 2, 4])
    """
    if weight.dim() != 2:
        raise ValueError(f"gptq_quantize_weight expects a 2-D weight, got shape {tuple(weight.shape)}.")
    out_features, in_features = weight.shape
    check_hessian(hessian, in_features)
    if not (damp >= 0):
        raise ValueError(f"damp={damp!r} is invalid: expected a number >= 0 (typically 0.01).")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} is invalid: expected a positive integer.")
    if clip_objective not in CLIP_OBJECTIVES:
        raise ValueError(f"clip_objective={clip_objective!r} is invalid: expected one of {', '.join(map(repr, CLIP_OBJECTIVES))}.")
    layout = GroupLayout(out_features, in_features, bits, group_size)
    group = layout.effective_group_size
    device = weight.device
    original = weight.detach().to(torch.float32)
    held = holdout_dense((out_features, in_features), holdout, device)

    H = hessian.detach().to(device=device, dtype=torch.float32).clone()
    diag = torch.diagonal(H)
    dead = diag <= 0
    # Inputs never seen in calibration: no information about them, no compensation through them.
    H[dead, dead] = 1.0

    # -- static group parameters, from the original weight with the super weights held out ----------------
    padded_in = layout.num_groups * group
    pad = padded_in - in_features
    w_grouped = torch.nn.functional.pad(original, (0, pad)).reshape(out_features, layout.num_groups, group)
    excluded = torch.nn.functional.pad(held, (0, pad), value=True).reshape(out_features, layout.num_groups, group)
    grid = (1.0,) if not clip_grid else tuple(clip_grid)
    importance = blocks = None
    if len(grid) > 1 and clip_objective == "hessian":
        blocks = hessian_group_blocks(H, group_size)
    else:
        importance = torch.nn.functional.pad(torch.diagonal(H).clone(), (0, pad)).reshape(layout.num_groups, group)
    stored_scale, zero = search_group_params(
        w_grouped, excluded, bits=bits, symmetric=symmetric, scale_dtype=scale_dtype, importance=importance,
        hessian_blocks=blocks, grid=grid,
    )
    col_group = torch.arange(in_features, device=device) // group
    scale_cols = stored_scale.to(torch.float32)[:, col_group]  # [out, in]
    zero_cols = None if zero is None else zero[:, col_group]

    codes = _column_sweep(original, H, scale_cols, zero_cols, held, bits=bits, damp=damp, block_size=block_size,
                          act_order=act_order)
    return pack_group_codes(codes, held, stored_scale, zero, layout, symmetric)


def _column_sweep(
    original: torch.Tensor,
    H: torch.Tensor,
    scale_cols: torch.Tensor,
    zero_cols: torch.Tensor | None,
    held: torch.Tensor,
    *,
    bits: int,
    damp: float,
    block_size: int,
    act_order: bool,
) -> torch.Tensor:
    """GPTQ's column sweep under fixed per-element ``scale_cols`` (and integer ``zero_cols``): codes ``[out, in]``.

    ``H`` is the (dead-input-patched, undamped) second moment; it is modified in place.
    """
    out_features, in_features = original.shape
    device = original.device
    # -- the column sweep ----------------------------------------------------------------------------------
    # Everything is held transposed ([in, out]) so that a column of W is a contiguous row: the sweep is a
    # Python loop over columns and strided column access would dominate its time.
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(in_features, device=device)
    Wt = original.t()[perm].contiguous()
    H = H[perm][:, perm]
    scale_t = scale_cols.t()[perm].contiguous()
    zero_t = None if zero_cols is None else zero_cols.t()[perm].contiguous()
    held_t = held.t()[perm]
    fixed_t = original.t()[perm]
    held_columns = set(torch.nonzero(held_t.any(dim=1)).flatten().tolist())
    H.diagonal().add_(damp * float(torch.diagonal(H).mean()))
    Hinv = _upper_cholesky_inverse(H)

    codes_t = torch.empty((in_features, out_features), dtype=torch.float32, device=device)
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        W1 = Wt[i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            w = W1[i]
            code, q = round_to_grid(w, scale_t[j], None if zero_t is None else zero_t[j], bits)
            if j in held_columns:  # super weights: fixed at their exact value
                q = torch.where(held_t[j], fixed_t[j], q)
            codes_t[j] = code
            err = Err1[i]
            torch.div(w - q, Hinv1[i, i], out=err)
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1.0)
        Wt[i2:].sub_(Hinv[i1:i2, i2:].t() @ Err1)

    codes = torch.empty((out_features, in_features), dtype=torch.float32, device=device)
    codes[:, perm] = codes_t.t()
    return codes


def _patched_hessian(hessian: torch.Tensor, in_features: int, device: torch.device) -> torch.Tensor:
    check_hessian(hessian, in_features)
    H = hessian.detach().to(device=device, dtype=torch.float32).clone()
    dead = torch.diagonal(H) <= 0
    # Inputs never seen in calibration: no information about them, no compensation through them.
    H[dead, dead] = 1.0
    return H


@torch.no_grad()
def gptq_fixed_grid(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    *,
    bits: int,
    holdout: torch.Tensor | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
) -> torch.Tensor:
    """GPTQ codes under a quantization grid given per weight, returned dequantized (held-out weights exact).

    For layouts this package does not store but wants to measure, such as the paper's flat 1-D blocks of the
    row-major matrix: the caller computes each block's scale (and integer zero-point) and broadcasts them to
    ``[out, in]``; the error feedback then chooses the codes. ``zero_point=None`` means symmetric signed codes
    (``w = s*q``, ``q`` in ``[-2^(b-1), 2^(b-1)-1]``), else ``w = s*(q - z)`` with ``q`` in ``[0, 2^b-1]``.

    >>> w = torch.randn(4, 8); s = torch.full((4, 8), 0.3)
    >>> gptq_fixed_grid(w, torch.eye(8), s, bits=4, holdout=torch.tensor([[1, 2]]))[1, 2] == w[1, 2]
    tensor(True)
    """
    if weight.dim() != 2:
        raise ValueError(f"gptq_fixed_grid expects a 2-D weight, got shape {tuple(weight.shape)}.")
    if scale.shape != weight.shape or (zero_point is not None and zero_point.shape != weight.shape):
        raise ValueError(f"scale and zero_point must have the weight's shape {tuple(weight.shape)}.")
    if not bool((scale > 0).all()):
        raise ValueError("scale must be > 0 everywhere.")
    original = weight.detach().to(torch.float32)
    H = _patched_hessian(hessian, original.shape[1], original.device)
    held = holdout_dense(tuple(original.shape), holdout, original.device)
    zero = None if zero_point is None else zero_point.to(torch.float32)
    codes = _column_sweep(original, H, scale.to(torch.float32), zero, held, bits=bits, damp=damp,
                          block_size=block_size, act_order=act_order)
    dense = (codes - (2 ** (bits - 1) if zero is None else zero)) * scale.to(torch.float32)
    return torch.where(held, original, dense)


@torch.no_grad()
def gptq_on_grid(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: QuantizedWeight,
    *,
    holdout: torch.Tensor | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
) -> QuantizedWeight:
    """GPTQ codes for ``weight`` on the scales (and integer zero-points) of ``grid``, a quantization of the same
    shape chosen by another method (its codes are not read): that method picks each group's grid, the error
    feedback under ``hessian`` picks the codes within it. The result stores ``grid``'s scales and zero-points as
    they are; ``holdout`` as in :func:`gptq_quantize_weight`. Float-offset grids (``w = s·q + m``) have no integer
    code lattice the sweep could round to and are refused.

    >>> from optimum_superweight.tensor.quantize import quantize_weight
    >>> w = torch.randn(4, 16); grid = quantize_weight(w, bits=4, group_size=8, symmetric=False)
    >>> torch.equal(gptq_on_grid(w, torch.eye(16), grid).scale, grid.scale)
    True
    """
    layout = grid.layout
    if grid.offset is not None:
        raise ValueError("gptq_on_grid needs a symmetric or integer zero-point grid, got float offsets.")
    if weight.dim() != 2 or tuple(weight.shape) != (layout.out_features, layout.in_features):
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not match the grid's "
                         f"{(layout.out_features, layout.in_features)}.")
    original = weight.detach().to(torch.float32)
    device = original.device
    H = _patched_hessian(hessian, layout.in_features, device)
    held = holdout_dense(tuple(original.shape), holdout, device)
    col_group = torch.arange(layout.in_features, device=device) // layout.effective_group_size
    scale_cols = grid.scale.to(device, torch.float32)[:, col_group]
    zero_cols = None if grid.symmetric else grid.zero_point.to(device, torch.float32)[:, col_group]
    codes = _column_sweep(original, H, scale_cols, zero_cols, held, bits=layout.bits, damp=damp,
                          block_size=block_size, act_order=act_order)
    zero = None if grid.symmetric else grid.zero_point.to(device)
    return pack_group_codes(codes, held, grid.scale.to(device), zero, layout, grid.symmetric)


def gptq_quantize_weights(
    weights: Sequence[torch.Tensor],
    hessian: torch.Tensor,
    *,
    holdouts: Sequence[torch.Tensor | None] | None = None,
    **kwargs,
) -> list[QuantizedWeight]:
    """:func:`gptq_quantize_weight` of several weights that read the same input (q/k/v, gate/up) in one sweep.

    GPTQ treats output rows independently under a shared ``hessian``, so stacking the matrices gives the
    same codes as quantizing each alone, for one column sweep instead of several (the sweep's cost is per
    column, not per row).

    >>> h = torch.eye(16)
    >>> [q.packed.shape[0] for q in gptq_quantize_weights([torch.randn(4, 16), torch.randn(2, 16)], h, bits=4, group_size=8)]
    [4, 2]
    """
    weights = list(weights)
    if not weights:
        return []
    holdouts = list(holdouts) if holdouts is not None else [None] * len(weights)
    if len(holdouts) != len(weights):
        raise ValueError(f"holdouts has {len(holdouts)} entries for {len(weights)} weights.")
    offsets, stacked_holdout, row = [], [], 0
    for weight, holdout in zip(weights, holdouts):
        if weight.dim() != 2 or weight.shape[1] != weights[0].shape[1]:
            raise ValueError("gptq_quantize_weights needs 2-D weights with the same in_features.")
        if holdout is not None and holdout.numel():
            stacked_holdout.append(holdout.long().reshape(-1, 2) + torch.tensor([row, 0], device=holdout.device))
        offsets.append((row, row + weight.shape[0]))
        row += weight.shape[0]
    holdout = torch.cat(stacked_holdout) if stacked_holdout else None
    stacked = gptq_quantize_weight(torch.cat([w.detach().to(torch.float32) for w in weights]), hessian, holdout=holdout, **kwargs)
    pieces = []
    for begin, end in offsets:
        layout = GroupLayout(end - begin, stacked.layout.in_features, stacked.layout.bits, stacked.layout.group_size)
        pieces.append(
            QuantizedWeight(
                packed=stacked.packed[begin:end].clone(),
                scale=stacked.scale[begin:end].clone(),
                zero_point=None if stacked.zero_point is None else stacked.zero_point[begin:end].clone(),
                layout=layout,
                symmetric=stacked.symmetric,
            )
        )
    return pieces


def _upper_cholesky_inverse(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``H⁻¹`` (GPTQ's trick: its rows give every sequential OBS update)."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info):
        # Nearly singular despite dampening (e.g. duplicated inputs): add more until it factors.
        eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        mean = float(torch.diagonal(H).mean())
        for extra in (0.1, 1.0, 10.0):
            L, info = torch.linalg.cholesky_ex(H + extra * mean * eye)
            if not int(info):
                break
        else:
            raise ValueError("hessian is not positive definite even after dampening; check the calibration data.")
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True)


def gptq_codes(
    weight: torch.Tensor, settings: CodeSettings, holdout: torch.Tensor | None, hessian: torch.Tensor | None = None
) -> QuantizedWeight:
    """GPTQ codes (the common :data:`~.settings.CodeChooser` signature); ``hessian`` is required.

    >>> gptq_codes(torch.randn(4, 16), CodeSettings(bits=4, group_size=8), None, torch.eye(16)).packed.shape
    torch.Size([4, 2, 4])
    """
    if hessian is None:
        raise ValueError("method='gptq' needs the layer's calibration statistics (hessian).")
    return gptq_quantize_weight(weight, hessian, holdout=holdout, **_gptq_options(settings))


def gptq_codes_shared(
    weights: Sequence[torch.Tensor],
    settings: CodeSettings,
    holdouts: Sequence[torch.Tensor | None],
    hessian: torch.Tensor,
) -> list[QuantizedWeight]:
    """:func:`gptq_codes` of weights that read one input (one ``hessian``) in a single column sweep
    (:func:`gptq_quantize_weights`): the same codes as one call each, for the cost of one.

    >>> h = torch.eye(16)
    >>> [q.packed.shape[0] for q in gptq_codes_shared([torch.randn(4, 16), torch.randn(2, 16)], CodeSettings(bits=4, group_size=8), [None, None], h)]
    [4, 2]
    """
    return gptq_quantize_weights(weights, hessian, holdouts=holdouts, **_gptq_options(settings))


def _gptq_options(settings: CodeSettings) -> dict:
    return dict(
        settings.format_options(), damp=settings.damp, act_order=settings.act_order, clip_grid=settings.clip_grid,
        clip_objective=settings.clip_objective,
    )
