"""Error-feedback (GPTQ) quantization and scale search, with held-out super weights, in the RTN format.

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
(:func:`search_group_params`). Fixed scales are what allow the activation-order sweep (largest input
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

from .packing import pack_codes
from .quantize import GroupLayout, QuantizedWeight, store_scale

__all__ = [
    "gptq_quantize_weight",
    "gptq_quantize_weights",
    "clip_quantize_weight",
    "gptq_fixed_grid",
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


def _check_hessian(hessian: torch.Tensor, in_features: int) -> None:
    if hessian.shape != (in_features, in_features):
        raise ValueError(
            f"hessian has shape {tuple(hessian.shape)}; expected ({in_features}, {in_features}) = (in_features, in_features)."
        )
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("hessian holds non-finite values; the calibration activations overflowed.")


def _holdout_dense(shape: tuple[int, int], holdout: torch.Tensor | None, device: torch.device) -> torch.Tensor:
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


def _fake_quant(
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
        _, deq = _fake_quant(w, s, None if zero is None else zero.unsqueeze(-1), bits)
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
    held = _holdout_dense((out_features, in_features), holdout, weight.device)
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
        _check_hessian(hessian, in_features)
        blocks = hessian_group_blocks(hessian.to(weight.device), group_size)
    stored_scale, zero = search_group_params(
        w, excluded, bits=bits, symmetric=symmetric, scale_dtype=scale_dtype, importance=importance,
        hessian_blocks=blocks, grid=(1.0,) if not grid else tuple(grid),
    )
    codes, _ = _fake_quant(
        w, stored_scale.to(torch.float32).unsqueeze(-1), None if zero is None else zero.unsqueeze(-1), bits
    )
    codes = codes.reshape(out_features, -1)[:, :in_features]
    return _pack(codes, held, stored_scale, zero, layout, symmetric)


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
    _check_hessian(hessian, in_features)
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
    held = _holdout_dense((out_features, in_features), holdout, device)

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
    return _pack(codes, held, stored_scale, zero, layout, symmetric)


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
            code, q = _fake_quant(w, scale_t[j], None if zero_t is None else zero_t[j], bits)
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
    _check_hessian(hessian, in_features)
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
    held = _holdout_dense(tuple(original.shape), holdout, original.device)
    zero = None if zero_point is None else zero_point.to(torch.float32)
    codes = _column_sweep(original, H, scale.to(torch.float32), zero, held, bits=bits, damp=damp,
                          block_size=block_size, act_order=act_order)
    dense = (codes - (2 ** (bits - 1) if zero is None else zero)) * scale.to(torch.float32)
    return torch.where(held, original, dense)


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


def _pack(
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
