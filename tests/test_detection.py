"""detect_super_weights: finds planted super weights in every supported architecture, confirms them,
never leaves the model changed, and reports them in the paper's coordinates."""

from __future__ import annotations

import json
import random

import pytest
import torch

from optimum_superweight.detection import confirm as detection_module  # the confirmation stage (ablation internals)
from optimum_superweight.architectures import projection_sites, weight_index
from optimum_superweight.detection import DetectionReport, detect_super_weights
from optimum_superweight.records import SuperWeight
from optimum_superweight.testing import TINY_MODEL_TYPES, build_tiny_model, tiny_tokenizer


# Tiny matrices: one thread avoids the scheduling overhead of two on a shared machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def _snapshot(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def _unchanged(model, snapshot):
    state = model.state_dict()
    return state.keys() == snapshot.keys() and all(torch.equal(state[k], snapshot[k]) for k in snapshot)


def _coordinates(report_or_list):
    records = report_or_list.super_weights if isinstance(report_or_list, DetectionReport) else report_or_list
    return [(r.layer, r.row, r.col) for r in records]


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_planted_super_weight_found_at_random_coordinates(model_type):
    rng = random.Random(f"detect-{model_type}")
    planted = (rng.randrange(4), rng.randrange(63), rng.randrange(128))
    model = build_tiny_model(model_type, super_weights=[planted], seed=rng.randrange(1000))
    before = _snapshot(model)
    report = detect_super_weights(model)
    assert _unchanged(model, before)
    assert _coordinates(report) == [planted], report.to_text()
    sw = report.super_weights[0]
    site = projection_sites(model)[planted[0]]
    assert sw.module == site.name and dict(model.named_modules())[sw.module] is site.module
    assert sw.value == 2.5 == site.module.weight[weight_index(site, sw.row, sw.col)].item()
    assert sw.classification == "super" and sw.source == "detected"
    assert sw.input_spike > 100 and sw.output_spike > 100 and sw.extra["kl"] >= 0.5
    # Nothing else spikes in a tiny random model.
    assert len(report.candidates) == 1
    act = report.super_activations[0]
    assert act.channel == planted[1] and act.layer == planted[0]
    after = [m for layer, m in zip(act.layers, act.magnitudes) if layer >= planted[0]]
    without = [m for layer, m in zip(act.layers, act.magnitudes_without) if layer >= planted[0]]
    assert min(after) > 100 and max(without) < 0.1 * min(after)


def test_gpt2_conv1d_reported_in_paper_convention():
    model = build_tiny_model("gpt2", super_weights=[(2, 10, 99)])
    sw = detect_super_weights(model).super_weights[0]
    assert (sw.module, sw.row, sw.col) == ("transformer.h.2.mlp.c_proj", 10, 99)
    assert model.transformer.h[2].mlp.c_proj.weight[99, 10].item() == sw.value


