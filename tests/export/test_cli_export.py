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
