"""An experiment of issue 24 (not the package's code): the default's importance-weighted grid refinement with a
weighted ``lp`` error (``Σ e_j |w - ŵ|^p``, ``p < 1`` like HQQ's data-free fit) instead of the weighted squared
error, by iteratively reweighted least squares. Used by ``quality_multitext.py`` rows ``w_lp*`` through
:func:`patched`, which swaps it in for ``optimum_superweight.tensor.hqq.refine_group_grids`` during one row."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from optimum_superweight.tensor import hqq


def refine_lp(w, excluded, importance, scale, offset, *, bits, form, scale_dtype, p: float,
              iters: int = hqq.DEFAULT_REFINE_ITERS, shrinks=hqq.DEFAULT_REFINE_SHRINKS):
    """:func:`~optimum_superweight.tensor.hqq.refine_group_grids` for ``Σ e |r|^p``: each step fits the grid by
    least squares with weights ``e · ((|r| + ε) / ε)^(p - 2)`` (``ε`` a quarter of the group's step), so that a
    weight far off the grid (clipped) pulls it less, and keeps each group's grid of smallest weighted lp error."""
    shape, group = w.shape[:-1], w.shape[-1]
    w = w.reshape(-1, group).to(torch.float32)
    base = torch.where(excluded, 0.0, importance.to(torch.float32)).expand(*shape, group).reshape(-1, group)
    symmetric = form == "symmetric"
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    start_scale, start_offset = scale.reshape(-1, 1).to(torch.float32), offset.reshape(-1, 1).to(torch.float32)
    best_error = torch.full((w.shape[0], 1), torch.inf, dtype=torch.float64)
    best_scale, best_offset = start_scale.clone(), start_offset.clone()
    for shrink in shrinks:
        scale = start_scale * shrink
        offset = start_offset + (1.0 - shrink) * start_scale * (high - low) / 2
        scale, offset = hqq._stored_grid(scale, offset, form, bits, scale_dtype)
        for step in range(iters + 1):
            codes = hqq._grid_codes(w, scale, offset, form, low, high)
            residual = w - codes * scale - (0.0 if symmetric else offset)
            magnitude = residual.abs()
            error = (base * magnitude.pow(p)).sum(-1, keepdim=True).double()
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_scale = torch.where(better, scale, best_scale)
            best_offset = torch.where(better, offset, best_offset)
            if step == iters:
                break
            eps = 0.25 * scale
            weights = base * ((magnitude + eps) / eps).pow(p - 2)
            sums = hqq._Sums(weights.sum(-1, keepdim=True).double(), (weights * w).sum(-1, keepdim=True).double(),
                             (weights * w * w).sum(-1, keepdim=True).double(),
                             (weights * codes).sum(-1, keepdim=True).double(),
                             (weights * codes * codes).sum(-1, keepdim=True).double(),
                             (weights * codes * w).sum(-1, keepdim=True).double())
            fitted_scale, fitted_offset = sums.fit(scale.double(), form, high, fit_scale=True)
            new_scale, new_offset = hqq._stored_grid(fitted_scale, fitted_offset, form, bits, scale_dtype)
            if bool(((new_scale == scale) & (new_offset == offset)).all()):
                break
            scale, offset = new_scale, new_offset
    return best_scale.reshape(shape), best_offset.reshape(shape)


@contextlib.contextmanager
def patched(p: float) -> Iterator[None]:
    original = hqq.refine_group_grids
    hqq.refine_group_grids = lambda *args, **kwargs: refine_lp(*args, p=p, **kwargs)
    try:
        yield
    finally:
        hqq.refine_group_grids = original


def _weighted_error(w, weight, scale, offset, form, bits, scale_dtype):
    symmetric = form == "symmetric"
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    s, m = hqq._stored_grid(scale.reshape(-1, 1), offset.reshape(-1, 1), form, bits, scale_dtype)
    codes = hqq._grid_codes(w, s, m, form, low, high)
    residual = w - codes * s - (0.0 if symmetric else m)
    return (weight * residual * residual).sum(-1, keepdim=True)


def refine_margin(w, excluded, importance, scale, offset, *, bits, form, scale_dtype, margin: float, **kwargs):
    """The default's refinement, whose grid replaces the data-free one only in groups where it lowers the weighted
    error by more than ``margin`` (a fraction): elsewhere the data-free grid stays."""
    refined_scale, refined_offset = _ORIGINAL(w, excluded, importance, scale, offset, bits=bits, form=form,
                                              scale_dtype=scale_dtype, **kwargs)
    shape, group = w.shape[:-1], w.shape[-1]
    flat = w.reshape(-1, group).to(torch.float32)
    weight = torch.where(excluded, 0.0, importance.to(torch.float32)).expand(*shape, group).reshape(-1, group)
    start = _weighted_error(flat, weight, scale, offset, form, bits, scale_dtype)
    refined = _weighted_error(flat, weight, refined_scale, refined_offset, form, bits, scale_dtype)
    move = (refined < (1.0 - margin) * start).reshape(shape)
    return torch.where(move, refined_scale, scale.to(refined_scale.dtype)), torch.where(move, refined_offset, offset.to(refined_offset.dtype))


_ORIGINAL = hqq.refine_group_grids


@contextlib.contextmanager
def patched_margin(margin: float) -> Iterator[None]:
    hqq.refine_group_grids = lambda *args, **kwargs: refine_margin(*args, margin=margin, **kwargs)
    try:
        yield
    finally:
        hqq.refine_group_grids = _ORIGINAL


_ORIGINAL_FIT = hqq.fit_group_grids


@contextlib.contextmanager
def offset_only_start() -> Iterator[None]:
    """The data-free fit with the offset alone (``fit_scale=False``, the HQQ library's choice) for float offsets."""
    def fit(*args, **kwargs):
        if kwargs.get("form", "float") == "float":
            kwargs["fit_scale"] = False
        return _ORIGINAL_FIT(*args, **kwargs)

    hqq.fit_group_grids = fit
    try:
        yield
    finally:
        hqq.fit_group_grids = _ORIGINAL_FIT