def test_no_super_weight_gives_an_empty_report(tmp_path):
    model = build_tiny_model("llama", super_weights=None)
    before = _snapshot(model)
    report = detect_super_weights(model, tiny_tokenizer())
    assert _unchanged(model, before)
    assert report.super_weights == [] and report.candidates == [] and report.super_activations == []
    assert len(report.layer_spikes) == 4 and all(s.max_output < 50 for s in report.layer_spikes)
    assert "No candidate" in report.to_text()
    json.loads(report.to_json())
    report.plot(tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_two_super_weights_sharing_a_row_are_both_found(model_type):
    model = build_tiny_model(model_type, super_weights=[(2, 30, 60), (2, 30, 100)])
    report = detect_super_weights(model)
    assert sorted(_coordinates(report.candidates)) == [(2, 30, 60), (2, 30, 100)]
    # Each alone halves the activation; together they are the super activation: both are kept as super.
    assert sorted(_coordinates(report)) == [(2, 30, 60), (2, 30, 100)]
    for sw in report.super_weights:
        assert sw.extra["group_kl"] > sw.extra["kl"] and sw.extra["group_kl"] >= 0.5
    assert [a.channel for a in report.super_activations] == [30]


def test_two_super_weights_sharing_a_column_are_both_found():
    # Phi-3's pattern: one intermediate channel feeds several rows.
    model = build_tiny_model("phi3", super_weights=[(1, 5, 7), (1, 40, 7)])
    report = detect_super_weights(model)
    assert sorted(_coordinates(report.candidates)) == [(1, 5, 7), (1, 40, 7)]
    assert {a.channel for a in report.super_activations} == set(r.row for r in report.super_weights)


def test_super_weights_in_several_layers():
    planted = [(0, 3, 10), (2, 40, 90)]
    model = build_tiny_model("qwen2", super_weights=planted)
    report = detect_super_weights(model)
    assert sorted(_coordinates(report.candidates)) == planted


def test_weights_restored_bit_exactly_when_confirmation_fails(monkeypatch):
    model = build_tiny_model("llama", super_weights=[(1, 5, 7), (2, 30, 60)])
    before = _snapshot(model)
    real = detection_module._nll_and_logprobs
    calls = {"n": 0}

    def failing(model_, ids):
        calls["n"] += 1
        if calls["n"] == 2:  # the first ablation: a weight is zeroed right now
            assert model_.model.layers[1].mlp.down_proj.weight[5, 7].item() == 0.0 or (
                model_.model.layers[2].mlp.down_proj.weight[30, 60].item() == 0.0
            )
            raise RuntimeError("boom")
        return real(model_, ids)

    monkeypatch.setattr(detection_module, "_nll_and_logprobs", failing)
    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        detect_super_weights(model)
    assert _unchanged(model, before)
    assert model.training  # the caller's mode is restored too


def test_tokenizer_prompts_and_token_id_prompts():
    model = build_tiny_model("mistral", super_weights=[(3, 12, 77)])
    tok = tiny_tokenizer()
    by_text = detect_super_weights(model, tok, prompts=["Hello there, general.", "x = 1"])
    by_ids = detect_super_weights(model, prompts=[[257, 72, 105], list(range(40, 60))])
    assert _coordinates(by_text) == _coordinates(by_ids) == [(3, 12, 77)]
    assert by_text.prompts == ["Hello there, general.", "x = 1"]
    assert by_text.super_activations[0].token is not None


def test_layers_filter_and_cap():
    model = build_tiny_model("llama", super_weights=[(1, 5, 7), (3, 20, 30)])
    assert _coordinates(detect_super_weights(model, layers=[0, 3]).candidates) == [(3, 20, 30)]
    assert len(detect_super_weights(model, max_super_weights=1, confirm=False).candidates) == 1
    assert detect_super_weights(model, max_super_weights=0).candidates == []


def test_unconfirmed_report_lists_candidates_by_spike():
    model = build_tiny_model("llama", super_weights=[(1, 5, 7)])
    report = detect_super_weights(model, confirm=False)
    assert report.confirmation is None
    assert _coordinates(report) == [(1, 5, 7)]
    assert report.super_weights[0].classification is None and report.super_weights[0].impact is None
    assert "Not confirmed" in report.to_text()


def test_thresholds_are_respected():
    model = build_tiny_model("llama", super_weights=[(1, 5, 7)])
    # The planted spike is ~400 in and ~1000 out: an absolute threshold above it finds nothing.
    assert detect_super_weights(model, threshold=5000.0, confirm=False).candidates == []
    assert detect_super_weights(model, min_ratio=1e9, confirm=False).candidates == []


def test_quantizer_contract_call_and_records_round_trip(tmp_path):
    """The quantizer calls detection with its config's values and stores to_dict() of super/weak ones."""
    from optimum_superweight.config import SuperWeightConfig

    config = SuperWeightConfig(bits=4)
    model = build_tiny_model("llama", super_weights=[(1, 5, 7)])
    report = detect_super_weights(
        model,
        tiny_tokenizer(),
        prompts=config.detection_prompts,
        threshold=config.detection_threshold,
        min_ratio=config.detection_min_ratio,
        layers=config.detection_layers,
        max_super_weights=config.max_super_weights,
    )
    kept = [c for c in report.candidates if c.classification in ("super", "weak")]
    stored = json.loads(json.dumps([c.to_dict() for c in kept]))
    assert [SuperWeight.from_dict(d) for d in stored] == kept
    assert stored[0]["module"] == "model.layers.1.mlp.down_proj" and stored[0]["value"] == 2.5
    data = json.loads(report.to_json(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text()) == data
    assert data["super_weights"][0]["classification"] == "super"
    assert data["super_activations"][0]["channel"] == 5


def test_text_table_and_plot(tmp_path):
    report = detect_super_weights(build_tiny_model("gemma2", super_weights=[(2, 8, 9)]))
    text = str(report)
    assert "model.layers.2.mlp.down_proj" in text and "super" in text and "Super activation: channel 8" in text
    path = report.plot(tmp_path / "detect.png")
    assert path.endswith("detect.png") and (tmp_path / "detect.png").stat().st_size > 5000


def test_explicit_projection_for_an_unknown_architecture():
    model = build_tiny_model("llama", super_weights=[(2, 17, 33)])
    model.config.model_type = "my_custom_llm"
    with pytest.raises(ValueError, match="projection='mlp.down_proj'"):
        detect_super_weights(model)
    report = detect_super_weights(model, projection="mlp.down_proj")
    assert _coordinates(report) == [(2, 17, 33)]
    assert report.projection == "mlp.down_proj"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"threshold": -1.0}, "threshold=-1.0"),
        ({"min_ratio": float("nan")}, "min_ratio=nan"),
        ({"prompts": []}, "prompts=\\[\\]"),
        ({"prompts": ["some text"]}, "tokenizer is None"),
        ({"prompts": [[1, 2, 99999]]}, "token ids in \\[0, 260\\)"),
        ({"layers": [7]}, "layers=\\[7\\]"),
        ({"max_super_weights": -1}, "max_super_weights=-1"),
        ({"max_iterations": 0}, "max_iterations=0"),
        ({"confirm": "yes"}, "confirm='yes'"),
        ({"projection": "mlp/down"}, "projection='mlp/down'"),
        ({"projection": "mlp.nothing_here"}, "No module"),
    ],
)
def test_invalid_arguments_name_the_field(kwargs, match):
    model = build_tiny_model("llama", super_weights=None)
    with pytest.raises(ValueError, match=match):
        detect_super_weights(model, **kwargs)


