"""The in-memory pipeline's steps (plan, calibrate, quantize, build) and its variations."""

from __future__ import annotations

import copy

import pytest
import torch

from optimum_superweight import SuperWeightConfig, SuperWeightLinear
from optimum_superweight.models import replace
from optimum_superweight.models.plan import plan_quantization, plan_targets
from optimum_superweight.nn.w8a8 import SuperWeightW8A8Linear

from ..conftest import PLANTED

MODULE, ROW, COL = PLANTED
SW = [{"module": MODULE, "row": ROW, "col": COL}]


def test_plan_names_targets_exclusions_and_exact_values(tiny_llama):
    config = SuperWeightConfig(bits=4, super_weights=SW)
    skip, targets = plan_targets(tiny_llama, config)
    assert skip == ["lm_head"] and MODULE in targets and "lm_head" not in targets
    plan = plan_quantization(tiny_llama, skip, targets, config.get_super_weights())
    exact = tiny_llama.get_submodule(MODULE).weight[ROW, COL].item()
    assert plan.coordinates == {MODULE: [(ROW, COL)]}
    assert plan.records[0].value == exact and plan.result().modules_to_not_convert == ["lm_head"]


@pytest.mark.parametrize(
    ("options", "collected"),
    [({}, "energy"), ({"importance": "none"}, None), ({"method": "rtn", "clip_search": True}, None),
     ({"method": "gptq", "calibration_tokens": 1024}, "hessians")],
)
def test_calibration_collects_only_what_the_method_reads(tiny_llama, monkeypatch, options, collected):
    calls = []
    for name, label in (("collect_hessians", "hessians"), ("collect_input_energy", "energy")):
        collect = getattr(replace, name)
        monkeypatch.setattr(replace, name, lambda *a, _c=collect, _l=label, **k: calls.append(_l) or _c(*a, **k))
    replace.quantize_model(tiny_llama, SuperWeightConfig(bits=4, super_weights=SW, **options))
    assert calls == ([collected] if collected else [])
    assert isinstance(tiny_llama.get_submodule(MODULE), SuperWeightLinear)


def test_the_steps_compose_to_quantize_model(tiny_llama):
    """calibrate -> choose_codes -> build_modules on the plan gives quantize_model's model, tensor for tensor."""
    config = SuperWeightConfig(bits=4, group_size=32, super_weights=SW)
    by_steps = copy.deepcopy(tiny_llama)
    skip, targets = plan_targets(by_steps, config)
    plan = plan_quantization(by_steps, skip, targets, config.get_super_weights())
    energies = replace.calibrate(by_steps, config, plan.targets)  # the default reads the inputs' mean squares
    assert all(energies[name].shape == (linear.in_features,) for name, linear in plan.targets.items())
    assert replace.calibrate(by_steps, SuperWeightConfig(importance="none"), plan.targets) is None  # data-free
    linears = dict(plan.targets)
    codes = replace.choose_codes(config, linears, plan.coordinates, energies)
    replace.build_modules(by_steps, config, linears, plan.coordinates, codes)
    replace.quantize_model(tiny_llama, config)
    expected = tiny_llama.state_dict()
    got = by_steps.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_the_variation_follows_activation_bits(tiny_llama):
    assert replace.variation_for(SuperWeightConfig(bits=4)) is replace.WEIGHT_ONLY
    config = SuperWeightConfig(bits=8, group_size=-1, method="rtn", activation_bits=8, super_weights=SW,
                               hold_out_super_activation=False)
    assert replace.variation_for(config) is replace.W8A8
    replace.quantize_model(tiny_llama, config)
    assert isinstance(tiny_llama.get_submodule(MODULE), SuperWeightW8A8Linear)
    assert config.super_weights[0].get("value") is None  # the caller's config is a request, never written to
