"""``optimum-superweight export``: wiring, and the error naming the layer when a format cannot hold it."""

from __future__ import annotations

import json

import pytest

from optimum_superweight.cli import main

from .conftest import quantize_tiny

pytest.importorskip("compressed_tensors")


def test_cli_export_compressed_tensors(tiny_checkpoint, tmp_path, capsys):
    assert main(["export", str(tiny_checkpoint), str(tmp_path / "ct"), "--format", "compressed-tensors"]) == 0
    assert "vllm serve" in capsys.readouterr().out
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"


def test_cli_export_refusal_is_an_error(tiny_llama_dir, tmp_path, capsys):
    checkpoint = quantize_tiny(tiny_llama_dir, tmp_path / "g48", group_size=48)
    assert main(["export", str(checkpoint), str(tmp_path / "ct"), "--format", "compressed-tensors"]) == 2
    err = capsys.readouterr().err
    assert "cannot be exported exactly" in err and "--requantize" in err


def test_cli_rejects_checkpoint_of_another_method(tiny_llama_dir, tmp_path, capsys):
    assert main(["export", str(tiny_llama_dir), str(tmp_path / "ct"), "--format", "compressed-tensors"]) == 2
    assert "quant_method" in capsys.readouterr().err


def test_cli_export_awq(tiny_llama_dir, tmp_path, capsys):
    checkpoint = quantize_tiny(tiny_llama_dir, tmp_path / "asym", group_size=32, symmetric=False)
    assert main(["export", str(checkpoint), str(tmp_path / "awq"), "--format", "awq"]) == 0
    out = capsys.readouterr().out
    assert "vllm serve" in out and "--dtype float16" in out
    config = json.loads((tmp_path / "awq" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "awq" and config["dtype"] == "float16"


def test_cli_export_awq_float_offsets_one_line_error(tiny_llama_dir, tmp_path, capsys):
    checkpoint = quantize_tiny(tiny_llama_dir, tmp_path / "f", group_size=32, symmetric=False, zero_point="float", method="hqq")
    capsys.readouterr()
    assert main(["export", str(checkpoint), str(tmp_path / "awq"), "--format", "awq"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "cannot be exported exactly" in line]
    assert len(errors) == 1 and "model.layers.0.self_attn.q_proj" in errors[0] and "float offsets" in errors[0]
    assert "--requantize" in errors[0] and "Traceback" not in errors[0]
