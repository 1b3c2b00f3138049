"""The checkpoint format table: shapes, dtypes, checks, digests and what can be quantized."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optimum_superweight import SuperWeightLinear
from optimum_superweight.format import (
    TENSORS,
    CheckpointFormatError,
    LayerFormat,
    StoredTensor,
    check_layer_stored,
    check_layer_values,
    check_quantizable,
    digest_mismatch,
    layer_digest,
    safetensors_dtype_name,
)

# The README's table, written out independently of format.py: the on-disk format must not drift.
README_TABLE = {
    "weight": ("U8", lambda o, g, b: (o, g, b)),
    "weight_scale": ("F16", lambda o, g, b: (o, g)),
    "weight_zero_point": ("U8", lambda o, g, b: (o, g)),
    "super_weight_indices": ("I32", lambda o, g, b: (2, 2)),
    "super_weight_values": ("F32", lambda o, g, b: (2,)),
}


@pytest.mark.parametrize("bits, group_size, symmetric", [(2, 64, True), (3, 48, False), (4, 32, True), (8, -1, False)])
def test_layer_tensors_follow_the_readme_table(bits, group_size, symmetric):
    torch.manual_seed(0)
    dense = nn.Linear(200, 24)
    layer = SuperWeightLinear.from_linear(
        dense, bits=bits, group_size=group_size, symmetric=symmetric, super_weights=[(3, 5), (7, 150)]
    )
    group = 200 if group_size == -1 else group_size
    groups = -(-200 // group)
    per_group = group if bits == 8 else -(-group // 8) * bits
    stored = layer.stored_tensors()
    expected = [n for n in README_TABLE if symmetric is False or n != "weight_zero_point"] + ["bias"]
    assert list(stored) == expected
    for name, (dtype, shape) in README_TABLE.items():
        if name in stored:
            assert safetensors_dtype_name(stored[name].dtype) == dtype
            assert tuple(stored[name].shape) == shape(24, groups, per_group)
    assert [s.name for s in layer.format.tensors()] == expected
    check_layer_values("m", layer.format, stored)  # a freshly quantized layer passes every value check


def test_every_table_row_names_its_config_field():
    assert all(spec.field for spec in TENSORS)
    assert [s.name for s in TENSORS][:2] == ["weight", "weight_scale"]


def _stored(fmt):
    names = {torch.uint8: "U8", torch.float16: "F16", torch.int32: "I32", torch.float32: "F32", None: "F32"}
    return {s.name: StoredTensor("f", names[s.dtype], s.shape) for s in fmt.tensors()}


def test_check_layer_stored_names_module_tensor_and_field():
    fmt = LayerFormat(8, 16, bits=4, group_size=8, symmetric=False, num_super_weights=1, bias=True)
    stored = _stored(fmt)
    check_layer_stored("m", fmt, stored)
    for name, field in [("weight_zero_point", "symmetric"), ("super_weight_indices", "super_weights")]:
        broken = dict(stored)
        del broken[name]
        with pytest.raises(CheckpointFormatError, match=rf"m\.{name} is missing.*{field}"):
            check_layer_stored("m", fmt, broken)
    sym = LayerFormat(8, 16, bits=4, group_size=8, symmetric=True, num_super_weights=0, bias=True)
    with pytest.raises(CheckpointFormatError, match=r"m\.weight_zero_point is in the checkpoint.*'symmetric'"):
        check_layer_stored("m", sym, {k: v for k, v in stored.items() if not k.startswith("super")})
    with pytest.raises(CheckpointFormatError, match=r"m\.super_weight_(indices|values) is in the checkpoint.*'super_weights'"):
        check_layer_stored("m", LayerFormat(8, 16, 4, 8, False, bias=True), stored)
    wrong = dict(stored, weight=StoredTensor("f", "F32", stored["weight"].shape))
    with pytest.raises(CheckpointFormatError, match=r"m\.weight is stored as F32 \[8, 2, 4\].*requires uint8"):
        check_layer_stored("m", fmt, wrong)
    bias16 = dict(stored, bias=StoredTensor("f", "BF16", (8,)))
    check_layer_stored("m", fmt, bias16)  # the bias is stored in whatever float dtype the model had


@pytest.mark.parametrize(
    "tensor, value, message",
    [
        ("weight_scale", float("nan"), r"m\.weight_scale holds nan"),
        ("weight_scale", 0.0, r"m\.weight_scale holds 0.0"),
        ("weight_scale", -1.0, r"m\.weight_scale holds -1.0"),
        ("weight_zero_point", 16, r"m\.weight_zero_point holds 16 .*codes 0\.\.15 for bits=4"),
        ("super_weight_indices", 99, r"m\.super_weight_indices entry #0 .* outside the 8x16 matrix"),
        ("super_weight_values", float("inf"), r"m\.super_weight_values holds inf"),
        ("bias", float("nan"), r"m\.bias holds nan"),
    ],
)
def test_check_layer_values_refuses_out_of_range(tensor, value, message):
    dense = nn.Linear(16, 8)
    layer = SuperWeightLinear.from_linear(dense, bits=4, group_size=8, symmetric=False, super_weights=[(1, 2)])
    tensors = {k: v.detach().clone() for k, v in layer.stored_tensors().items()}
    flat = tensors[tensor].reshape(-1)
    flat[0] = value
    with pytest.raises(CheckpointFormatError, match=message):
        check_layer_values("m", layer.format, tensors)


def test_held_out_code_must_be_the_zero_code():
    dense = nn.Linear(16, 8)
    layer = SuperWeightLinear.from_linear(dense, bits=4, group_size=8, symmetric=True, super_weights=[(1, 2)])
    tensors = {k: v.detach().clone() for k, v in layer.stored_tensors().items()}
    tensors["super_weight_indices"][0, 0] = 2  # moved: the packed code there is not the zero code
    with pytest.raises(CheckpointFormatError, match=r"m\.weight holds code .* super weight #0 \(2, 2\)"):
        check_layer_values("m", layer.format, tensors)


def test_digest_names_the_changed_tensor_and_reads_every_algorithm():
    layer = SuperWeightLinear.from_linear(nn.Linear(64, 8), bits=4, group_size=32, super_weights=[(1, 2)])
    tensors = {k: v.detach().clone() for k, v in layer.stored_tensors().items()}
    for algorithm in ("crc32", "sha256-128"):
        recorded = layer_digest(tensors, algorithm)
        assert recorded.startswith(f"{algorithm}:") and digest_mismatch(tensors, recorded) == []
        changed = dict(tensors, weight_scale=tensors["weight_scale"] * 2)
        assert digest_mismatch(changed, recorded) == ["weight_scale"]
        retyped = dict(tensors, bias=tensors["bias"].double())
        assert digest_mismatch(retyped, recorded) == ["bias"]
    with pytest.raises(CheckpointFormatError, match="md5"):
        layer_digest(tensors, "md5")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_with_the_coordinate(value):
    weight = torch.randn(8, 16)
    weight[3, 9] = value
    with pytest.raises(CheckpointFormatError, match=rf"m\.weight\[3, 9\] = {value!r}.*non-finite"):
        check_quantizable("m", weight)
    with pytest.raises(CheckpointFormatError, match=r"m\.weight\[3, 9\]"):
        check_quantizable("m", weight, [(3, 9)], bits=4, group_size=8)  # held out or not: NaN is never exact


@pytest.mark.parametrize("symmetric", [True, False])
def test_scale_overflow_is_refused_with_the_fix(symmetric):
    weight = torch.randn(8, 64)
    weight[5, 40] = 1e30
    with pytest.raises(CheckpointFormatError, match=r"m\.weight\[5, 40\] = 1e\+30 .*scale_dtype='float16'.*'float32'"):
        check_quantizable("m", weight, bits=4, group_size=32, symmetric=symmetric)
    check_quantizable("m", weight, bits=4, group_size=32, symmetric=symmetric, scale_dtype="float32")
    check_quantizable("m", weight, [(5, 40)], bits=4, group_size=32, symmetric=symmetric)  # held out: exact
    weight[5, 40] = 60000.0 * 7  # absmax / 7 = 60000 fits float16 (symmetric; asymmetric needs /15 of the range)
    check_quantizable("m", weight, bits=4, group_size=32, symmetric=symmetric)


def test_from_linear_refuses_a_weight_the_scale_dtype_cannot_hold():
    dense = nn.Linear(32, 4)
    with torch.no_grad():
        dense.weight[2, 3] = 1e30
    with pytest.raises(CheckpointFormatError, match=r"layer\.weight\[2, 3\].*scale_dtype='float16'"):
        SuperWeightLinear.from_linear(dense, bits=4, group_size=32, name="layer")
    layer = SuperWeightLinear.from_linear(dense, bits=4, group_size=32, scale_dtype="float32")
    assert torch.isfinite(layer.weight_scale).all()
