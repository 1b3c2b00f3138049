"""Fixtures for the export tests: a tiny quantized checkpoint, llama.cpp's converter (from scripts/setup.sh), an
isolated loader."""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch

MODULE, ROW, COL = "model.layers.1.mlp.down_proj", 5, 7
IDS = torch.arange(2, 34).reshape(2, 16)
_ISOLATED = Path(__file__).with_name("isolated_load.py")


def quantize_tiny(folder: Path, out: Path, **config) -> Path:
    from transformers import AutoModelForCausalLM

    from optimum_superweight import SuperWeightConfig
    from optimum_superweight.testing import tiny_tokenizer

    config.setdefault("super_weights", [{"module": MODULE, "row": ROW, "col": COL}])
    # Pinned, whatever the package default: these tests are about the layouts they name.
    config.setdefault("method", "rtn")
    config.setdefault("symmetric", True)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=SuperWeightConfig(bits=config.pop("bits", 4), **config))
    model.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


@pytest.fixture()
def tiny_checkpoint(tiny_llama_dir, tmp_path):
    """Symmetric int4, group 64: the default layout."""
    return quantize_tiny(tiny_llama_dir, tmp_path / "tiny-q", group_size=64)


def load_isolated(export_dir: Path, tmp_path: Path, ids: torch.Tensor = IDS, modules: list[str] | None = None) -> dict:
    """Load ``export_dir`` with plain transformers in a child interpreter where optimum_superweight is absent."""
    ids_file, out_file = tmp_path / "ids.pt", tmp_path / "isolated.pt"
    torch.save(ids, ids_file)
    command = [sys.executable, "-I", "-S", str(_ISOLATED), *site.getsitepackages(), "--", str(export_dir), str(ids_file), str(out_file)]
    if modules is not None:
        command.append(",".join(modules))
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out_file)


def sdist_folder() -> Path | None:
    """llama.cpp inside the llama-cpp-python sdist that scripts/build_llama_cpp.sh unpacked (newest version)."""
    from optimum_superweight.default_model import cache_dir

    found = sorted(cache_dir().glob("llama.cpp-*/src/llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    return found[-1].parent if found else None


@pytest.fixture(scope="session")
def converter():
    """llama.cpp's converter folder: $OPTIMUM_SUPERWEIGHT_LLAMA_CPP, else the llama-cpp-python sdist from PyPI."""
    pytest.importorskip("gguf")
    pytest.importorskip("sentencepiece")
    from optimum_superweight.export.gguf import CONVERTER_ENV, find_converter

    if os.environ.get(CONVERTER_ENV):
        return find_converter()
    folder = sdist_folder()
    # Never downloaded here: scripts/setup.sh puts it in place, and tests/test_setup.py fails when it is missing.
    if folder is None:
        pytest.skip(f"llama.cpp's converter is missing: run bash scripts/setup.sh (or set {CONVERTER_ENV})")
    return find_converter(folder)
