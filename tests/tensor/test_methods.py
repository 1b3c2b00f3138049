"""One place chooses how codes are chosen: the config's method maps to one function with one signature."""

from __future__ import annotations

import inspect

import pytest
import torch

from optimum_superweight.config import SuperWeightConfig
from optimum_superweight.tensor.clip import DEFAULT_CLIP_GRID, clip_quantize_weight
from optimum_superweight.tensor.gptq import gptq_quantize_weight, gptq_quantize_weights
from optimum_superweight.tensor.hqq import hqq_quantize_weight
from optimum_superweight.tensor.methods import CODE_METHODS, code_method, code_settings
from optimum_superweight.tensor.quantize import quantize_weight


def _same(a, b) -> None:
    assert torch.equal(a.packed, b.packed) and torch.equal(a.scale, b.scale)
    for x, y in ((a.zero_point, b.zero_point), (a.offset, b.offset)):
        assert (x is None) == (y is None) and (x is None or torch.equal(x, y))
    assert a.layout == b.layout and a.symmetric == b.symmetric


def test_every_method_has_the_common_signature():
    for method in CODE_METHODS.values():
        assert list(inspect.signature(method.choose).parameters) == ["weight", "settings", "holdout", "hessian"]
        assert inspect.signature(method.choose).parameters["hessian"].default is None


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({}, "hqq"),
        ({"method": "rtn"}, "rtn"),
        ({"method": "rtn", "symmetric": False, "zero_point": "float"}, "rtn"),
        ({"clip_search": True}, "clip"),
        ({"method": "gptq"}, "gptq"),
        ({"method": "gptq", "clip_search": True}, "gptq"),
    ],
)
def test_the_config_picks_one_method(options, name):
    assert code_method(SuperWeightConfig(bits=4, **options)).name == name


def test_each_method_gives_what_its_function_gives():
    """The adapters add nothing: the codes are the underlying functions' own, bit for bit."""
    torch.manual_seed(0)
    weight = torch.randn(12, 80)
    weight[3, 5] = 25.0
    holdout = torch.tensor([[3, 5]])
    x = torch.randn(256, 80)
    hessian = x.T @ x / 256
    fmt = dict(bits=3, group_size=32, scale_dtype=torch.float16)

    def codes(**options):
        config = SuperWeightConfig(bits=3, group_size=32, **options)
        return code_method(config).choose(weight, code_settings(config), holdout, hessian)

    _same(codes(), hqq_quantize_weight(weight, symmetric=False, zero_point="float", holdout=holdout,
                                       importance=torch.diagonal(hessian), **fmt))
    _same(codes(importance="none"), hqq_quantize_weight(weight, symmetric=False, zero_point="float", holdout=holdout, **fmt))
    _same(codes(method="rtn"), quantize_weight(weight, symmetric=True, holdout=holdout, **fmt))
    _same(codes(method="rtn", symmetric=False, zero_point="float"),
          hqq_quantize_weight(weight, symmetric=False, zero_point="float", iters=0, holdout=holdout, **fmt))
    _same(codes(clip_search=True), clip_quantize_weight(weight, symmetric=True, holdout=holdout, **fmt))
    _same(codes(clip_search=True, clip_objective="output"),
          clip_quantize_weight(weight, symmetric=True, holdout=holdout, hessian=hessian, **fmt))
    _same(codes(method="gptq", clip_search=True, symmetric=False),
          gptq_quantize_weight(weight, hessian, symmetric=False, holdout=holdout, clip_grid=DEFAULT_CLIP_GRID, **fmt))
    _same(codes(method="gptq"), gptq_quantize_weight(weight, hessian, symmetric=True, holdout=holdout, clip_grid=None, **fmt))


def test_gptq_quantizes_layers_sharing_an_input_in_one_call():
    torch.manual_seed(1)
    weights = [torch.randn(6, 48), torch.randn(4, 48)]
    x = torch.randn(128, 48)
    hessian = x.T @ x / 128
    config = SuperWeightConfig(bits=4, group_size=16, method="gptq")
    method = code_method(config)
    holdouts = [torch.tensor([[1, 2]]), None]
    got = method.choose_shared(weights, code_settings(config), holdouts, hessian)
    expected = gptq_quantize_weights(weights, hessian, holdouts=holdouts, bits=4, group_size=16, clip_grid=None)
    for a, b in zip(got, expected):
        _same(a, b)
    assert all(m.choose_shared is None for n, m in CODE_METHODS.items() if n != "gptq")


def test_methods_that_read_the_hessian_refuse_to_run_without_it():
    weight = torch.randn(4, 32)
    for options in ({"method": "gptq"}, {"clip_search": True, "clip_objective": "output"}):
        config = SuperWeightConfig(bits=4, group_size=16, **options)
        with pytest.raises(ValueError, match="calibration statistics"):
            code_method(config).choose(weight, code_settings(config), None)
