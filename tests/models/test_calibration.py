"""Calibration statistics and GPTQ through quantize_model / from_pretrained, on the tiny planted model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from optimum_superweight import SuperWeightConfig, SuperWeightLinear
from optimum_superweight.evaluation import DEFAULT_MAX_TOKENS, builtin_text, tokenize_text
from optimum_superweight.models.calibration import calibration_token_ids, collect_hessians, collect_input_energy
from optimum_superweight.models.replace import quantize_model
from optimum_superweight.testing import tiny_tokenizer

from ..conftest import PLANTED

MODULE, ROW, COL = PLANTED
SW = [{"module": MODULE, "row": ROW, "col": COL}]


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n]


def test_hessians_match_manual_second_moment_and_share_inputs(tiny_llama):
    names = _linear_names(tiny_llama)
    ids = calibration_token_ids(None, 256, vocab_size=260)
    hessians = collect_hessians(tiny_llama, names, ids, window=64, batch_size=2, bos_id=257)
    captured = []
    handle = tiny_llama.get_submodule(MODULE).register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        rows = torch.tensor(ids).reshape(-1, 64)
        tiny_llama(input_ids=torch.cat([torch.full((rows.shape[0], 1), 257), rows], dim=1), use_cache=False)
    handle.remove()
    x = torch.cat(captured)
    torch.testing.assert_close(hessians[MODULE], x.T @ x / x.shape[0], rtol=1e-4, atol=1e-3)
    # q/k/v read one tensor, gate/up another: one shared matrix each.
    assert hessians["model.layers.0.self_attn.q_proj"] is hessians["model.layers.0.self_attn.v_proj"]
    assert hessians["model.layers.0.mlp.gate_proj"] is hessians["model.layers.0.mlp.up_proj"]
    assert hessians["model.layers.0.mlp.gate_proj"] is not hessians["model.layers.1.mlp.gate_proj"]
    # The super activation: the planted input channel dominates the planted layer's statistics.
    assert int(torch.diagonal(hessians[MODULE]).argmax()) == COL


def test_calibration_text_is_disjoint_from_evaluation_and_deterministic():
    tokenizer = tiny_tokenizer()
    ids = calibration_token_ids(tokenizer, 2048)
    assert len(ids) == 2048 and ids == calibration_token_ids(tokenizer, 2048)
    evaluated = tokenize_text(tokenizer, builtin_text(), DEFAULT_MAX_TOKENS)
    text = bytes(i for i in ids if i < 256).decode("utf-8", errors="ignore")
    assert text[:200] not in bytes(i for i in evaluated if i < 256).decode("utf-8", errors="ignore")
    assert builtin_text().endswith(text[-200:])
    fallback = calibration_token_ids(None, 64, vocab_size=260)
    assert fallback == calibration_token_ids(None, 64, vocab_size=260) and all(4 <= i < 260 for i in fallback)
    with pytest.raises(ValueError, match="n_tokens"):
        calibration_token_ids(tokenizer, 0)
    with pytest.raises(ValueError, match="vocab_size"):
        calibration_token_ids(None, 16)


def test_gptq_model_closer_to_full_precision_than_rtn(tiny_llama):
    ids = torch.tensor(calibration_token_ids(None, 512, vocab_size=260)[:256]).reshape(2, 128)
    with torch.no_grad():
        reference = tiny_llama(ids).logits
    errors = {}
    for method in ("rtn", "gptq"):
        model = copy.deepcopy(tiny_llama)
        config = SuperWeightConfig(bits=3, group_size=32, method=method, calibration_tokens=1024, super_weights=SW)
        quantize_model(model, config)  # no tokenizer: fixed calibration token ids
        layer = model.get_submodule(MODULE)
        assert isinstance(layer, SuperWeightLinear)
        assert layer.dequantize_weight(torch.float32)[ROW, COL].item() == tiny_llama.get_submodule(MODULE).weight[ROW, COL].item()
        with torch.no_grad():
            errors[method] = float((model(ids).logits - reference).pow(2).mean())
    assert errors["gptq"] < errors["rtn"]


def test_gptq_checkpoint_round_trips(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    config = SuperWeightConfig(bits=4, group_size=32, symmetric=False, method="gptq", clip_search=True,
                               calibration_tokens=512, super_weights=SW)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config)
    saved = tmp_path / "gptq"
    model.save_pretrained(saved)
    again = AutoModelForCausalLM.from_pretrained(saved)
    assert again.config.quantization_config.method == "gptq"
    ids = torch.arange(1, 40).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    ("field", "value"),
    [("method", "awq"), ("clip_search", 1), ("act_order", "yes"), ("calibration_tokens", 10), ("damp", 0.0), ("damp", True)],
)
def test_config_rejects_bad_calibration_fields(field, value):
    with pytest.raises(ValueError, match=f"SuperWeightConfig.{field}="):
        SuperWeightConfig(**{field: value})


def test_config_round_trips_method_fields():
    config = SuperWeightConfig(method="gptq", clip_search=True, calibration_tokens=4096, damp=0.05, act_order=False)
    again = SuperWeightConfig.from_dict(config.to_dict())
    assert (again.method, again.clip_search, again.calibration_tokens, again.damp, again.act_order) == ("gptq", True, 4096, 0.05, False)


def test_output_clip_objective_quantizes_saves_and_reloads(tiny_llama_dir, tmp_path):
    """``clip_objective="output"`` calibrates like GPTQ, keeps the format, and round-trips bit-exactly."""
    import torch
    from transformers import AutoModelForCausalLM

    import optimum_superweight  # noqa: F401
    from optimum_superweight import SuperWeightConfig

    sw = [{"module": "model.layers.1.mlp.down_proj", "row": 5, "col": 7}]
    config = SuperWeightConfig(bits=4, group_size=-1, clip_search=True, clip_objective="output", super_weights=sw)
    assert config.needs_calibration and not SuperWeightConfig(clip_search=True).needs_calibration
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config)
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert again.config.quantization_config.clip_objective == "output"
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, expected)
    layer = again.get_submodule("model.layers.1.mlp.down_proj")
    assert layer.dequantize_weight(torch.float32)[5, 7] == model.get_submodule("model.layers.1.mlp.down_proj").super_weight_values[0]


def test_output_clip_objective_is_validated():
    import pytest

    from optimum_superweight import SuperWeightConfig

    with pytest.raises(ValueError, match="clip_objective"):
        SuperWeightConfig(clip_objective="mse")
    with pytest.raises(ValueError, match="low_memory=True is invalid with clip_search=True and clip_objective='output'"):
        SuperWeightConfig(clip_search=True, clip_objective="output", low_memory=True)


def test_input_energy_is_the_hessian_diagonal_and_shared_like_it(tiny_llama):
    names = _linear_names(tiny_llama)
    ids = calibration_token_ids(None, 256, vocab_size=260)
    hessians = collect_hessians(tiny_llama, names, ids, window=64, batch_size=2, bos_id=257)
    energies = collect_input_energy(tiny_llama, names, ids, window=64, batch_size=2, bos_id=257)
    for name in names:
        assert energies[name].shape == (hessians[name].shape[0],)
        torch.testing.assert_close(energies[name], torch.diagonal(hessians[name]), rtol=1e-4, atol=1e-4)
    assert energies["model.layers.0.self_attn.q_proj"] is energies["model.layers.0.self_attn.k_proj"]
    assert int(energies[MODULE].argmax()) == COL


def test_default_weights_grids_by_calibration_activations(tiny_llama):
    """The default reads the inputs' mean squares (one forward pass) and its codes are HQQ's refined by them."""
    from optimum_superweight.tensor.hqq import hqq_codes
    from optimum_superweight.tensor.methods import code_settings

    config = SuperWeightConfig(super_weights=SW, calibration_tokens=512)
    assert (config.method, config.importance, config.needs_calibration) == ("hqq", "activations", True)
    weighted, data_free = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    quantize_model(weighted, config)  # no tokenizer: fixed calibration token ids
    quantize_model(data_free, SuperWeightConfig(super_weights=SW, importance="none"))
    assert weighted.config.quantization_config.importance == "activations"
    name = "model.layers.0.mlp.up_proj"
    ids, energies = calibration_token_ids(None, 512, vocab_size=tiny_llama.config.vocab_size), None
    energies = collect_input_energy(tiny_llama, [name], ids)
    expected = hqq_codes(tiny_llama.get_submodule(name).weight.detach(), code_settings(config), None, energies[name])
    layer = weighted.get_submodule(name)
    assert torch.equal(layer.dequantize_weight(torch.float32), expected.dequantize())
    assert not torch.equal(layer.dequantize_weight(torch.float32), data_free.get_submodule(name).dequantize_weight(torch.float32))
    planted = weighted.get_submodule(MODULE).dequantize_weight(torch.float32)[ROW, COL]
    assert planted.item() == tiny_llama.get_submodule(MODULE).weight[ROW, COL].item()


def test_importance_defaults_follow_the_method_and_memory_mode():
    assert SuperWeightConfig().calibration_tokens == 2048
    assert SuperWeightConfig(method="gptq").calibration_tokens == 8192
    assert SuperWeightConfig(low_memory=True).importance == "none"
    assert SuperWeightConfig(method="rtn").importance == "none"
    assert SuperWeightConfig(importance="none").needs_calibration is False
    again = SuperWeightConfig.from_dict(SuperWeightConfig(importance="none", calibration_tokens=1024).to_dict())
    assert (again.importance, again.calibration_tokens) == ("none", 1024)
    with pytest.raises(ValueError, match="SuperWeightConfig.importance='activations'.*low_memory=False"):
        SuperWeightConfig(importance="activations", low_memory=True)
    with pytest.raises(ValueError, match="SuperWeightConfig.importance='activations'.*method='rtn'"):
        SuperWeightConfig(importance="activations", method="rtn")
    with pytest.raises(ValueError, match="SuperWeightConfig.importance='weights' is invalid: accepted values are 'activations', 'none'"):
        SuperWeightConfig(importance="weights")


def test_a_tokenizer_that_cannot_encode_the_text_falls_back_to_fixed_ids(tiny_llama, caplog):
    from optimum_superweight.models.calibration import model_calibration_ids

    class Toy:  # encodes nothing it is given, like a toy vocabulary without English
        bos_token_id = 1

        def __call__(self, text, **kwargs):
            return {"input_ids": []}

        def encode(self, text, **kwargs):
            return []

    with caplog.at_level("WARNING"):
        ids, bos = model_calibration_ids(tiny_llama, Toy(), 1024)
    assert bos is None and ids == calibration_token_ids(None, 1024, vocab_size=tiny_llama.config.vocab_size)
    assert "fixed token ids stand in" in caplog.text


def test_calibration_skips_the_output_head_unless_it_is_measured(tiny_llama, monkeypatch):
    """The vocabulary projection is skipped when no hooked layer needs it; the statistics are the same."""
    from optimum_superweight.models import calibration

    ids = calibration_token_ids(None, 256, vocab_size=260)
    names = _linear_names(tiny_llama)
    body = collect_input_energy(tiny_llama, names, ids, window=64)
    monkeypatch.setattr(calibration, "_body_holding", lambda model, layers: model)
    whole = collect_input_energy(tiny_llama, names, ids, window=64)
    assert all(torch.equal(body[n], whole[n]) for n in names)
    monkeypatch.undo()
    with_head = collect_input_energy(tiny_llama, names + ["lm_head"], ids, window=64)
    assert with_head["lm_head"].shape == (tiny_llama.config.hidden_size,)