@pytest.mark.slow
def test_smollm2_layer_11_is_the_super_weight(smollm2_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    target = model.model.layers[11].mlp.down_proj.weight
    original = target.detach().clone()
    report = detect_super_weights(model, tokenizer)
    assert torch.equal(target, original)
    first = report.candidates[0]
    assert (first.module, first.row, first.col, first.classification) == (
        "model.layers.11.mlp.down_proj", 507, 1229, "super",
    )
    assert first.value == pytest.approx(5.876, abs=1e-3) and first.impact > 2.0
    assert [sw.coordinates for sw in report.super_weights] == [(507, 1229)]
    others = report.candidates[1:]
    assert others and all(c.classification in ("weak", "no_effect") for c in others)
    # The decoys of channel 507 in earlier and last layers are found and judged harmless or minor.
    assert {c.layer for c in others} >= {2, 9, 28}
    act = report.super_activations[0]
    assert act.channel == 507 and act.token_index == 0
    assert min(act.magnitudes[11:28]) > 10_000
    report.plot(tmp_path / "smollm2.png")


def test_report_round_trips_through_json(tmp_path):
    report = detect_super_weights(build_tiny_model("olmo", super_weights=[(1, 2, 3)]))
    again = DetectionReport.from_dict(json.loads(report.to_json()))
    assert again.to_dict() == report.to_dict()
    assert again.to_text() == report.to_text()
    again.plot(tmp_path / "again.png")
    with pytest.raises(ValueError, match="to_dict"):
        DetectionReport.from_dict({"nothing": 1})


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "falcon", "opt", "gemma3_text"])
def test_layer_skipping_ablation_equals_a_full_forward(model_type):
    """Confirmation re-runs only the layers from the candidate's on; it must match a full pass exactly."""
    model = build_tiny_model(model_type, super_weights=[(2, 5, 7)])
    sites = projection_sites(model)
    layers = [model.get_submodule(s.layer_name) for s in sites]
    ids = torch.tensor([list(range(3, 60))])
    cache = {}
    handle = layers[1].register_forward_hook(lambda _m, _a, out: cache.__setitem__(1, detection_module._clone_output(out)))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    site = sites[2]
    index = weight_index(site, 5, 7)
    with torch.no_grad():
        site.module.weight[index] = 0.0
        full = model(input_ids=ids, use_cache=False).logits
        with detection_module._LayerSkip(layers, cache, 2):
            skipped = model(input_ids=ids, use_cache=False).logits
    assert torch.equal(full, skipped)
    assert all("forward" not in layer.__dict__ for layer in layers)


