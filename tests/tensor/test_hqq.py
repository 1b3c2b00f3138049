"""The half-quadratic grid optimiser: lower error than round-to-nearest, held-out weights untouched, every layout."""

from __future__ import annotations

import pytest
import torch

from optimum_superweight.tensor.hqq import fit_group_grids, hqq_quantize_weight, shrink_lp
from optimum_superweight.tensor.quantize import dequantize_weight, held_out_decoded, restore_exact


def _weight_with_outliers(out_features=64, in_features=256, seed=0):
    torch.manual_seed(seed)
    weight = torch.randn(out_features, in_features) * 0.02
    outliers = torch.rand(out_features, in_features) < 0.005
    return torch.where(outliers, weight * 25, weight)


def _mse(quantized, weight, holdout=None):
    dense = quantized.dequantize()
    if holdout is not None:
        restore_exact(dense, holdout, weight[holdout[:, 0], holdout[:, 1]])
    return ((dense - weight) ** 2).mean().item()


FORMS = [dict(symmetric=False, zero_point="float"), dict(symmetric=False, zero_point="uint8"), dict(symmetric=True)]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_optimiser_beats_round_to_nearest_on_weights_with_outliers(form, bits):
    weight = _weight_with_outliers()
    rtn = hqq_quantize_weight(weight, bits=bits, group_size=64, iters=0, **form)
    optimised = hqq_quantize_weight(weight, bits=bits, group_size=64, **form)
    assert _mse(optimised, weight) < 0.97 * _mse(rtn, weight)


@pytest.mark.parametrize("form", FORMS)
def test_eight_bits_is_no_worse(form):
    weight = _weight_with_outliers()
    rtn = hqq_quantize_weight(weight, bits=8, group_size=-1, iters=0, **form)
    optimised = hqq_quantize_weight(weight, bits=8, group_size=-1, **form)
    assert _mse(optimised, weight) <= _mse(rtn, weight) * 1.001


def test_round_to_nearest_step_matches_the_package_rtn_for_integer_forms():
    from optimum_superweight.tensor.quantize import quantize_weight

    weight = _weight_with_outliers()
    for symmetric in (True, False):
        ours = hqq_quantize_weight(weight, bits=4, group_size=64, symmetric=symmetric, zero_point="uint8", iters=0)
        rtn = quantize_weight(weight, bits=4, group_size=64, symmetric=symmetric)
        assert torch.equal(ours.packed, rtn.packed) and torch.equal(ours.scale, rtn.scale)


@pytest.mark.parametrize("form", FORMS)
def test_held_out_weights_take_no_part_and_come_back_exact(form):
    weight = _weight_with_outliers()
    holdout = torch.tensor([[3, 5], [10, 200], [63, 255]])
    planted = weight.clone()
    planted[holdout[:, 0], holdout[:, 1]] = torch.tensor([50.0, -80.0, 1e4])  # would wreck any group's range
    zeroed = weight.clone()
    zeroed[holdout[:, 0], holdout[:, 1]] = 0.0
    a = hqq_quantize_weight(planted, bits=4, group_size=64, holdout=holdout, **form)
    b = hqq_quantize_weight(zeroed, bits=4, group_size=64, holdout=holdout, **form)
    # The held-out values changed nothing: same grids, same codes everywhere else.
    assert torch.equal(a.scale, b.scale) and torch.equal(a.packed, b.packed)
    dense = a.dequantize()
    if a.offset is None:
        assert (dense[holdout[:, 0], holdout[:, 1]] == 0).all()
    else:  # the code nearest 0; the kernels add the difference
        decoded = held_out_decoded(a.packed, a.scale, a.offset, a.layout, holdout)
        assert torch.equal(decoded, dense[holdout[:, 0], holdout[:, 1]])
        steps = a.scale[holdout[:, 0], holdout[:, 1] // 64].float()
        assert (decoded.abs() <= steps / 2 + 1e-6).all()
    restore_exact(dense, holdout, planted[holdout[:, 0], holdout[:, 1]])
    assert torch.equal(dense[holdout[:, 0], holdout[:, 1]], planted[holdout[:, 0], holdout[:, 1]])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("in_features, group_size", [(256, 64), (576, 128), (100, 64), (200, -1)])
@pytest.mark.parametrize("form", FORMS)
def test_layouts_round_trip(bits, in_features, group_size, form):
    """Ragged last groups and per-row grids: shapes, code range, and dequantize == scale * q + offset."""
    weight = _weight_with_outliers(24, in_features)
    q = hqq_quantize_weight(weight, bits=bits, group_size=group_size, holdout=torch.tensor([[1, in_features - 1]]), **form)
    assert q.packed.shape == q.layout.packed_shape and q.scale.shape == q.layout.scale_shape
    assert q.scale.dtype == torch.float16 and bool((q.scale.float() > 0).all())
    if form.get("zero_point") == "float" and not form["symmetric"]:
        assert q.offset.dtype == torch.float16 and q.offset.shape == q.layout.scale_shape and q.zero_point is None
    elif not form["symmetric"]:
        assert q.zero_point.dtype == torch.uint8 and q.offset is None
    dense = dequantize_weight(q.packed, q.scale, q.zero_point, q.layout, symmetric=q.symmetric, offset=q.offset)
    assert dense.shape == weight.shape and torch.isfinite(dense).all()
    # No worse than a plain grid over the same layout, by more than storage rounding.
    plain = hqq_quantize_weight(weight, bits=bits, group_size=group_size, holdout=torch.tensor([[1, in_features - 1]]), iters=0, **form)
    assert _mse(q, weight) <= _mse(plain, weight) * 1.01


def test_constant_and_empty_groups():
    weight = torch.zeros(4, 64)
    weight[1] = 0.5  # constant, not zero
    weight[2, 0] = 7.0  # a group whose only non-zero weight is held out
    for form in FORMS:
        q = hqq_quantize_weight(weight, bits=4, group_size=32, holdout=torch.tensor([[2, 0]]), **form)
        dense = q.dequantize()
        restore_exact(dense, torch.tensor([[2, 0]]), torch.tensor([7.0]))
        assert torch.allclose(dense, weight, atol=1e-3), form


def test_fit_group_grids_validates_form_and_shrink():
    with pytest.raises(ValueError, match="form"):
        fit_group_grids(torch.randn(2, 1, 8), torch.zeros(1, 8, dtype=torch.bool), bits=4, form="nf4")
    with pytest.raises(ValueError, match="zero_point"):
        hqq_quantize_weight(torch.randn(2, 8), bits=4, group_size=8, zero_point="int")
    x = torch.tensor([-1.0, -0.01, 0.0, 0.02, 2.0])
    out = shrink_lp(x, beta=10.0, p=0.7)
    assert out[1:4].eq(0).all() and (out[[0, 4]].abs() < x[[0, 4]].abs()).all() and (out.sign() * x.sign() >= 0).all()


def _weighted_error(dense, weight, importance, holdout=None):
    error = (dense - weight) ** 2 * importance
    if holdout is not None:
        error[holdout[:, 0], holdout[:, 1]] = 0
    return float(error.sum())


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("in_features", "group_size"), [(256, 64), (200, 64), (256, -1), (144, 48)])
def test_importance_refinement_lowers_the_weighted_error_and_keeps_held_out_weights_exact(form, in_features, group_size):
    weight = _weight_with_outliers(in_features=in_features)
    torch.manual_seed(1)
    importance = torch.rand(in_features) ** 4 * 100  # a few loud channels, as real activations have
    holdout = torch.tensor([[3, 5], [10, in_features - 1]])
    plain = hqq_quantize_weight(weight, bits=4, group_size=group_size, holdout=holdout, **form)
    refined = hqq_quantize_weight(weight, bits=4, group_size=group_size, holdout=holdout, importance=importance, **form)
    before = _weighted_error(plain.dequantize(), weight, importance, holdout)
    after = _weighted_error(refined.dequantize(), weight, importance, holdout)
    assert after < 0.98 * before
    dense = refined.dequantize()
    if form.get("zero_point") != "float":  # integer forms encode held-out weights as the code that decodes to 0
        assert (dense[holdout[:, 0], holdout[:, 1]] == 0).all()
    restore_exact(dense, holdout, weight[holdout[:, 0], holdout[:, 1]])
    assert torch.equal(dense[holdout[:, 0], holdout[:, 1]], weight[holdout[:, 0], holdout[:, 1]])


