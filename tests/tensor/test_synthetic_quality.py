"""Quality on synthetic full-precision weights with an LLM's outlier structure, bounded by theory.

The only real model in CI (SmolLM2 from a Q4_1 GGUF) already sits on a 4-bit grid, so it cannot show how the
methods treat full-precision weights. Here a weight matrix has heavy tails (Student-t, 3 degrees of freedom),
a few input channels carry massive activations (their mean squared activation 10^4 times the others', as in
the channels super weights feed), and one planted super weight 100 standard deviations large sits in such a
channel. Every bound below follows from the method's construction, not from an earlier measurement:

- round to nearest on a uniform grid of step ``s``: ``|w - q| <= s/2`` for a weight inside the grid's range
  (outside it, the distance to the range's end); a min-max grid clips nothing (up to the scale's float16
  rounding);
- on a fine grid the rounding error is uniform on ``[-s/2, s/2]`` (Bennett's high-resolution approximation):
  mean squared error ``s^2/12``;
- the importance-weighted refinement starts from the data-free grid and keeps a group's best grid, so its
  weighted error is never above the data-free grid's, group by group;
- a held-out super weight is excluded from its group's range (the group's scale is the one of the other
  weights) and comes back bit-exact.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optimum_superweight import SuperWeightConfig
from optimum_superweight.nn.linear import SuperWeightLinear
from optimum_superweight.tensor.hqq import hqq_codes, hqq_quantize_weight
from optimum_superweight.tensor.methods import code_settings
from optimum_superweight.tensor.quantize import QuantizedWeight, quantize_weight

pytestmark = pytest.mark.usefixtures("one_thread")

OUT, IN, GROUP = 96, 512, 64
MASSIVE = (7, 130, 301)  # input channels with massive activations
SUPER = (11, 130)  # (row, col): the planted super weight, in a massive channel
HOLDOUT = torch.tensor([SUPER])


def synthetic_layer(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A heavy-tailed ``[OUT, IN]`` weight with a planted super weight, and each input channel's importance
    (mean squared activation) with massive channels."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.distributions.StudentT(3.0)
    torch.manual_seed(seed)
    weight = 0.02 * t.sample((OUT, IN)) / 3.0**0.5  # unit-variance t(3), scaled like an LLM projection
    weight[SUPER] = 100 * weight.std()
    importance = torch.rand(IN, generator=generator) + 0.5
    importance[list(MASSIVE)] *= 1e4
    return weight.float(), importance


def grid_of(q: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per weight ``[OUT, IN]``: the grid step and the grid's lowest and highest values, from what is stored."""
    bits = q.layout.bits
    scale = q.scale.float()
    if q.symmetric:
        low, high = -(2 ** (bits - 1)) * scale, (2 ** (bits - 1) - 1) * scale
    elif q.offset is not None:
        low = q.offset.float()
        high = low + (2**bits - 1) * scale
    else:
        zero = q.zero_point.float()
        low, high = -zero * scale, (2**bits - 1 - zero) * scale

    def per_weight(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(q.layout.effective_group_size, dim=1)[:, : q.layout.in_features]

    return per_weight(scale), per_weight(low), per_weight(high)


def rounding_check(weight: torch.Tensor, q: QuantizedWeight) -> dict:
    """The error against the round-to-nearest bound, on every weight but the held-out one."""
    step, low, high = grid_of(q)
    error = (weight - q.dequantize()).abs()
    outside = (low - weight).clamp_min(0) + (weight - high).clamp_min(0)
    keep = torch.ones_like(weight, dtype=torch.bool)
    keep[SUPER] = False
    # float32 arithmetic in the decode (s*q + m): a few ulps of the weight's magnitude.
    slack = 4 * torch.finfo(torch.float32).eps * (weight.abs() + high.abs() + low.abs())
    excess = (error - step / 2 - outside - slack)[keep]
    return {
        "max_excess": float(excess.max()),
        "clipped_range": float((outside / step)[keep].max()),
        "mse_ratio": float((error[keep] ** 2).sum() / (step[keep] ** 2 / 12).sum()),
        "inside_mse_ratio": float((error[keep & (outside == 0)] ** 2).sum() / (step[keep & (outside == 0)] ** 2 / 12).sum()),
    }


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_to_nearest_is_within_half_a_step_and_clips_nothing(bits, symmetric):
    weight, _ = synthetic_layer()
    q = quantize_weight(weight, bits=bits, group_size=GROUP, symmetric=symmetric, holdout=HOLDOUT)
    check = rounding_check(weight, q)
    assert check["max_excess"] <= 0, check
    # A min-max grid covers its group, but for the float16 rounding of the scale (2^-11 relative, times the
    # steps from the zero code to the range's end) and, asymmetric, the zero-point rounded to a whole code,
    # which moves the grid by at most half a step: the extremes then still round within half a step.
    bound = (0 if symmetric else 0.5) + 2**bits * 2**-11
    assert check["clipped_range"] <= bound, check


@pytest.mark.parametrize("symmetric", [True, False])
def test_fine_grid_error_is_uniform_over_the_step(symmetric):
    """8-bit: s^2/12 within a few percent (the sampling error of ~50k weights is under 1%)."""
    weight, _ = synthetic_layer()
    check = rounding_check(weight, quantize_weight(weight, bits=8, group_size=GROUP, symmetric=symmetric, holdout=HOLDOUT))
    assert 0.95 <= check["mse_ratio"] <= 1.05, check


def test_default_method_rounds_to_nearest_on_its_grid():
    """The default (HQQ grids, float offsets, refined by importance) may clip a group's extremes by design; every
    weight inside its grid's range is still within half a step, and the 4-bit error of those is at most the
    uniform s^2/12 (t-distributed weights are denser at the centre of a step than at its edges: at most, not
    about)."""
    weight, importance = synthetic_layer()
    config = SuperWeightConfig()
    settings = code_settings(config)
    assert (settings.bits, settings.group_size, settings.symmetric, settings.zero_point) == (4, 64, False, "float")
    q = hqq_codes(weight, settings, HOLDOUT, importance)
    check = rounding_check(weight, q)
    assert check["max_excess"] <= 0, check
    assert check["inside_mse_ratio"] <= 1.0, check


def _objective(weight: torch.Tensor, importance: torch.Tensor, q: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's importance-weighted squared error in float64 (the refinement's objective, whose weights are the
    importance plus a floor of 1e-3 of its mean: hqq.py), and its sum of importance * w^2."""
    keep = torch.ones_like(weight, dtype=torch.float64)
    keep[SUPER] = 0
    weights = (importance.double() + 1e-3 * importance.double().mean()) * keep
    errors = (weight.double() - q.dequantize().double()) ** 2 * weights
    energy = weight.double() ** 2 * weights
    return errors.reshape(OUT, IN // GROUP, GROUP).sum(-1), energy.reshape(OUT, IN // GROUP, GROUP).sum(-1)


def _refinement(bits: int, zero_point: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    weight, importance = synthetic_layer()
    start = hqq_quantize_weight(weight, bits=bits, group_size=GROUP, zero_point=zero_point, holdout=HOLDOUT)
    refined = hqq_quantize_weight(weight, bits=bits, group_size=GROUP, zero_point=zero_point, holdout=HOLDOUT, importance=importance)
    (before, energy), (after, _) = _objective(weight, importance, start), _objective(weight, importance, refined)
    return before, after, energy


@pytest.mark.parametrize("bits,zero_point", [(2, "float"), (3, "float"), (4, "float"), (4, "uint8"), (8, "float")])
def test_importance_refinement_never_worse_than_its_start_grid(bits, zero_point):
    before, after, energy = _refinement(bits, zero_point)
    # Group by group, within the precision of the method's own arithmetic: it compares grids by each group's
    # weighted squared error of the codes it will store, summed in float32 (so the slack of ~GROUP float32
    # epsilons of the group's sum of importance * w^2 is generous).
    slack = GROUP * torch.finfo(torch.float32).eps * energy
    assert bool((after <= before + slack).all()), float(((after - before) / slack).max())
    # Not a no-op: with massive channels in the weights, the weighted fit moves grids and lowers the total.
    assert float(after.sum()) < float(before.sum())


def test_super_weight_is_held_out_of_its_group_and_exact():
    weight, importance = synthetic_layer()
    row, col = SUPER
    group = col // GROUP
    held = quantize_weight(weight, bits=4, group_size=GROUP, holdout=HOLDOUT)
    others = torch.cat([weight[row, group * GROUP : col], weight[row, col + 1 : (group + 1) * GROUP]])
    expected = (others.abs().max() / 7).half().float()  # symmetric 4-bit: absmax / (2^3 - 1), stored in float16
    assert float(held.scale[row, group]) == float(expected)
    plain = quantize_weight(weight, bits=4, group_size=GROUP)
    assert float(plain.scale[row, group]) > 20 * float(expected)  # what holding out avoids: a 100-sigma step
    dense = nn.Linear(IN, OUT, bias=False)
    with torch.no_grad():
        dense.weight.copy_(weight)
    codes = hqq_codes(weight, code_settings(SuperWeightConfig()), HOLDOUT, importance)
    layer = SuperWeightLinear.from_linear(dense, bits=4, group_size=GROUP, symmetric=False, zero_point="float",
                                          super_weights=[SUPER], quantized=codes)
    assert layer.dequantize_weight()[SUPER].item() == weight[SUPER].item()  # bit-exact, float32
