"""GPTQ error feedback and clip search: better output error than RTN, same format, super weights exact."""

from __future__ import annotations

import pytest
import torch

from optimum_superweight.tensor.gptq import (
    clip_quantize_weight,
    gptq_quantize_weight,
    gptq_quantize_weights,
    search_group_params,
)
from optimum_superweight.tensor.packing import unpack_codes
from optimum_superweight.tensor.quantize import quantize_weight, restore_exact


def _correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=generator) / d**0.5
    scales = torch.linspace(0.2, 3.0, d)  # uneven input energy, so act-order and weighting matter
    return (torch.randn(n, d, generator=generator) @ mix + 0.1 * torch.randn(n, d, generator=generator)) * scales


def _output_error(weight: torch.Tensor, dense: torch.Tensor, x: torch.Tensor) -> float:
    return float(((weight - dense) @ x.T).pow(2).mean())


def _dense(quantized, holdout: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    dense = quantized.dequantize()
    return restore_exact(dense, holdout, weight[holdout[:, 0], holdout[:, 1]])


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 48, -1])
def test_gptq_beats_rtn_on_hessian_weighted_error(symmetric, group_size):
    x = _correlated_inputs(1024, 96)
    hessian = x.T @ x / x.shape[0]
    weight = torch.randn(40, 96, generator=torch.Generator().manual_seed(1))
    holdout = torch.tensor([[3, 5], [17, 90]])
    weight[3, 5] = 25.0  # an outlier that would wreck its group's scale if it were not held out
    rtn = quantize_weight(weight, bits=4, group_size=group_size, symmetric=symmetric, holdout=holdout)
    gptq = gptq_quantize_weight(weight, hessian, bits=4, group_size=group_size, symmetric=symmetric, holdout=holdout)
    rtn_error = _output_error(weight, _dense(rtn, holdout, weight), x)
    gptq_error = _output_error(weight, _dense(gptq, holdout, weight), x)
    assert gptq_error < 0.75 * rtn_error


def test_gptq_same_format_super_weights_exact_and_codes_in_range():
    x = _correlated_inputs(512, 70)
    hessian = x.T @ x / x.shape[0]
    weight = torch.randn(12, 70)
    holdout = torch.tensor([[3, 5], [7, 69]])
    for bits, symmetric in ((3, True), (4, False), (8, True)):
        rtn = quantize_weight(weight, bits=bits, group_size=32, symmetric=symmetric, holdout=holdout)
        q = gptq_quantize_weight(weight, hessian, bits=bits, group_size=32, symmetric=symmetric, holdout=holdout)
        assert q.packed.shape == rtn.packed.shape and q.packed.dtype == torch.uint8
        assert q.scale.shape == rtn.scale.shape and q.scale.dtype == torch.float16
        assert (q.zero_point is None) == symmetric
        codes = unpack_codes(q.packed, bits, 32)
        assert int(codes.max()) < 2**bits
        dense = q.dequantize()
        assert dense[3, 5].item() == 0.0 and dense[7, 69].item() == 0.0  # the zero code: exact value added back
        restored = _dense(q, holdout, weight)
        assert restored[3, 5].item() == weight[3, 5].item() and restored[7, 69].item() == weight[7, 69].item()


def test_gptq_is_deterministic():
    x = _correlated_inputs(256, 64)
    hessian = x.T @ x / x.shape[0]
    weight = torch.randn(16, 64)
    a = gptq_quantize_weight(weight, hessian, bits=4, group_size=16, symmetric=False)
    b = gptq_quantize_weight(weight, hessian, bits=4, group_size=16, symmetric=False)
    assert torch.equal(a.packed, b.packed) and torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)


@pytest.mark.parametrize("symmetric", [True, False])
def test_identity_hessian_without_search_is_rtn(symmetric):
    weight = torch.randn(12, 70)
    holdout = torch.tensor([[3, 5]])
    rtn = quantize_weight(weight, bits=4, group_size=20, symmetric=symmetric, holdout=holdout)
    gptq = gptq_quantize_weight(
        weight, torch.eye(70), bits=4, group_size=20, symmetric=symmetric, holdout=holdout, act_order=False, clip_grid=None
    )
    clip = clip_quantize_weight(weight, bits=4, group_size=20, symmetric=symmetric, holdout=holdout, grid=None)
    for q in (gptq, clip):
        assert torch.equal(q.packed, rtn.packed) and torch.equal(q.scale, rtn.scale)


