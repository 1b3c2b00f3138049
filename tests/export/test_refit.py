"""The ``--requantize`` re-fit (optimum_superweight/export/refit.py): grids by the weighted fit and each weight's nearest
code (what the export does), or, given a layer's input second moment, codes by GPTQ's error feedback on those grids;
super weights exact either way."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_superweight.export import refit
from optimum_superweight.export.codes import quantized_modules
from optimum_superweight.export.refit import TargetForm, input_hessians, input_importance, refit_layer, resolve_layers
from optimum_superweight.testing import tiny_tokenizer

from .conftest import COL, MODULE, ROW, quantize_tiny

ZERO_POINTS = TargetForm(bits=4, group_size=32, variants=("zero_point", "symmetric"), refit_form="uint8")


def output_error(weight: torch.Tensor, reference: torch.Tensor, hessian: torch.Tensor) -> float:
    error = (weight - reference).float()
    return float(((error @ hessian) * error).sum())


def planted_hessian(in_features: int, seed: int = 0) -> torch.Tensor:
    """Inputs with a shared low-rank part (correlated channels, as in a transformer's activations), a few loud
    channels and one dead one: a second moment far from diagonal, where error feedback has something to use."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(4096, 8, generator=generator) @ torch.randn(8, in_features, generator=generator)
    x = torch.randn(4096, in_features, generator=generator) + 0.7 * shared
    x[:, :3] *= 6.0
    x[:, -1] = 0.0
    return x.T @ x / x.shape[0]


@pytest.fixture()
def float_offset_codes(tiny_llama_dir, tmp_path):
    checkpoint = quantize_tiny(tiny_llama_dir, tmp_path / "f", group_size=32, symmetric=False, zero_point="float", method="hqq")
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    return {codes.name: codes for codes in quantized_modules(model)}, model


def test_error_feedback_keeps_grid_and_super_weights_and_lowers_output_error(float_offset_codes):
    codes = float_offset_codes[0][MODULE]
    assert codes.variant == "float_offset" and codes.num_super_weights == 1
    hessian = planted_hessian(codes.in_features)
    target = codes.dequantize()

    fitted = refit_layer(codes, ZERO_POINTS, hessian=hessian)
    weight = fitted.dequantize()
    assert fitted.variant == "zero_point" and fitted.offset is None
    assert weight[ROW, COL] == codes.super_values[0].float()  # exact, as stored
    # The plain re-fit: the same weighted grid, each weight's nearest code.
    plain = refit_layer(codes, ZERO_POINTS, torch.diagonal(hessian))
    assert torch.equal(fitted.scale, plain.scale) and torch.equal(fitted.zero_point, plain.zero_point)
    assert not torch.equal(fitted.codes, plain.codes)
    assert output_error(weight, target, hessian) < 0.7 * output_error(plain.dequantize(), target, hessian)


@pytest.mark.parametrize("target", [
    TargetForm(bits=4, group_size=32, variants=("symmetric",), refit_form="symmetric"),
    TargetForm(bits=4, group_size=-1, variants=("zero_point", "symmetric"), refit_form="uint8"),
    TargetForm(bits=8, group_size=16, variants=("zero_point",), refit_form="uint8"),
], ids=["symmetric", "per-row", "int8-group16"])
def test_error_feedback_takes_every_target_form(float_offset_codes, target):
    # Every form the plain re-fit produces, the error-feedback re-fit produces too: it refuses nothing new.
    codes = float_offset_codes[0][MODULE]
    hessian = planted_hessian(codes.in_features)
    fitted = refit_layer(codes, target, hessian=hessian)
    weight = fitted.dequantize()
    assert weight[ROW, COL] == codes.super_values[0].float()
    assert fitted.bits == target.bits and fitted.per_row == (target.group_size == -1)
    assert int(fitted.codes.max()) < 2**target.bits and torch.isfinite(weight).all()
    assert output_error(weight, codes.dequantize(), hessian) < output_error(refit_layer(codes, target).dequantize(), codes.dequantize(), hessian)


def test_export_refit_is_the_weighted_grid_with_nearest_codes(float_offset_codes):
    all_codes, model = float_offset_codes
    tokenizer = tiny_tokenizer()
    layers, report = resolve_layers(list(all_codes.values()), set(), ZERO_POINTS, allow_requantize=True, model=model,
                                    tokenizer=tokenizer)
    assert report.method == refit.REFIT_METHOD and report.importance.startswith("activations")
    assert list(layers) == list(all_codes)
    importance, _ = input_importance(model, tokenizer, [MODULE])
    hessians, _ = input_hessians(model, tokenizer, [MODULE])
    # One statistic, two views: the importance is the second moment's diagonal.
    assert torch.allclose(importance[MODULE], torch.diagonal(hessians[MODULE]), rtol=1e-4, atol=1e-7)
    assert torch.equal(layers[MODULE].codes, refit_layer(all_codes[MODULE], ZERO_POINTS, importance[MODULE]).codes)


def test_without_a_tokenizer_nearest_codes_on_uniform_grids(float_offset_codes, caplog):
    all_codes, model = float_offset_codes
    hessians, how = input_hessians(model, None, [MODULE])
    assert hessians == {} and how == "uniform" and "no tokenizer" in caplog.text
    layers, report = resolve_layers([all_codes[MODULE]], set(), ZERO_POINTS, allow_requantize=True, model=model)
    assert report.importance == "uniform" and report.method == refit.REFIT_METHOD
    assert layers[MODULE].dequantize()[ROW, COL] == all_codes[MODULE].super_values[0].float()
