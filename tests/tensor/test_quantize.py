import pytest
import torch

from optimum_superweight.tensor.quantize import GroupLayout, quantize_weight


def _weight(out=32, inp=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.02
    w[3, 17] = 4.0  # a super-weight-like outlier
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [8, 64, 96, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_error_is_bounded_by_half_a_step(bits, group_size, symmetric):
    w = _weight()
    q = quantize_weight(w, bits=bits, group_size=group_size, symmetric=symmetric, scale_dtype=torch.float32)
    layout = q.layout
    group = layout.effective_group_size
    deq = q.dequantize()
    # per-group step = scale; the error of every element is at most half a step (+ rounding slack)
    scale = q.scale.repeat_interleave(group, dim=1)[:, : w.shape[1]]
    assert bool(((deq - w).abs() <= scale * 0.5 + 1e-6).all())


def test_holdout_is_excluded_from_scale_and_decodes_to_zero():
    w = _weight()
    plain = quantize_weight(w, bits=4, group_size=64)
    held = quantize_weight(w, bits=4, group_size=64, holdout=torch.tensor([[3, 17]]))
    assert held.dequantize()[3, 17].item() == 0.0
    # the outlier's group gets a much finer scale once the outlier is out of the statistics
    assert held.scale[3, 0] < plain.scale[3, 0] / 10
    other = held.dequantize()
    other[3, 17] = w[3, 17]
    assert (other - w).abs()[3].max() < (plain.dequantize() - w).abs()[3, :64].max()


def test_ragged_last_group_layout():
    layout = GroupLayout(out_features=576, in_features=1536, bits=4, group_size=128)
    assert layout.packed_shape == (576, 12, 64)
    q = quantize_weight(torch.randn(4, 576), bits=4, group_size=128)
    assert q.packed.shape == (4, 5, 64) and q.dequantize().shape == (4, 576)


def test_zero_group_is_exact():
    q = quantize_weight(torch.zeros(2, 16), bits=4, group_size=8, symmetric=False)
    assert torch.equal(q.dequantize(), torch.zeros(2, 16))
