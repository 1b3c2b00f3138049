"""Quantize while loading (low_memory=True) and streaming detection from safetensors shards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import optimum_superweight  # noqa: F401  (registers the quantizer)
from optimum_superweight import SuperWeightConfig
from optimum_superweight.detection import detect_super_weights
from optimum_superweight.streaming import checkpoint_files, detect_super_weights_streaming
from optimum_superweight.testing import build_tiny_model

PLANTED = [(1, 5, 7), (2, 9, 30)]
IDS = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    model = build_tiny_model("llama", super_weights=PLANTED)
    folder = tmp_path_factory.mktemp("tiny_fp32")
    model.save_pretrained(folder, max_shard_size="100KB")  # several shards, with an index
    return folder, model


def test_streaming_detection_matches_in_memory_search(tiny_folder):
    folder, model = tiny_folder
    assert len(checkpoint_files(folder)) > 1
    streamed = detect_super_weights_streaming(folder)
    loaded = detect_super_weights(model, confirm=False)
    assert [(c.module, c.row, c.col) for c in streamed.candidates] == [
        (f"model.layers.{layer}.mlp.down_proj", row, col) for layer, row, col in PLANTED
    ]
    assert [(c.module, c.row, c.col, c.value) for c in streamed.candidates] == [
        (c.module, c.row, c.col, c.value) for c in loaded.candidates
    ]
    assert streamed.layer_spikes == loaded.layer_spikes
    assert streamed.confirmation is None and "model.layers.1" in streamed.to_text()
    only = detect_super_weights_streaming(folder, layers=[2])
    assert [(c.layer, c.row, c.col) for c in only.candidates] == [(2, 9, 30)]


def test_streaming_detection_validates_input(tmp_path, tiny_folder):
    with pytest.raises(ValueError, match="not a directory"):
        detect_super_weights_streaming(tmp_path / "missing")
    with pytest.raises(ValueError, match="no safetensors"):
        detect_super_weights_streaming(tmp_path, config=tiny_folder[1].config)
    with pytest.raises(ValueError, match="layers="):
        detect_super_weights_streaming(tiny_folder[0], layers=[99])


@pytest.mark.parametrize(
    "options",
    [
        {},  # streaming detection
        {"super_weights": [{"module": "model.layers.1.mlp.down_proj", "row": 5, "col": 7}]},
        {"bits": 3, "group_size": 32, "symmetric": False, "clip_search": True},
    ],
)
def test_quantize_on_load_equals_in_memory_quantization(tiny_folder, tmp_path, options):
    folder, _ = tiny_folder
    in_memory = AutoModelForCausalLM.from_pretrained(folder, quantization_config=SuperWeightConfig(**options))
    on_load = AutoModelForCausalLM.from_pretrained(folder, quantization_config=SuperWeightConfig(low_memory=True, **options))
    expected, got = in_memory.state_dict(), on_load.state_dict()
    assert set(expected) == set(got)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    with torch.no_grad():
        logits = on_load(IDS).logits
        assert torch.equal(in_memory(IDS).logits, logits)
    coords = lambda m: [(s["module"], s["row"], s["col"], s["value"]) for s in m.config.quantization_config.super_weights]
    assert coords(on_load) == coords(in_memory)
    # Saved sharded and reloaded like any compressed checkpoint.
    on_load.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, logits)


def test_quantize_on_load_rejects_wrong_coordinates(tiny_folder):
    folder, _ = tiny_folder
    wrong_value = SuperWeightConfig(low_memory=True, super_weights=[{"module": "model.layers.1.mlp.down_proj", "row": 5, "col": 7, "value": -3.0}])
    with pytest.raises(Exception, match="conversion|recorded as"):
        AutoModelForCausalLM.from_pretrained(folder, quantization_config=wrong_value)
    outside = SuperWeightConfig(low_memory=True, super_weights=[{"module": "model.layers.1.mlp.down_proj", "row": 5, "col": 4096}])
    with pytest.raises(ValueError, match="outside the matrix"):
        AutoModelForCausalLM.from_pretrained(folder, quantization_config=outside)


def test_low_memory_config_validation():
    assert SuperWeightConfig(low_memory=True).to_dict()["low_memory"] is True
    assert SuperWeightConfig.from_dict(SuperWeightConfig(low_memory=True).to_dict()).low_memory is True
    with pytest.raises(ValueError, match="low_memory"):
        SuperWeightConfig(low_memory="yes")
    with pytest.raises(ValueError, match="method='gptq'"):
        SuperWeightConfig(low_memory=True, method="gptq")


def test_quantize_on_load_with_device_map(tiny_folder):
    folder, _ = tiny_folder
    reference = AutoModelForCausalLM.from_pretrained(folder, quantization_config=SuperWeightConfig(low_memory=True))
    for device_map in ("auto", {"": "cpu"}):
        model = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=SuperWeightConfig(low_memory=True), device_map=device_map
        )
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, reference(IDS).logits)
    with pytest.raises(ValueError, match="offloads modules to disk"):
        AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=SuperWeightConfig(low_memory=True), device_map={"": "disk"},
            offload_folder=str(folder) + "_offload",
        )


def test_cli_detect_streaming(tiny_folder, tmp_path):
    folder, _ = tiny_folder
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "optimum_superweight.cli", "detect", str(folder), "--streaming", "--quiet", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    found = [(c["module"], c["row"], c["col"]) for c in json.loads(out.read_text())["candidates"]]
    assert found == [(f"model.layers.{layer}.mlp.down_proj", row, col) for layer, row, col in PLANTED]


@pytest.mark.slow
def test_quantize_on_load_private_memory_stays_below_the_fp32_checkpoint(tmp_path):
    """8 decoder layers, ~290 MB of float32: quantize-on-load's private memory (RssAnon) grows by far less
    than the checkpoint (mapped checkpoint pages, RssFile, are reclaimable page cache and counted apart)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import low_memory as bench

    info = bench.make_checkpoint(str(tmp_path), 8)
    with_load = bench.measure("low_memory", str(tmp_path))
    baseline = bench.measure("import", str(tmp_path))
    assert with_load["super_weights"] == [["model.layers.1.mlp.down_proj", 5, 7]]
    growth = with_load["peak_anon_bytes"] - baseline["peak_anon_bytes"]
    assert growth < 0.75 * info["fp32_bytes"], (growth, info)
