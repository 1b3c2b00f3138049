"""Widths allocated per module under a budget: config fields, the allocation, a mixed-width checkpoint's round trip."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import AutoModelForCausalLM

from optimum_superweight import SuperWeightConfig
from optimum_superweight.format import CheckpointFormatError
from optimum_superweight.models.allocation import (
    CANDIDATES,
    TWO_BIT_CANDIDATES,
    LayerOption,
    allocate,
    layer_cost_bits,
    measure_sensitivity,
    total_cost_bits,
)
from optimum_superweight.nn.layers import is_quantized_layer

MODULE, ROW, COL = "model.layers.1.mlp.down_proj", 5, 7
SUPER = [{"module": MODULE, "row": ROW, "col": COL}]
IDS = torch.arange(2, 34).reshape(2, 16)


# -- config ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("options", "field"), [
    ({"low_memory": True}, "target_bits_per_weight"),
    ({"weight_format": "bnb-nf4"}, "target_bits_per_weight"),
    ({"activation_bits": 8, "bits": 8, "group_size": -1}, "target_bits_per_weight"),
    ({"importance": "none"}, "target_bits_per_weight"),
    ({"method": "gptq"}, "target_bits_per_weight"),
])
def test_a_target_is_refused_where_no_allocation_can_run(options, field):
    with pytest.raises(ValueError, match=rf"SuperWeightConfig\.{field}=4\.0 is invalid"):
        SuperWeightConfig(target_bits_per_weight=4.0, **options)


def test_module_widths_are_refused_with_forms_that_have_one_width():
    widths = {"m": {"bits": 3, "group_size": 32}}
    for options in ({"low_memory": True}, {"weight_format": "bnb-nf4"}):
        with pytest.raises(ValueError, match="SuperWeightConfig.module_widths=.* is invalid"):
            SuperWeightConfig(module_widths=widths, **options)
    # Given by hand, widths need no calibration: any way of choosing codes.
    assert SuperWeightConfig(module_widths=widths, method="rtn").width_of("m") == (3, 32)


def test_widths_round_trip_through_json_and_default_to_the_config():
    config = SuperWeightConfig(target_bits_per_weight=3.5, module_widths={"a": {"bits": 8, "group_size": 64}})
    again = SuperWeightConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again.target_bits_per_weight == 3.5 and again.width_of("a") == (8, 64) and again.width_of("b") == (4, 64)
    single = again.with_width(3, 32)
    assert (single.bits, single.group_size, single.module_widths, single.target_bits_per_weight) == (3, 32, None, None)


def test_cost_counts_what_the_built_layer_stores():
    from torch import nn

    from optimum_superweight.nn.linear import SuperWeightLinear

    linear = nn.Linear(100, 24)
    for bits, group_size in TWO_BIT_CANDIDATES + CANDIDATES:
        for config in (SuperWeightConfig(), SuperWeightConfig(method="rtn", symmetric=False), SuperWeightConfig(method="rtn")):
            layer = SuperWeightLinear.from_linear(linear, bits=bits, group_size=group_size, symmetric=config.symmetric,
                                                  zero_point=config.zero_point, super_weights=[(3, 4)])
            assert layer_cost_bits(config, 24, 100, bits, group_size, 1) == 8 * layer.storage_bytes()


# -- allocation --------------------------------------------------------------------------------------------
_option = st.tuples(st.integers(1, 10_000), st.floats(0.0, 10.0, allow_nan=False))


@settings(max_examples=200, deadline=None)
@given(layers=st.lists(st.lists(_option, min_size=1, max_size=6), min_size=1, max_size=12), slack=st.floats(0.0, 1.5))
def test_allocation_stays_within_the_budget_and_leaves_no_affordable_improvement(layers, slack):
    options = {f"l{i}": [LayerOption(4, 64, cost, error) for cost, error in layer] for i, layer in enumerate(layers)}
    cheapest = sum(min(o.cost_bits for o in opts) for opts in options.values())
    dearest = sum(max(o.cost_bits for o in opts) for opts in options.values())
    budget = cheapest + slack * (dearest - cheapest)
    choice = allocate(options, budget)
    assert set(choice) == set(options) and all(choice[n] in options[n] for n in options)
    left = budget - total_cost_bits(choice)
    assert left >= 0
    # No layer could still lower its error with what is left of the budget.
    for name, opts in options.items():
        assert not any(o.error < choice[name].error and o.cost_bits - choice[name].cost_bits <= left for o in opts)
    if slack >= 1.0:  # everything affordable: each layer at its smallest error
        assert all(choice[n].error == min(o.error for o in opts) for n, opts in options.items())


def test_allocation_below_the_cheapest_widths_is_refused():
    options = {"a": [LayerOption(2, 64, 100, 1.0), LayerOption(4, 64, 200, 0.1)]}
    with pytest.raises(ValueError, match="cheapest width of every layer already stores 100 bits"):
        allocate(options, 99)


def test_allocation_gives_the_bits_to_the_layer_that_gains_most():
    options = {"sensitive": [LayerOption(2, 64, 100, 1.0), LayerOption(4, 64, 200, 0.1)],
               "robust": [LayerOption(2, 64, 100, 0.2), LayerOption(4, 64, 200, 0.1)]}
    choice = allocate(options, 300)
    assert (choice["sensitive"].bits, choice["robust"].bits) == (4, 2)


def test_sensitivity_falls_with_width_and_ignores_the_input_scale(tiny_llama):
    from optimum_superweight.models.modules import as_linear

    names = ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    linears = {n: as_linear(tiny_llama.get_submodule(n)) for n in names}
    energies = {n: torch.rand(linears[n].in_features, generator=torch.Generator().manual_seed(0)) + 0.1 for n in names}
    config = SuperWeightConfig(target_bits_per_weight=4.0)
    widths = TWO_BIT_CANDIDATES + CANDIDATES
    options = measure_sensitivity(config, linears, {}, energies, candidates=widths)
    scaled = measure_sensitivity(config, linears, {}, {n: 1000.0 * e for n, e in energies.items()}, candidates=widths)
    for name in names:
        error = {(o.bits, o.group_size): o.error for o in options[name]}
        assert error[(8, 64)] < error[(4, 64)] < error[(3, 64)] < error[(2, 64)]
        assert error[(4, 32)] <= error[(4, 64)]
        assert [o.error for o in scaled[name]] == pytest.approx([o.error for o in options[name]], rel=1e-2)  # float rounding


# -- a mixed-width checkpoint ------------------------------------------------------------------------------
def _quantized_layers(model):
    return {n: m for n, m in model.named_modules() if is_quantized_layer(m)}


@pytest.fixture()
def mixed(tiny_llama_dir, tmp_path):
    config = SuperWeightConfig(target_bits_per_weight=3.5, super_weights=SUPER)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config)
    model.save_pretrained(tmp_path / "q")
    with torch.no_grad():
        logits = model(IDS).logits
    return tmp_path / "q", model, logits


def test_a_budget_gives_mixed_widths_within_it_recorded_in_config_json(mixed):
    folder, model, _ = mixed
    layers = _quantized_layers(model)
    assert len(Counter((m.bits, m.group_size) for m in layers.values())) > 1
    stored = 8 * sum(m.storage_bytes() for m in layers.values())
    assert stored <= 3.5 * sum(m.in_features * m.out_features for m in layers.values())
    recorded = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert recorded["target_bits_per_weight"] == 3.5
    assert recorded["module_widths"] == {n: {"bits": m.bits, "group_size": m.group_size} for n, m in layers.items()}
    down = layers[MODULE]  # the super weight stays exact whatever its layer's width
    assert float(down.to_linear().weight[ROW, COL]) == float(model.config.quantization_config.super_weights[0]["value"])


def test_a_mixed_width_checkpoint_reloads_exactly_with_plain_from_pretrained(mixed):
    folder, model, logits = mixed
    again = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, logits)
    widths = {n: (m.bits, m.group_size) for n, m in _quantized_layers(again).items()}
    assert widths == {n: (m.bits, m.group_size) for n, m in _quantized_layers(model).items()}


def _edit_widths(folder, edit):
    config = json.loads((folder / "config.json").read_text())
    edit(config["quantization_config"]["module_widths"])
    (folder / "config.json").write_text(json.dumps(config))


def test_a_tampered_module_width_is_refused_naming_the_module(mixed):
    folder, model, _ = mixed
    name, layer = next(iter(_quantized_layers(model).items()))
    other = next(b for b in (2, 3, 4, 8) if b != layer.bits)
    _edit_widths(folder, lambda widths: widths[name].update(bits=other))
    with pytest.raises(CheckpointFormatError, match=rf"{name}\.weight is stored as .* but config.json \(.*bits={other}"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_a_width_for_a_module_that_is_not_quantized_is_refused(mixed):
    folder, _, _ = mixed
    _edit_widths(folder, lambda widths: widths.update({"lm_head": {"bits": 4, "group_size": 64}}))
    with pytest.raises(ValueError, match="field 'module_widths' names module 'lm_head'"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_widths_given_by_hand_are_used_and_unknown_modules_refused(tiny_llama):
    from optimum_superweight.models.replace import quantize_model

    widths = {"model.layers.0.self_attn.v_proj": {"bits": 8, "group_size": 32}}
    quantize_model(tiny_llama, SuperWeightConfig(method="rtn", module_widths=widths, super_weights=SUPER))
    layers = _quantized_layers(tiny_llama)
    assert (layers["model.layers.0.self_attn.v_proj"].bits, layers["model.layers.0.self_attn.v_proj"].group_size) == (8, 32)
    assert {(m.bits, m.group_size) for n, m in layers.items() if n not in widths} == {(4, 64)}


def test_widths_naming_a_module_the_model_does_not_convert_are_refused(tiny_llama):
    from optimum_superweight.models.replace import quantize_model

    config = SuperWeightConfig(method="rtn", module_widths={"model.layers.9.mlp.up_proj": {"bits": 8, "group_size": 32}})
    with pytest.raises(ValueError, match="module_widths names module 'model.layers.9.mlp.up_proj'"):
        quantize_model(tiny_llama, config)


def test_loss_weighted_errors_leave_a_layer_the_loss_ignores_at_its_cheapest_width(tiny_llama):
    from optimum_superweight.models.allocation import collect_output_gradients
    from optimum_superweight.models.modules import as_linear

    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj"]
    linears = {n: as_linear(tiny_llama.get_submodule(n)) for n in names}
    gradients = collect_output_gradients(tiny_llama, names, list(range(4, 132)), window=64)
    assert all(g.shape == (linears[n].out_features,) and bool((g > 0).any()) for n, g in gradients.items())
    gradients[names[1]] = torch.zeros_like(gradients[names[1]])  # its outputs do not move the loss
    energies = {n: torch.ones(linears[n].in_features) for n in names}
    config = SuperWeightConfig(target_bits_per_weight=8.0)
    options = measure_sensitivity(config, linears, {}, energies, gradients=gradients, candidates=((2, 32), (8, 32)))
    assert all(o.error == 0.0 for o in options[names[1]]) and options[names[0]][0].error > options[names[0]][1].error
    choice = allocate(options, sum(max(o.cost_bits for o in opts) for opts in options.values()))
    assert (choice[names[0]].bits, choice[names[1]].bits) == (8, 2)