def test_uniform_importance_is_no_worse_than_the_data_free_grid_and_codes_match_the_stored_grid():
    weight = _weight_with_outliers()
    plain = hqq_quantize_weight(weight, bits=4, group_size=64)
    refined = hqq_quantize_weight(weight, bits=4, group_size=64, importance=torch.ones(256))
    assert _mse(refined, weight) <= _mse(plain, weight) * (1 + 1e-6)
    # The codes are round-to-nearest on the grid as stored (float16 scale and offset).
    scale = refined.scale.float().repeat_interleave(64, -1)
    offset = refined.offset.float().repeat_interleave(64, -1)
    nearest = torch.round((weight - offset) / scale).clamp(0, 15) * scale + offset
    torch.testing.assert_close(refined.dequantize(), nearest, rtol=0, atol=1e-6)


def test_importance_is_checked_and_tolerates_dead_channels():
    weight = _weight_with_outliers()
    with pytest.raises(ValueError, match=r"importance has shape \(128,\): expected \(256,\)"):
        hqq_quantize_weight(weight, bits=4, group_size=64, importance=torch.ones(128))
    dead = torch.zeros(256)
    dead[:64] = 1.0  # groups whose channels never fired still get a finite grid from the small floor
    quantized = hqq_quantize_weight(weight, bits=4, group_size=64, importance=dead)
    assert torch.isfinite(quantized.dequantize()).all()
    assert _mse(quantized, weight) < 4 * _mse(hqq_quantize_weight(weight, bits=4, group_size=64), weight)


def _refined(weight: torch.Tensor, importance: torch.Tensor, form: str, bits: int, group_size: int):
    q = hqq_quantize_weight(weight, bits=bits, group_size=group_size, symmetric=form == "symmetric",
                            zero_point="uint8" if form == "uint8" else "float", importance=importance)
    return torch.cat([q.packed.flatten().float(), q.scale.flatten().float()]
                     + [t.flatten().float() for t in (q.zero_point, q.offset) if t is not None])


@pytest.mark.parametrize("form", ["float", "uint8", "symmetric"])
@pytest.mark.parametrize("bits, group_size", [(4, 64), (3, 32), (4, -1)])
def test_weighted_fit_does_not_depend_on_the_overall_scale_of_the_importance(form, bits, group_size):
    # A weighted least-squares fit is a property of the weights' ratios: multiplying every weight by a power of two
    # (exact in floating point) must give the same grids bit for bit, whether the groups' total weights are far
    # below 1 (typical mean squared activations of small layers) or far above it.
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(48, 192, generator=generator) * 0.05
    weight[3, 17] = 2.0
    importance = torch.rand(192, generator=generator) ** 4 * 3.0
    reference = _refined(weight, importance, form, bits, group_size)
    for factor in (2.0**-20, 2.0**-7, 2.0**9, 2.0**24):
        assert torch.equal(_refined(weight, importance * factor, form, bits, group_size), reference), factor
