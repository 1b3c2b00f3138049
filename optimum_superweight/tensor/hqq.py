"""Data-free half-quadratic (HQQ-style) choice of each group's scale and zero, with held-out coordinates.

Round-to-nearest takes a group's range (absmax, or min and max) as its grid and rounds every weight to it.
That grid is rarely the best one: nothing moves it to where most weights lie. Following the half-quadratic
quantization idea (Badri & Shaji, 2023, "HQQ"), the grid is improved without any calibration data by
alternating three cheap steps per group, for the reconstruction error ``w - (s·q + m)`` under a
sparsity-promoting ``lp`` norm (p < 1):

1. ``q = clamp(round((w - m) / s))`` — the codes for the current grid;
2. ``e = shrink_p(w - (s·q + m))`` — the proximal step of the ``lp`` norm: errors below a threshold are
   treated as noise (0), only large ones are kept as the "outlier" part of the weight;
3. the least-squares fit of ``w - e`` by ``s·q + m`` over the group (closed form): for float offsets the
   offset ``m`` only (as HQQ does) unless the group is small relative to the grid's steps (then fitting the
   scale too, which may clip the extremes, pays: see :func:`hqq_quantize_weight`); the scale too for the
   integer forms, whose zero alone rarely moves.

The start matters: the group's min-max range with its zero moved onto a whole code (as HQQ starts), so that
0 is on the grid; the iterations keep the zero near it. Starting from the exact range (0 between two grid
points) reaches a lower weight error and a clearly worse model. Each group keeps the iterate with the
smallest squared error and leaves the loop once its grid no longer changes (a fixed point), so most groups
stop after a few steps: the cost is a few elementwise passes over the weight, linear in its size,
vectorised over the groups of a block of rows.

Three storage forms share the optimiser: asymmetric with a float offset (``w = s·q + m``; ``zero_point=
"float"``), asymmetric with an integer zero-point (``w = s·(q - z)``; ``"uint8"``: ``m = -s·z`` is rounded to
a whole code after every fit) and symmetric (``w = s·(q - 2^(b-1))``: only ``s`` is fitted).

With calibration statistics (``importance``: each input channel's mean squared activation, the diagonal of
the layer inputs' second moment ``E[x xᵀ]``), the data-free grid is then refined for the layer's *output*:
alternating codes (round to nearest on the stored grid) and the importance-weighted least-squares scale and
offset of each group, keeping the grid with the smallest weighted error (:func:`refine_group_grids`). An error
on a channel that carries large activations costs more at the output than one on a quiet channel; the
unweighted fit treats them alike. This is the diagonal of GPTQ's objective without its error feedback, and
the weighting llama.cpp's importance matrix gives its k-quants: it needs one forward pass over calibration
text, no Hessian, and no more time per weight than the data-free fit (measured in ``benchmarks/RESULTS.md``).

Super weights (``holdout``) are excluded from the range, from the fit and from the error, and encoded as
the group's zero code (integer forms: decodes to exactly 0) or the code nearest to 0 (float offsets); the
caller writes their exact value back.

>>> w = torch.randn(8, 128)
>>> q = hqq_quantize_weight(w, bits=4, group_size=64, holdout=torch.tensor([[3, 5]]))
>>> q.packed.shape, q.offset.shape
(torch.Size([8, 2, 32]), torch.Size([8, 2]))
"""

from __future__ import annotations

import torch

from .packing import pack_codes
from .quantize import (
    ZERO_POINTS,
    GroupLayout,
    QuantizedWeight,
    _grouped,
    _holdout_mask,
    store_offset,
    store_scale,
)
from .settings import CodeSettings

__all__ = ["hqq_codes", "hqq_quantize_weight", "fit_group_grids", "refine_group_grids", "shrink_lp", "DEFAULT_ITERS",
           "DEFAULT_REFINE_ITERS"]