def test_clip_search_never_worse_than_absmax_and_ignores_held_out():
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(2))
    weight[0, 0] = 40.0
    holdout = torch.tensor([[0, 0]])
    plain = quantize_weight(weight, bits=4, group_size=-1, holdout=holdout)
    clipped = clip_quantize_weight(weight, bits=4, group_size=-1, holdout=holdout)
    error = lambda q: float((_dense(q, holdout, weight) - weight).pow(2).sum())  # noqa: E731
    assert error(clipped) <= error(plain)
    # Without the hold-out the outlier sets row 0's scale: 40/7 per step, far coarser than the others'.
    assert clipped.scale[0, 0].item() < 1.0


def test_search_group_params_is_per_group_optimal_on_its_grid():
    w = torch.randn(6, 5, 16, generator=torch.Generator().manual_seed(3))
    w[:, 0, 0] = 8.0  # outlier groups: clipping pays there
    excluded = torch.zeros(5, 16, dtype=torch.bool)
    grid = (1.0, 0.9, 0.8, 0.7, 0.6)

    def group_error(scale):
        s = scale.to(torch.float32).unsqueeze(-1)
        deq = torch.round(w / s).clamp(-8, 7) * s
        return (w - deq).pow(2).sum(-1)

    best, _ = search_group_params(w, excluded, bits=4, symmetric=True, grid=grid)
    for ratio in grid:
        fixed, _ = search_group_params(w * 1.0, excluded, bits=4, symmetric=True, grid=(ratio,))
        assert bool((group_error(best) <= group_error(fixed) + 1e-6).all())
    plain, _ = search_group_params(w, excluded, bits=4, symmetric=True, grid=(1.0,))
    assert bool((group_error(best)[:, 0] < group_error(plain)[:, 0]).any())


def test_gptq_rejects_bad_hessian_and_arguments():
    weight = torch.randn(4, 8)
    with pytest.raises(ValueError, match="hessian has shape"):
        gptq_quantize_weight(weight, torch.eye(7), bits=4, group_size=8)
    with pytest.raises(ValueError, match="non-finite"):
        gptq_quantize_weight(weight, torch.full((8, 8), float("nan")), bits=4, group_size=8)
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize_weight(weight, torch.eye(8), bits=4, group_size=8, damp=-1.0)


def test_gptq_handles_dead_and_singular_inputs():
    x = _correlated_inputs(64, 32)
    x[:, 4] = 0.0  # never active
    x[:, 9] = x[:, 8]  # duplicated input: singular without dampening
    hessian = x.T @ x / x.shape[0]
    weight = torch.randn(8, 32)
    q = gptq_quantize_weight(weight, hessian, bits=4, group_size=16, damp=1e-6)
    assert torch.isfinite(q.dequantize()).all()


def test_stacked_sweep_equals_separate_sweeps():
    x = _correlated_inputs(256, 48)
    hessian = x.T @ x / x.shape[0]
    generator = torch.Generator().manual_seed(4)
    weights = [torch.randn(rows, 48, generator=generator) for rows in (10, 6, 3)]
    holdouts = [None, torch.tensor([[2, 7]]), torch.tensor([[0, 47], [2, 1]])]
    together = gptq_quantize_weights(weights, hessian, holdouts=holdouts, bits=4, group_size=16, symmetric=False)
    for weight, holdout, joint in zip(weights, holdouts, together):
        alone = gptq_quantize_weight(weight, hessian, holdout=holdout, bits=4, group_size=16, symmetric=False)
        assert joint.layout == alone.layout
        assert torch.equal(joint.scale, alone.scale) and torch.equal(joint.zero_point, alone.zero_point)
        # Same codes up to float rounding of a differently shaped matmul: the dequantized weights agree closely.
        torch.testing.assert_close(joint.dequantize(), alone.dequantize(), atol=float(alone.scale.max()) * 1.01, rtol=0)
        assert (joint.packed != alone.packed).float().mean() < 0.01
