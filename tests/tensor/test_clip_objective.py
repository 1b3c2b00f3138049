"""Activation-aware clip search: the output error ``eᵀ H e`` is what it minimises, super weights stay out of it."""

from __future__ import annotations

import pytest
import torch

from optimum_superweight.tensor.gptq import (
    DEFAULT_CLIP_GRID,
    clip_quantize_weight,
    gptq_quantize_weight,
    hessian_group_blocks,
    search_group_params,
)
from optimum_superweight.tensor.quantize import restore_exact


def _inputs_with_massive_channel(n: int = 512, d: int = 48, seed: int = 0) -> torch.Tensor:
    """Correlated inputs in which channel 5 carries most of the energy (like a massive activation)."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=generator) / d**0.5
    x = torch.randn(n, d, generator=generator) @ mix + 0.1 * torch.randn(n, d, generator=generator)
    x[:, 5] *= 30.0
    return x


def _row_output_error(weight: torch.Tensor, dense: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    e = weight - dense
    return ((e @ hessian) * e).sum(dim=1)


def _dense(q, weight: torch.Tensor, holdout: torch.Tensor | None) -> torch.Tensor:
    dense = q.dequantize()
    if holdout is not None:
        restore_exact(dense, holdout, weight[holdout[:, 0], holdout[:, 1]])
    return dense


def test_hessian_group_blocks_are_the_padded_diagonal_blocks():
    h = torch.arange(25, dtype=torch.float32).reshape(5, 5)
    blocks = hessian_group_blocks(h, 2)
    assert blocks.shape == (3, 2, 2)
    assert torch.equal(blocks[0], h[:2, :2]) and torch.equal(blocks[1], h[2:4, 2:4])
    assert torch.equal(blocks[2], torch.tensor([[24.0, 0.0], [0.0, 0.0]]))  # padding contributes nothing
    assert torch.equal(hessian_group_blocks(h, -1), h.unsqueeze(0))
    with pytest.raises(ValueError, match="square"):
        hessian_group_blocks(torch.zeros(3, 4), 2)


@pytest.mark.parametrize("symmetric", [True, False])
def test_hessian_objective_is_minimised_per_channel(symmetric):
    x = _inputs_with_massive_channel()
    hessian = x.T @ x / x.shape[0]
    weight = torch.randn(24, 48, generator=torch.Generator().manual_seed(1))
    weight[:, 7] *= 6.0  # large weights on a quiet input: weight MSE wants to keep them, the output does not care
    chosen = _row_output_error(
        weight, clip_quantize_weight(weight, bits=4, group_size=-1, symmetric=symmetric, hessian=hessian).dequantize(), hessian
    )
    # The result is the per-row minimum over the grid: no single clip ratio, and not the MSE search, does better.
    for ratio in DEFAULT_CLIP_GRID:
        fixed = clip_quantize_weight(weight, bits=4, group_size=-1, symmetric=symmetric, grid=(ratio,))
        assert bool((chosen <= _row_output_error(weight, fixed.dequantize(), hessian) * (1 + 1e-5) + 1e-7).all())
    mse = clip_quantize_weight(weight, bits=4, group_size=-1, symmetric=symmetric)
    mse_error = _row_output_error(weight, mse.dequantize(), hessian)
    assert bool((chosen <= mse_error * (1 + 1e-5) + 1e-7).all())
    assert float(chosen.sum()) < 0.9 * float(mse_error.sum())


def test_hessian_objective_with_groups_matches_a_direct_search():
    x = _inputs_with_massive_channel(d=40)
    hessian = x.T @ x / x.shape[0]
    weight = torch.randn(6, 40, generator=torch.Generator().manual_seed(2))
    grid = (1.0, 0.8, 0.6)
    got = clip_quantize_weight(weight, bits=3, group_size=16, hessian=hessian, grid=grid)  # groups 16, 16, 8 (+8 pad)
    blocks = hessian_group_blocks(hessian, 16)
    w = torch.nn.functional.pad(weight, (0, 8)).reshape(6, 3, 16)
    excluded = torch.zeros(3, 16, dtype=torch.bool)
    excluded[2, 8:] = True
    scale, _ = search_group_params(w, excluded, bits=3, symmetric=True, hessian_blocks=blocks, grid=grid)
    assert torch.equal(got.scale, scale)
    # Brute force for one group: its error under each ratio, computed on the ungrouped matrix.
    for row in range(6):
        errors = []
        for ratio in grid:
            single = clip_quantize_weight(weight, bits=3, group_size=16, grid=(ratio,)).dequantize()
            e = (weight - single)[row, 16:32]
            errors.append(float(e @ hessian[16:32, 16:32] @ e))
        best = clip_quantize_weight(weight, bits=3, group_size=16, grid=(grid[errors.index(min(errors))],))
        assert got.scale[row, 1] == best.scale[row, 1]


@pytest.mark.parametrize("symmetric", [True, False])
def test_held_out_weight_is_exact_and_does_not_set_the_range(symmetric):
    x = _inputs_with_massive_channel()
    hessian = x.T @ x / x.shape[0]
    weight = torch.randn(8, 48, generator=torch.Generator().manual_seed(3))
    holdout = torch.tensor([[2, 5]])  # on the massive input channel, like a super weight
    calm = weight.clone()
    calm[2, 5] = 0.0
    weight[2, 5] = 60.0
    with_outlier = clip_quantize_weight(weight, bits=4, group_size=-1, symmetric=symmetric, holdout=holdout, hessian=hessian)
    without = clip_quantize_weight(calm, bits=4, group_size=-1, symmetric=symmetric, holdout=holdout, hessian=hessian)
    # The outlier changes nothing: same scales, zero-points and codes as if it were 0.
    assert torch.equal(with_outlier.scale, without.scale) and torch.equal(with_outlier.packed, without.packed)
    dense = with_outlier.dequantize()
    assert dense[2, 5].item() == 0.0
    assert _dense(with_outlier, weight, holdout)[2, 5].item() == 60.0
    # Not held out, it dominates the output error of its row: the search must keep it in range, so row 2's scale
    # is set by it (60 / 7 or 60 / 15 at ratio 1), far coarser than with the hold-out.
    plain = clip_quantize_weight(weight, bits=4, group_size=-1, symmetric=symmetric, hessian=hessian)
    assert plain.scale[2, 0].item() > 3 * with_outlier.scale[2, 0].item()


def test_clip_objective_arguments_are_validated():
    weight = torch.randn(4, 8)
    with pytest.raises(ValueError, match="importance or hessian"):
        clip_quantize_weight(weight, bits=4, group_size=8, importance=torch.ones(8), hessian=torch.eye(8))
    with pytest.raises(ValueError, match="hessian has shape"):
        clip_quantize_weight(weight, bits=4, group_size=8, hessian=torch.eye(7))
    with pytest.raises(ValueError, match="clip_objective"):
        gptq_quantize_weight(weight, torch.eye(8), bits=4, group_size=8, clip_objective="mse")
    with pytest.raises(ValueError, match="hessian_blocks has shape"):
        search_group_params(torch.randn(4, 1, 8), torch.zeros(1, 8, dtype=torch.bool), bits=4, symmetric=True,
                            hessian_blocks=torch.zeros(1, 4, 4))


def test_gptq_with_hessian_clip_objective_keeps_format_and_super_weight():
    x = _inputs_with_massive_channel()
    hessian = x.T @ x / x.shape[0]
    weight = torch.randn(12, 48, generator=torch.Generator().manual_seed(4))
    holdout = torch.tensor([[3, 5]])
    weight[3, 5] = 40.0
    q = gptq_quantize_weight(weight, hessian, bits=4, group_size=-1, holdout=holdout, clip_objective="hessian")
    assert q.packed.shape == (12, 1, 24) and q.scale.shape == (12, 1)
    dense = _dense(q, weight, holdout)
    assert dense[3, 5].item() == 40.0
    rtn = clip_quantize_weight(weight, bits=4, group_size=-1, holdout=holdout, grid=None)
    err = lambda d: float(_row_output_error(weight, d, hessian).sum())  # noqa: E731
    assert err(dense) < 0.75 * err(_dense(rtn, weight, holdout))


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_channel_output_clip_through_superweight_linear_and_safetensors(tmp_path, symmetric):
    from safetensors.torch import load_file, save_file

    from optimum_superweight.nn.linear import SuperWeightLinear

    x = _inputs_with_massive_channel(d=40)
    hessian = x.T @ x / x.shape[0]
    linear = torch.nn.Linear(40, 9, bias=True)
    with torch.no_grad():
        linear.weight[4, 5] = 30.0  # the super weight, on the massive input channel
    holdout = torch.tensor([[4, 5]], dtype=torch.int32)
    quantized = clip_quantize_weight(linear.weight, bits=4, group_size=-1, symmetric=symmetric, holdout=holdout, hessian=hessian)
    layer = SuperWeightLinear.from_linear(linear, bits=4, group_size=-1, symmetric=symmetric, super_weights=[(4, 5)],
                                          quantized=quantized)
    dense = layer.dequantize_weight(torch.float32)
    assert dense[4, 5].item() == 30.0
    expected = _dense(quantized, linear.weight.detach(), holdout.long())
    torch.testing.assert_close(dense, expected)
    # The activation-aware codes beat plain per-channel RTN on the layer's output.
    plain = SuperWeightLinear.from_linear(linear, bits=4, group_size=-1, symmetric=symmetric, super_weights=[(4, 5)])
    with torch.no_grad():
        reference = linear(x)
        assert float((layer(x) - reference).pow(2).mean()) < float((plain(x) - reference).pow(2).mean())
    # Same stored format: a plain state-dict round trip through safetensors gives the same outputs.
    save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, tmp_path / "layer.safetensors")
    fresh = SuperWeightLinear.from_linear(torch.nn.Linear(40, 9, bias=True), bits=4, group_size=-1, symmetric=symmetric,
                                          super_weights=[(0, 0)])
    fresh.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


def test_gptq_fixed_grid_matches_gptq_and_beats_rtn_on_the_same_grid():
    from optimum_superweight.tensor.gptq import gptq_fixed_grid

    x = _inputs_with_massive_channel(d=32)
    hessian = x.T @ x / x.shape[0]
    weight = torch.randn(10, 32, generator=torch.Generator().manual_seed(5))
    holdout = torch.tensor([[2, 5]])
    weight[2, 5] = 25.0
    # The same grid as the package's group-16 GPTQ: identical result.
    q = gptq_quantize_weight(weight, hessian, bits=4, group_size=16, symmetric=False, holdout=holdout, clip_grid=None)
    scale = q.scale.float().repeat_interleave(16, dim=1)
    zero = q.zero_point.float().repeat_interleave(16, dim=1)
    dense = gptq_fixed_grid(weight, hessian, scale, zero, bits=4, holdout=holdout)
    torch.testing.assert_close(dense, _dense(q, weight, holdout))
    # An arbitrary grid (one scale for two rows, like a flat block): held-out exact, output error below RTN's.
    flat_scale = weight.abs().reshape(5, -1).amax(dim=1).repeat_interleave(2).unsqueeze(1).expand(10, 32) / 7
    flat_scale = torch.where(torch.arange(10).unsqueeze(1) == 2, 1.0, flat_scale).contiguous()
    got = gptq_fixed_grid(weight, hessian, flat_scale, bits=4, holdout=holdout)
    assert got[2, 5].item() == 25.0
    rtn = torch.round(weight / flat_scale).clamp(-8, 7) * flat_scale
    rtn[2, 5] = 25.0
    err = lambda d: float(_row_output_error(weight, d, hessian).sum())  # noqa: E731
    assert err(got) < 0.75 * err(rtn)
    with pytest.raises(ValueError, match="shape"):
        gptq_fixed_grid(weight, hessian, flat_scale[:, :4], bits=4)
    with pytest.raises(ValueError, match="> 0"):
        gptq_fixed_grid(weight, hessian, torch.zeros_like(weight), bits=4)
