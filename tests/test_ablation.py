"""The paper's Table 1 ablation: rows, super-activation restore hook, exact restoration, SmolLM2 ordering."""

from __future__ import annotations

import json
import math

import pytest
import torch

from optimum_superweight import SuperWeight, ablate
from optimum_superweight import ablation as ablation_module
from optimum_superweight.evaluation import builtin_text
from optimum_superweight.testing import build_tiny_model, tiny_tokenizer

SW = SuperWeight(module="model.layers.1.mlp.down_proj", row=5, col=7)
TEXT = builtin_text()[:2000]
FAST = dict(text=TEXT, max_tokens=256, window=64, batch_size=4)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model, snapshot):
    return all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())


def test_rows_activation_and_exact_restore(tokenizer):
    model = build_tiny_model("llama", super_weights=[(1, 5, 7)])
    before = _snapshot(model)
    report = ablate(model, tokenizer, [SW], scale_factors=(0.5, 3.0), outlier_fraction=1e-3, **FAST)
    assert _unchanged(model, before)
    names = [r.name for r in report.rows]
    assert names == ["original", "zero_sw", "zero_sw_restore_sa", "prune_outliers", "scale_sw_x0.5", "scale_sw_x3"]
    original, zeroed, restored = report.row("original"), report.row("zero_sw"), report.row("zero_sw_restore_sa")
    assert original.ratio == 1.0 and original.weights_changed == 0
    assert zeroed.weights_changed == 1 and restored.weights_changed == 1
    # The planted super activation (~1000) collapses without the weight and comes back with the hook.
    key = "L1[5]"
    assert original.super_activation[key] > 100
    assert zeroed.super_activation[key] < original.super_activation[key] / 5
    assert restored.super_activation[key] == pytest.approx(original.super_activation[key], rel=1e-4)
    # Scaling scales the weight's share of the activation.
    assert report.row("scale_sw_x3").super_activation[key] > original.super_activation[key]
    assert report.row("scale_sw_x0.5").super_activation[key] < original.super_activation[key]
    # Pruning counts ceil(fraction * numel) per decoder matrix and keeps the super weight.
    expected = sum(
        math.ceil(1e-3 * m.weight.numel())
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")
    )
    assert report.row("prune_outliers").weights_changed == expected
    assert zeroed.ppl != original.ppl
    data = json.loads(report.to_json())
    assert data["rows"][1]["name"] == "zero_sw" and data["super_weights"][0]["row"] == 5
    text = report.to_text()
    assert "super weights zeroed" in text and "layers[1].mlp.down_proj.weight[5, 7]" in text


def test_restore_hook_matches_a_manual_restore(tokenizer):
    """Zero the weight, write the intact layer-1 value back at token 0 by hand, compare perplexities."""
    from optimum_superweight import perplexity

    model = build_tiny_model("llama", super_weights=[(1, 5, 7)])
    report = ablate(model, tokenizer, [SW], scale_factors=(), outlier_fraction=None, **FAST)
    bos = torch.tensor([[tokenizer.bos_token_id]])
    with torch.no_grad():
        intact = model(bos, output_hidden_states=True).hidden_states[2][0, 0, 5].item()
        model.model.layers[1].mlp.down_proj.weight[5, 7] = 0.0

    def hook(module, args, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        hidden[:, 0, 5] = intact
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    handle = model.model.layers[1].register_forward_hook(hook)
    try:
        manual = perplexity(model, tokenizer, TEXT, max_tokens=256, window=64)
    finally:
        handle.remove()
    assert report.row("zero_sw_restore_sa").ppl == pytest.approx(manual.ppl, rel=1e-4)


def test_restore_without_bos_uses_each_first_token(tokenizer):
    model = build_tiny_model("llama", super_weights=[(1, 5, 7)])
    before = _snapshot(model)
    report = ablate(model, tokenizer, [SW], add_bos=False, scale_factors=(), outlier_fraction=None, **FAST)
    assert _unchanged(model, before)
    assert report.protocol["add_bos"] is False
    key = "L1[5]"
    assert report.row("zero_sw_restore_sa").super_activation[key] == pytest.approx(
        report.row("original").super_activation[key], rel=1e-4
    )


def test_detection_by_default_and_tuple_records(tokenizer):
    model = build_tiny_model("llama", super_weights=[(1, 5, 7)])
    report = ablate(model, tokenizer, scale_factors=(), outlier_fraction=None, restore_activation=False, **FAST)
    assert [(sw.module, sw.row, sw.col) for sw in report.super_weights] == [("model.layers.1.mlp.down_proj", 5, 7)]
    assert "detection" in report.timings
    again = ablate(
        model, tokenizer, [("model.layers.1.mlp.down_proj", 5, 7)], scale_factors=(), outlier_fraction=None,
        restore_activation=False, **FAST,
    )
    assert again.row("zero_sw").ppl == pytest.approx(report.row("zero_sw").ppl, rel=1e-6)


def test_conv1d_models_use_paper_coordinates(tokenizer):
    model = build_tiny_model("gpt2", super_weights=[(2, 10, 99)])
    before = _snapshot(model)
    sw = SuperWeight(module="transformer.h.2.mlp.c_proj", row=10, col=99)
    report = ablate(model, tokenizer, [sw], scale_factors=(), outlier_fraction=1e-3, **FAST)
    assert _unchanged(model, before)
    key = "L2[10]"
    assert report.row("zero_sw").super_activation[key] < report.row("original").super_activation[key] / 5
    assert report.row("zero_sw_restore_sa").super_activation[key] == pytest.approx(
        report.row("original").super_activation[key], rel=1e-4
    )


def test_model_restored_when_evaluation_fails(tokenizer, monkeypatch):
    model = build_tiny_model("llama", super_weights=[(1, 5, 7)])
    before = _snapshot(model)
    calls = {"n": 0}
    real = ablation_module.perplexity

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # inside the outlier-pruning row
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(ablation_module, "perplexity", failing)
    with pytest.raises(RuntimeError, match="boom"):
        ablate(model, tokenizer, [SW], outlier_fraction=1e-3, **FAST)
    assert _unchanged(model, before)
    assert not model.model.layers[1]._forward_hooks


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"super_weights": [("model.layers.9.mlp.down_proj", 0, 0)]}, "does not exist"),
        ({"super_weights": [("model.layers.1.mlp.down_proj", 500, 7)]}, "outside"),
        ({"super_weights": [42]}, "super_weights entry"),
        ({"super_weights": []}, "empty"),
        ({"super_weights": [SW], "outlier_fraction": 1.5}, "outlier_fraction"),
        ({"super_weights": [SW], "scale_factors": (float("nan"),)}, "scale_factors"),
    ],
)
def test_invalid_input_is_rejected_before_touching_the_model(tokenizer, kwargs, match):
    model = build_tiny_model("llama", super_weights=[(1, 5, 7)])
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        ablate(model, tokenizer, **kwargs, **FAST)
    assert _unchanged(model, before)


