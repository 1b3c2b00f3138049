"""An export killed, failing or out of disk mid-write leaves the previous output or nothing, never a half export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from optimum_superweight import export as export_package
from optimum_superweight.export import export

from .conftest import quantize_tiny

pytest.importorskip("compressed_tensors")

_CHILD = textwrap.dedent("""
    import os, signal, sys
    import optimum_superweight.export as package
    from optimum_superweight.export import export
    point = sys.argv[3]
    real = package.add_transformers4_keys if point == "keys" else None
    def killed(*args, **kwargs):  # the writer's files are on disk, the export is not finished
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "keys":
        package.add_transformers4_keys = killed
    elif point == "tokenizer":
        package.tokenizer_of = lambda folder, tokenizer: type("T", (), {"save_pretrained": killed})()
    export(sys.argv[1], sys.argv[2], format="compressed-tensors")
""")


def _run_child(checkpoint: Path, out: Path, point: str) -> int:
    env = dict(os.environ, PYTHONPATH=str(Path(export_package.__file__).parents[2]), OPTIMUM_SUPERWEIGHT_NATIVE="0")
    return subprocess.run([sys.executable, "-c", _CHILD, str(checkpoint), str(out), point], env=env, timeout=600).returncode


@pytest.fixture()
def checkpoint(tiny_llama_dir, tmp_path):
    return quantize_tiny(tiny_llama_dir, tmp_path / "q", group_size=64)


@pytest.mark.parametrize("point", ["tokenizer", "keys"])
def test_sigkill_mid_export_leaves_no_output_then_the_previous_one(checkpoint, tmp_path, point):
    out = tmp_path / "vllm"
    assert _run_child(checkpoint, out, point) == -signal.SIGKILL
    assert not out.exists()  # a new export: nothing a server would load
    export(checkpoint, out, format="compressed-tensors")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert _run_child(checkpoint, out, point) == -signal.SIGKILL
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous export, untouched


def test_error_mid_export_keeps_the_previous_output_and_cleans_up(checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "vllm"
    export(checkpoint, out, format="compressed-tensors")
    config = json.loads((out / "config.json").read_text())

    def full_disk(folder):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_package, "add_transformers4_keys", full_disk)
    with pytest.raises(OSError, match="No space left"):
        export(checkpoint, out, format="compressed-tensors")
    assert json.loads((out / "config.json").read_text()) == config
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".vllm")) == []


def test_gguf_file_is_replaced_in_one_step(checkpoint, tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    target = tmp_path / "model.gguf"
    target.write_bytes(b"previous")

    def failing(*args, **kwargs):
        raise RuntimeError("writer failed")

    monkeypatch.setattr("optimum_superweight.export.gguf.export_gguf", failing)
    with pytest.raises(RuntimeError, match="writer failed"):
        export(checkpoint, target, format="gguf")
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".model.gguf")] == []