#: Alternations of codes / shrink / fit. The error stops improving after ~10-20 on real weights.
DEFAULT_ITERS = 20
#: Alternations of codes / weighted fit when refining for the output; the weighted error settles within ~5.
DEFAULT_REFINE_ITERS = 8
#: Start grids of the refinement: the data-free grid, then narrowed about its centre by these factors.
DEFAULT_REFINE_SHRINKS = (1.0, 0.9, 0.8)


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of ``|x|^p / beta`` (generalised soft-thresholding; p = 1 is soft-thresholding).

    >>> shrink_lp(torch.tensor([-2.0, 0.01, 3.0]), beta=10.0, p=1.0).tolist()
    [-1.899999976158142, 0.0, 2.9000000953674316]
    """
    magnitude = x.abs()
    if p == 1:
        threshold = 1.0 / beta
    else:
        threshold = magnitude.clamp_min(1e-12).pow(p - 1) / beta
    return torch.sign(x) * torch.relu(magnitude - threshold)


def _initial_grid(
    w: torch.Tensor, valid: torch.Tensor | None, count: torch.Tensor, bits: int, form: str, rounded: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max (absmax) grid ``(s, m)`` and the range ``(wmin, wmax)``, all ``[N, 1]``; ``m = 0`` when
    symmetric (codes centred). Groups with no valid weight get ``(1, 0)``."""
    if valid is None:
        wmin, wmax = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    else:
        big = torch.finfo(torch.float32).max
        has = count > 0
        wmin = torch.where(valid, w, big).amin(-1, keepdim=True).where(has, 0.0)
        wmax = torch.where(valid, w, -big).amax(-1, keepdim=True).where(has, 0.0)
    if form == "symmetric":
        scale = torch.maximum(wmin.abs(), wmax.abs()) / (2 ** (bits - 1) - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.zeros_like(scale), wmin, wmax
    low, high = (wmin.clamp(max=0.0), wmax.clamp(min=0.0)) if form == "uint8" else (wmin, wmax)  # uint8: 0 is a code
    scale = (high - low) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    offset = low
    if form == "uint8" or rounded:
        offset = -torch.round(-offset / scale).clamp(0, 2**bits - 1) * scale
    return scale, offset, wmin, wmax


def _codes(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """``clamp(round((w - m) / s), low, high)`` with ``[N, 1]`` grids (2-D, contiguous: the fast broadcasts)."""
    inverse = 1.0 / scale
    return (w * inverse).sub_(offset * inverse).round_().clamp_(low, high)


def _grid_codes(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, form: str, low: int, high: int) -> torch.Tensor:
    """The codes :func:`_encode` stores for the stored grid ``(scale, offset)`` (``[..., 1]``), same arithmetic:
    the refinement scores exactly what will be written. Symmetric codes are centred (``low < 0``)."""
    # In place on the one temporary: the same operations in the same order as out of place, so the same codes.
    if form == "symmetric":
        return torch.div(w, scale).round_().clamp_(low, high)
    if form == "uint8":
        zero = torch.round(-offset / scale).clamp_(low, high)
        return torch.div(w, scale).round_().add_(zero).clamp_(low, high)
    return torch.sub(w, offset).div_(scale).round_().clamp_(low, high)


def fit_group_grids(
    w: torch.Tensor,
    excluded: torch.Tensor,
    *,
    bits: int,
    form: str = "float",
    iters: int = DEFAULT_ITERS,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    fit_scale: bool | None = None,
    rounded: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset ``[..., G]`` (``w ≈ s·q + m``, ``q`` in ``[0, 2^bits)``) of ``[..., G, group]`` groups.

    ``excluded`` (bool, broadcastable to ``w``) marks padding and held-out weights, which take no part.
    ``form`` is ``"float"``, ``"uint8"`` (``m`` a whole number of steps) or ``"symmetric"`` (``m = -2^(b-1)·s``).
    ``fit_scale=False`` updates only the offset (the HQQ library's choice). The values are float32, not yet
    rounded to a storage dtype.

    The loop works on per-group sums (``Σq``, ``Σq²``, ``Σqw``): the least-squares fit and the squared error
    of a grid follow from them in closed form, so each step is a few passes over the weight. The proximal
    step's error part is non-zero only where ``|w - ŵ| > beta^(-1/(2-p))``, which a group can reach only if
    its half-step or its clipped range exceeds that; it is computed only then.

    >>> s, m = fit_group_grids(torch.randn(4, 2, 16), torch.zeros(2, 16, dtype=torch.bool), bits=4)
    >>> s.shape, bool((s > 0).all())
    (torch.Size([4, 2]), True)
    """
    if form not in ("float", "uint8", "symmetric"):
        raise ValueError(f"form={form!r} is invalid: accepted values are 'float', 'uint8', 'symmetric'.")
    if fit_scale is None:  # float offsets: the offset alone (measured better than fitting both); otherwise the
        fit_scale = form != "float"  # scale too (a whole-code zero alone rarely moves)
    shape = w.shape[:-1]
    group = w.shape[-1]
    w = w.reshape(-1, group).to(torch.float32).contiguous()
    excluded = excluded.expand(*shape, group).reshape(-1, group)
    has_excluded = bool(excluded.any())
    valid = ~excluded if has_excluded else None
    weight = valid.to(torch.float32) if has_excluded else None
    w = w * weight if has_excluded else w  # excluded weights count as 0 in every sum below
    count = weight.sum(-1, keepdim=True) if has_excluded else torch.full((w.shape[0], 1), float(group))
    scale, offset, wmin, wmax = _initial_grid(w, valid, count, bits, form, rounded)
    symmetric = form == "symmetric"
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    # Per-group sums in float64: the error is a small difference of large terms.
    n = count.double()
    sum_w = w.sum(-1, keepdim=True).double()
    sum_ww = (w * w).sum(-1, keepdim=True).double()
    best_error = torch.full_like(n, torch.inf)
    best_scale, best_offset = scale.clone(), offset.clone()
    # Groups still moving. A group whose grid comes back unchanged from a step has reached a fixed point
    # (same codes, same fit) and leaves the loop: most do within a few steps, so the cost is a few passes.
    active = torch.arange(w.shape[0], device=w.device)
    for step in range(iters + 1):
        codes = _codes(w, scale, offset, low, high)
        counted = codes * weight if has_excluded else codes
        scratch = torch.mul(counted, codes)  # reused in place: the same products as written out
        sum_qq = scratch.sum(-1, keepdim=True).double()
        sums = _Sums(n, sum_w, sum_ww, counted.sum(-1, keepdim=True).double(), sum_qq,
                     torch.mul(counted, w, out=scratch).sum(-1, keepdim=True).double())
        error = sums.error(scale.double(), offset.double())
        better = error < best_error[active]
        best_error[active] = torch.where(better, error, best_error[active])
        best_scale[active] = torch.where(better, scale, best_scale[active])
        best_offset[active] = torch.where(better, offset, best_offset[active])
        if step == iters:
            break
        reach = torch.maximum(scale / 2, torch.maximum(wmax - (offset + high * scale), (offset + low * scale) - wmin))
        rows = (reach > beta ** (-1.0 / (2.0 - lp_norm))).squeeze(-1).nonzero().squeeze(-1)
        if rows.numel():  # the lp part: only groups whose error can pass the shrink threshold
            residual = w[rows] - (codes[rows] * scale[rows] + offset[rows])
            if has_excluded:
                residual = residual * weight[rows]
            outlier = shrink_lp(residual, beta, lp_norm)
            sums.sum_t = sums.sum_t.index_add(0, rows, -outlier.sum(-1, keepdim=True).double())
            sums.sum_qt = sums.sum_qt.index_add(0, rows, -(outlier * codes[rows]).sum(-1, keepdim=True).double())
        beta *= kappa
        new_scale, new_offset = sums.fit(scale.double(), form, high, fit_scale)
        moving = ((new_scale != scale) | (new_offset != offset)).squeeze(-1)
        if rows.numel():
            moving[rows] = True  # the shrink's weight grows every step: not a fixed point
        keep = moving.nonzero().squeeze(-1)
        if keep.numel() == 0:
            break
        if keep.numel() < moving.numel():
            active, w, n, sum_w, sum_ww, wmin, wmax = (t[keep] for t in (active, w, n, sum_w, sum_ww, wmin, wmax))
            weight = weight[keep] if has_excluded else None
        scale, offset = new_scale[keep], new_offset[keep]
    if symmetric:
        best_offset = -(2 ** (bits - 1)) * best_scale
    return best_scale.reshape(shape), best_offset.reshape(shape)


class _Sums:
    """Per-group sums (float64 ``[N, 1]``) from which a grid's squared error and least-squares fit follow."""

    def __init__(self, n, sum_w, sum_ww, sum_q, sum_qq, sum_qw):
        self.n, self.sum_w, self.sum_ww, self.sum_q, self.sum_qq, self.sum_qw = n, sum_w, sum_ww, sum_q, sum_qq, sum_qw
        self.sum_t, self.sum_qt = sum_w, sum_qw  # the fit's target w - e; e (the shrink's part) is usually 0

    def error(self, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """``Σ (w - s·q - m)²`` (symmetric grids: ``q`` centred and ``m = 0``)."""
        return (self.sum_ww - 2 * s * self.sum_qw - 2 * m * self.sum_w + s * s * self.sum_qq
                + 2 * s * m * self.sum_q + self.n * m * m)

    def fit(self, s: torch.Tensor, form: str, high: int, fit_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The least-squares grid for the current codes (float32), within ``form``'s constraints."""
        # The sums are weighted (an unweighted fit is the case of weights 1): every division below is guarded by
        # its own sign test, never by a fixed floor, so that scaling all weights by a constant changes no result.
        if form == "symmetric":
            fitted = _ratio(self.sum_qt, self.sum_qq)
            if fit_scale:
                s = torch.where(fitted > 0, fitted, s)
            return s.to(torch.float32), torch.zeros_like(s, dtype=torch.float32)
        n = torch.where(self.n > 0, self.n, torch.ones_like(self.n))  # a group with no weight: every sum is 0
        if fit_scale:
            variance = self.sum_qq - self.sum_q * self.sum_q / n
            fitted = _ratio(self.sum_qt - self.sum_q * self.sum_t / n, variance)
            s = torch.where((variance > 1e-12 * self.sum_qq) & (fitted > 0), fitted, s)
        m = (self.sum_t - s * self.sum_q) / n
        if form == "uint8":
            zero = torch.round(-m / s).clamp(0, high)
            if fit_scale:  # the best scale for that whole-code zero
                denominator = self.sum_qq - 2 * zero * self.sum_q + zero * zero * self.n
                fitted = _ratio(self.sum_qt - zero * self.sum_t, denominator)
                s = torch.where((denominator > 0) & (fitted > 0), fitted, s)
            m = -zero * s
        return s.to(torch.float32), m.to(torch.float32)


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` where the denominator is positive, else 0 (callers keep their value then)."""
    positive = denominator > 0
    return torch.where(positive, numerator / torch.where(positive, denominator, torch.ones_like(denominator)), 0.0)


def refine_group_grids(
    w: torch.Tensor,
    excluded: torch.Tensor,
    importance: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    *,
    bits: int,
    form: str,
    scale_dtype: torch.dtype,
    iters: int = DEFAULT_REFINE_ITERS,
    shrinks: tuple[float, ...] = DEFAULT_REFINE_SHRINKS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine grids ``(scale, offset)`` ``[..., G]`` of ``[..., G, group]`` groups for the importance-weighted error.

    ``importance`` (float, ``>= 0``, broadcastable to ``w``) weighs each weight's squared error, usually its input
    channel's mean squared activation; ``excluded`` weights (padding, held out) count 0. Each step chooses the
    codes on the grid as stored (``scale_dtype``), then the weighted least-squares grid for those codes within
    ``form``'s constraints; this runs from the start grid and from it narrowed about its centre by each factor
    of ``shrinks``, and each group's grid with the smallest weighted error is returned (never worse than the
    start: ``shrinks`` begins with 1).

    >>> w = torch.randn(4, 2, 16)
    >>> s, m = fit_group_grids(w, torch.zeros(2, 16, dtype=torch.bool), bits=4)
    >>> s2, m2 = refine_group_grids(w, torch.zeros(2, 16, dtype=torch.bool), torch.rand(2, 16), s, m, bits=4,
    ...                             form="float", scale_dtype=torch.float16)
    >>> s2.shape == s.shape
    True
    """
    shape = w.shape[:-1]
    group = w.shape[-1]
    w = w.reshape(-1, group).to(torch.float32)
    weight = torch.where(excluded, 0.0, importance.to(torch.float32)).expand(*shape, group).reshape(-1, group)
    symmetric = form == "symmetric"
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    n = weight.sum(-1, keepdim=True).double()
    sum_w = (weight * w).sum(-1, keepdim=True).double()
    sum_ww = (weight * w * w).sum(-1, keepdim=True).double()
    start_scale, start_offset = scale.reshape(-1, 1).to(torch.float32), offset.reshape(-1, 1).to(torch.float32)
    best_error = torch.full_like(n, torch.inf)
    best_scale, best_offset = start_scale.clone(), start_offset.clone()
    for shrink in shrinks:
        # The same grid narrowed about its centre: the weighted fit only moves to a nearby fixed point, and the
        # best one often clips more of a group's extremes than the data-free start does (coarse grids above all).
        scale = start_scale * shrink
        offset = start_offset + (1.0 - shrink) * start_scale * (high - low) / 2
        scale, offset = _stored_grid(scale, offset, form, bits, scale_dtype)
        # Groups whose grid comes back unchanged from a fit are at a fixed point (same codes, same error from
        # then on): they leave the loop once half have stopped, which changes no result (a group kept at its
        # fixed point repeats itself) but saves most passes.
        rows = torch.arange(w.shape[0], device=w.device)
        values, weights, count, total, squares = w, weight, n, sum_w, sum_ww
        for step in range(iters + 1):
            # The codes _encode will store for this grid, and their error summed directly: the expanded form
            # (Σ w·x² - 2s·Σ w·q·x + ...) cancels to noise in groups whose error is tiny beside their energy (fine
            # grids, massive channels) and could then prefer a worse grid.
            codes = _grid_codes(values, scale, offset, form, low, high)
            weighted = codes * weights
            # Two temporaries reused in place (the same products and sums as written out, so the same values):
            # these passes are most of the cost of choosing the default's codes.
            scratch = torch.mul(weighted, codes)
            sum_qq = scratch.sum(-1, keepdim=True).double()
            sum_qw = torch.mul(weighted, values, out=scratch).sum(-1, keepdim=True).double()
            sums = _Sums(count, total, squares, weighted.sum(-1, keepdim=True).double(), sum_qq, sum_qw)
            residual = torch.sub(values, torch.mul(codes, scale, out=scratch), out=scratch)
            if not symmetric:
                residual.sub_(offset)
            error = torch.mul(weights, residual, out=weighted).mul_(residual).sum(-1, keepdim=True).double()
            better = error < best_error[rows]
            best_error[rows] = torch.where(better, error, best_error[rows])
            best_scale[rows] = torch.where(better, scale, best_scale[rows])
            best_offset[rows] = torch.where(better, offset, best_offset[rows])
            if step == iters:
                break
            fitted_scale, fitted_offset = sums.fit(scale.double(), form, high, fit_scale=True)
            new_scale, new_offset = _stored_grid(fitted_scale, fitted_offset, form, bits, scale_dtype)
            keep = ((new_scale != scale) | (new_offset != offset)).squeeze(-1).nonzero().squeeze(-1)
            if keep.numel() == 0:
                break
            if keep.numel() <= rows.numel() // 2:  # copying the active weights pays only once many have stopped
                rows, values, weights, count, total, squares = (
                    t[keep] for t in (rows, values, weights, count, total, squares))
                new_scale, new_offset = new_scale[keep], new_offset[keep]
            scale, offset = new_scale, new_offset
    return best_scale.reshape(shape), best_offset.reshape(shape)


def _stored_grid(
    scale: torch.Tensor, offset: torch.Tensor, form: str, bits: int, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, offset)`` as :func:`_encode` will store them (float32): the codes are chosen against these."""
    stored = store_scale(scale, scale_dtype).to(torch.float32)
    if form == "float":
        return stored, store_offset(offset, scale_dtype).to(torch.float32)
    if form == "uint8":
        return stored, -torch.round(-offset / stored).clamp(0, 2**bits - 1) * stored
    return stored, -(2 ** (bits - 1)) * stored


@torch.no_grad()
def hqq_quantize_weight(
    weight: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    zero_point: str = "float",
    scale_dtype: torch.dtype = torch.float16,
    holdout: torch.Tensor | None = None,
    iters: int = DEFAULT_ITERS,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    fit_scale: bool | None = None,
    rounded: bool = True,
    recenter: bool = False,
    importance: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Group quantization of a ``[out_features, in_features]`` weight with optimised grids (see the module doc).

    Args:
        weight: Dense weight (any float dtype).
        bits: Code width (2 to 8).
        group_size: Inputs per scale, or ``-1`` for one scale per row.
        symmetric: ``w = s·(q - 2^(b-1))`` (only the scale is optimised) instead of an asymmetric form.
        zero_point: Asymmetric storage: ``"float"`` (``w = s·q + m``, ``offset`` in ``scale_dtype``) or
            ``"uint8"`` (``w = s·(q - z)``, integer ``zero_point``).
        scale_dtype: Storage dtype of scales (and float offsets); codes are chosen against the stored values.
        holdout: ``int`` tensor ``[k, 2]`` of ``(row, col)`` coordinates kept out of everything (the caller
            restores their exact values).
        iters: Optimisation steps; ``0`` is round-to-nearest on the min-max (absmax) grid.
        lp_norm, beta: The error norm's ``p`` and the proximal step's initial weight (HQQ's defaults).
        fit_scale: Fit the scale as well as the offset at each step. Default: always for the integer forms; for
            float offsets when ``4 * 2**bits <= group_size <= 128`` (see the code for why).
        importance: Optional ``[in_features]`` weight of each input channel's error (its mean squared
            activation on calibration text): the data-free grids are then refined for the layer's output
            (:func:`refine_group_grids`).

    >>> q = hqq_quantize_weight(torch.randn(4, 100), bits=3, group_size=64, zero_point="uint8")
    >>> q.zero_point.dtype, q.offset is None
    (torch.uint8, True)
    """
    if weight.dim() != 2:
        raise ValueError(f"hqq_quantize_weight expects a 2-D weight, got shape {tuple(weight.shape)}.")
    if zero_point not in ZERO_POINTS:
        raise ValueError(f"zero_point={zero_point!r} is invalid: accepted values are {', '.join(map(repr, ZERO_POINTS))}.")
    form = "symmetric" if symmetric else zero_point
    layout = GroupLayout(weight.shape[0], weight.shape[1], bits, group_size)
    if fit_scale is None and form == "float":
        # Fitting the scale can clip a group's extremes, which concentrates the grid on the bulk of the
        # weights. On whole rows that clips too much (clearly worse); on groups of 4+ weights per grid step
        # and at most 128 weights it pays on Gemma 3 (all seven projection types) and is a wash on SmolLM2,
        # although the weight error barely moves: see benchmarks/RESULTS.md. Elsewhere the offset alone.
        fit_scale = group_size != -1 and 4 * 2**bits <= group_size <= 128
    w, padding = _grouped(weight, layout)
    excluded = padding.expand_as(w)
    held = _holdout_mask(layout, holdout, w.device)
    if held is not None:
        excluded = excluded | held
    scale, offset = fit_group_grids(
        w, excluded, bits=bits, form=form, iters=iters, lp_norm=lp_norm, beta=beta, fit_scale=fit_scale, rounded=rounded
    )
    if importance is not None:
        scale, offset = refine_group_grids(
            w, excluded, _grouped_importance(importance, layout), scale, offset, bits=bits, form=form,
            scale_dtype=scale_dtype,
        )
    return _encode(w, excluded, scale, offset, layout, form, scale_dtype, recenter)


def _grouped_importance(importance: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """``[G, group]`` importance of each input column (padding 0) with a small floor, so that a channel no
    calibration token used still counts a little (its error is not free for other inputs)."""
    if importance.shape != (layout.in_features,):
        raise ValueError(
            f"importance has shape {tuple(importance.shape)}: expected ({layout.in_features},), one value per input channel."
        )
    values = importance.to(torch.float32).clamp_min(0.0).nan_to_num(nan=0.0, posinf=0.0)
    values = values + 1e-3 * values.mean().clamp_min(torch.finfo(torch.float32).tiny)
    padded = torch.zeros(layout.num_groups * layout.effective_group_size, dtype=torch.float32, device=values.device)
    padded[: layout.in_features] = values
    return padded.reshape(layout.num_groups, layout.effective_group_size)


def _encode(
    w: torch.Tensor,
    excluded: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    layout: GroupLayout,
    form: str,
    scale_dtype: torch.dtype,
    recenter: bool = False,
) -> QuantizedWeight:
    """Round the grid to storage, choose codes against the stored values, pack."""
    bits = layout.bits
    qmax = 2**bits - 1
    stored_scale = store_scale(scale, scale_dtype)
    s = stored_scale.to(torch.float32).unsqueeze(-1)
    zero_point = stored_offset = None
    if form == "symmetric":
        center = 2 ** (bits - 1)
        codes = _grid_codes(w, s, None, form, -center, center - 1) + center
        zero_code = torch.full_like(s, float(center))
    elif form == "uint8":
        zero = torch.round(-offset / s.squeeze(-1)).clamp_(0, qmax)
        codes = _grid_codes(w, s, offset.unsqueeze(-1), form, 0, qmax)
        zero_code = zero.unsqueeze(-1)
        zero_point = zero.to(torch.uint8)
    else:
        stored_offset = store_offset(offset, scale_dtype)
        m = stored_offset.to(torch.float32).unsqueeze(-1)
        codes = _grid_codes(w, s, m, form, 0, qmax)
        if recenter:  # the offset that makes each group's mean error 0 for these codes
            valid = (~excluded).to(torch.float32)
            mean = ((w - codes * s) * valid).sum(-1) / valid.sum(-1).clamp_min(1.0)
            stored_offset = store_offset(torch.where(valid.sum(-1) > 0, mean, stored_offset.float()), scale_dtype)
            m = stored_offset.to(torch.float32).unsqueeze(-1)
        zero_code = torch.round(-m / s).clamp_(0, qmax)  # decodes to the value nearest 0
    codes = torch.where(excluded, zero_code.expand_as(codes), codes).to(torch.uint8)
    return QuantizedWeight(
        packed=pack_codes(codes, bits),
        scale=stored_scale,
        zero_point=zero_point,
        layout=layout,
        symmetric=form == "symmetric",
        offset=stored_offset,
    )


def hqq_codes(
    weight: torch.Tensor, settings: CodeSettings, holdout: torch.Tensor | None, hessian: torch.Tensor | None = None
) -> QuantizedWeight:
    """HQQ codes (the common :data:`~.settings.CodeChooser` signature). With ``settings.importance ==
    "activations"`` and a ``hessian`` (the inputs' second moment ``[in, in]``, or only its diagonal ``[in]``), the
    grids are refined for the layer's output error weighted by its diagonal (see the module doc); otherwise they
    are data-free.

    >>> hqq_codes(torch.randn(4, 64), CodeSettings(bits=4, group_size=32, symmetric=False, zero_point="float"), None).offset.shape
    torch.Size([4, 2])
    """
    importance = None
    if settings.importance == "activations" and hessian is not None:
        importance = hessian.diagonal() if hessian.dim() == 2 else hessian
    return hqq_quantize_weight(
        weight, holdout=holdout, zero_point=settings.zero_point, iters=DEFAULT_ITERS, importance=importance,
        **settings.format_options(),
    )