@pytest.mark.slow
def test_smollm2_has_the_papers_shape():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_superweight import default_model_path

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    before = _snapshot(model)
    sw = SuperWeight(module="model.layers.11.mlp.down_proj", row=507, col=1229)
    report = ablate(model, tokenizer, [sw], max_tokens=512, scale_factors=())
    assert _unchanged(model, before)
    original, zeroed = report.row("original"), report.row("zero_sw")
    restored, pruned = report.row("zero_sw_restore_sa"), report.row("prune_outliers")
    # Zeroing one weight of 134M multiplies perplexity several times and collapses the super activation.
    assert zeroed.ratio > 3.0
    assert zeroed.super_activation["L11[507]"] < 0.5 * original.super_activation["L11[507]"]
    assert original.super_activation["L11[507]"] > 10_000
    # Restoring the super activation recovers (on SmolLM2: all of) the loss.
    assert restored.ppl < zeroed.ppl / 2
    # Zeroing the largest weight of every matrix (210 weights) costs far less than the one super weight.
    assert pruned.weights_changed == 210
    assert pruned.ratio < 1.6 and pruned.ratio < zeroed.ratio / 2


def test_outlier_pruning_keeps_super_and_protected_weights(tokenizer, monkeypatch):
    model = build_tiny_model("llama", super_weights=[(1, 5, 7)])
    down = model.model.layers[1].mlp.down_proj.weight
    protected = SuperWeight(module="model.layers.1.mlp.down_proj", row=3, col=4)
    with torch.no_grad():
        down[3, 4] = 9.0  # the largest entry of its matrix: pruned first unless protected
    seen = []
    real = ablation_module.perplexity

    def spy(*args, **kwargs):
        seen.append((float(down[5, 7].detach()), float(down[3, 4].detach()), int((down.detach() == 0).sum())))
        return real(*args, **kwargs)

    monkeypatch.setattr(ablation_module, "perplexity", spy)
    report = ablate(model, tokenizer, [SW], protect=[protected], scale_factors=(), outlier_fraction=1e-2,
                    restore_activation=False, **FAST)
    assert [r.name for r in report.rows] == ["original", "zero_sw", "prune_outliers"]
    sw_value, protected_value, zeros = seen[2]
    assert sw_value == 2.5 and protected_value == 9.0
    assert zeros >= math.ceil(1e-2 * down.numel())
    assert [p.row for p in report.protected] == [3]
    assert down[3, 4].item() == 9.0 and down[5, 7].item() == 2.5


def test_cli_perplexity_and_ablate(tmp_path, tokenizer, capsys):
    from optimum_superweight.cli import main

    model = build_tiny_model("llama", super_weights=[(1, 5, 7)])
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")

    out_json = tmp_path / "ppl.json"
    assert main(["perplexity", str(folder), "--text", str(text), "--max-tokens", "256", "--window", "64",
                 "--json", str(out_json)]) == 0
    data = json.loads(out_json.read_text())
    direct = __import__("optimum_superweight").perplexity(model, tokenizer, TEXT, max_tokens=256, window=64)
    assert data["ppl"] == pytest.approx(direct.ppl, rel=1e-5) and data["n_tokens"] == 256

    ablate_json = tmp_path / "ablate.json"
    assert main(["ablate", str(folder), "--text", str(text), "--max-tokens", "256", "--window", "64",
                 "--super-weight", "model.layers.1.mlp.down_proj:5,7", "--scale", "2", "--outlier-fraction", "0",
                 "--quiet", "--json", str(ablate_json)]) == 0
    printed = capsys.readouterr().out
    assert "super weights zeroed" in printed and "scaled x2" in printed
    rows = [r["name"] for r in json.loads(ablate_json.read_text())["rows"]]
    assert rows == ["original", "zero_sw", "zero_sw_restore_sa", "scale_sw_x2"]
    assert main(["ablate", str(folder), "--super-weight", "model.layers.9.mlp.down_proj:5,7", "--quiet",
                 "--max-tokens", "64", "--window", "32"]) == 2