def test_layer_skipping_puts_back_instance_forwards():
    # accelerate's device hooks replace module.forward on the instance: it must survive an ablation.
    model = build_tiny_model("llama", super_weights=None)
    layers = list(model.model.layers)
    wrapper = layers[0].forward
    layers[0].forward = wrapper
    with detection_module._LayerSkip(layers, {2: torch.zeros(1)}, 3):
        assert layers[0].forward is not wrapper
    assert layers[0].__dict__["forward"] is wrapper
    assert "forward" not in layers[1].__dict__ and "forward" not in layers[2].__dict__


@pytest.mark.parametrize(
    "kwargs, match",
    [({"min_ratio": -1.0}, "min_ratio=-1.0"), ({"layers": []}, r"layers=\[\]"), ({"layers": [99]}, r"layers=\[99\]")],
)
def test_in_memory_and_streaming_share_one_check(tmp_path, kwargs, match):
    """One entry point, one set of rules: what the in-memory run refuses, streaming refuses with the same words."""
    from optimum_superweight.detection import DetectionSettings, run_detection

    model = build_tiny_model("llama", super_weights=[(1, 5, 7)])
    model.save_pretrained(tmp_path)
    settings = DetectionSettings(**kwargs)
    for where in ({"model": model}, {"folder": tmp_path}):
        with pytest.raises(ValueError, match=match):
            run_detection(settings, **where)


def test_entry_point_reads_a_config_and_keeps_what_the_quantizer_keeps(tmp_path):
    from optimum_superweight.config import SuperWeightConfig
    from optimum_superweight.detection import DetectionSettings, records_to_keep, run_detection

    config = SuperWeightConfig(detection_min_ratio=0.5, detection_layers=[1, 2], max_super_weights=4)
    settings = DetectionSettings.from_config(config)
    assert (settings.min_ratio, settings.layers, settings.max_super_weights) == (0.5, [1, 2], 4)
    model = build_tiny_model("llama", super_weights=[(1, 5, 7)])
    model.save_pretrained(tmp_path)
    in_memory = records_to_keep(run_detection(settings, model=model))
    streamed = records_to_keep(run_detection(settings, folder=tmp_path))
    assert [(r.module, r.row, r.col) for r in in_memory] == [(r.module, r.row, r.col) for r in streamed] == [
        ("model.layers.1.mlp.down_proj", 5, 7)
    ]
    assert in_memory[0].classification == "super" and streamed[0].classification is None
