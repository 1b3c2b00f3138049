import pytest
import torch
from torch import nn

from optimum_superweight import SuperWeightLinear


@pytest.mark.parametrize("bits, symmetric", [(2, True), (3, False), (4, True), (4, False), (8, True)])
def test_super_weight_is_bit_exact_and_forward_matches_dequantized(bits, symmetric):
    torch.manual_seed(0)
    dense = nn.Linear(200, 48)
    with torch.no_grad():
        dense.weight[7, 11] = 3.25
    layer = SuperWeightLinear.from_linear(dense, bits=bits, group_size=64, symmetric=symmetric, super_weights=[(7, 11)])
    weight = layer.dequantize_weight(torch.float32)
    assert weight[7, 11].item() == dense.weight[7, 11].item()
    x = torch.randn(3, 200)
    assert torch.allclose(layer(x), nn.functional.linear(x, weight, dense.bias), atol=1e-5)


def test_bfloat16_forward_close_to_float32():
    torch.manual_seed(0)
    dense = nn.Linear(128, 32)
    layer = SuperWeightLinear.from_linear(dense, bits=8, group_size=64)
    x = torch.randn(4, 128)
    out32, out16 = layer(x), layer(x.bfloat16())
    assert out16.dtype == torch.bfloat16
    assert (out16.float() - out32).abs().max() / out32.abs().max() < 2e-2


def test_coordinates_outside_matrix_rejected():
    with pytest.raises(ValueError, match=r"rows must be in \[0, 8\)"):
        SuperWeightLinear.from_linear(nn.Linear(16, 8), bits=4, group_size=8, super_weights=[(8, 0)])


def test_to_linear_restores_a_dense_layer():
    dense = nn.Linear(64, 16)
    layer = SuperWeightLinear.from_linear(dense, bits=8, group_size=-1, super_weights=[(1, 2)])
    back = layer.to_linear()
    assert isinstance(back, nn.Linear) and back.weight[1, 2].item() == dense.weight[1, 2].item()
    assert torch.allclose(back.weight, dense.weight, atol=dense.weight.abs().max().item() / 100)


@pytest.mark.parametrize("zero_point", ["uint8", "float"])
@pytest.mark.parametrize("cast", ["half", "bfloat16", "float-after-half", "to-dtype"])
def test_casts_keep_codes_scales_and_super_weights_exact(zero_point, cast):
    """25.3: a super weight of 5.87573 must not become 5.875 (bfloat16/float16) when the layer is cast."""
    torch.manual_seed(0)
    dense = nn.Linear(96, 16)
    with torch.no_grad():
        dense.weight[3, 17] = 5.87573
    layer = SuperWeightLinear.from_linear(
        dense, bits=3, group_size=32, symmetric=False, zero_point=zero_point, super_weights=[(3, 17)]
    )
    before = {k: v.detach().clone() for k, v in layer.stored_tensors().items() if k != "bias"}
    reference = layer.dequantize_weight(torch.float32)
    dtype = {"half": torch.float16, "bfloat16": torch.bfloat16, "float-after-half": torch.float32, "to-dtype": torch.float16}[cast]
    if cast == "half":
        layer = layer.half()
    elif cast == "bfloat16":
        layer = layer.bfloat16()
    elif cast == "float-after-half":
        layer = layer.half().float()
    else:
        layer = layer.to(device="cpu", dtype=torch.float16)
    for name, tensor in before.items():
        stored = getattr(layer, name)
        assert stored.dtype == tensor.dtype and torch.equal(stored, tensor), name
    assert layer.super_weight_values.item() == torch.tensor(5.87573).item()
    assert layer.bias.dtype == dtype
    assert torch.equal(layer.dequantize_weight(torch.float32), reference)
    x = torch.randn(4, 96).to(dtype)
    assert layer(x).dtype == dtype
    assert torch.equal(layer.dequantize_weight(dtype), reference.to(dtype))
