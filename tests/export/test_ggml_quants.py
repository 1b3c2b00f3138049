"""llama.cpp's own block quantizer bound with ctypes (export/ggml_quants.py): types checked, bytes as gguf-py's.

Needs the libggml-base of the llama.cpp build that ``bash scripts/setup.sh`` makes (CI builds it); the tests
that quantize skip, with the reason, only where that build is absent. The byte-for-byte comparison with the
``llama-quantize`` tool itself is in tests/export/test_llama_cpp.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from optimum_superweight.export import ggml_quants

gguf = pytest.importorskip("gguf")


@pytest.fixture()
def ggml():
    reason = ggml_quants.unavailable_reason()
    if reason is not None:
        pytest.skip(f"llama.cpp's quantizer is unavailable: {reason}")
    return ggml_quants


def _matrix(rows=40, cols=512, seed=0):
    values = np.random.default_rng(seed).normal(0, 0.02, (rows, cols)).astype(np.float32)
    values[3, 17] = 0.9  # an outlier row, as embeddings have
    return values


@pytest.mark.parametrize("type_name", ["Q8_0", "Q5_0", "Q4_0"])
def test_legacy_types_byte_identical_to_gguf_py(ggml, type_name):
    # gguf-py ports ggml's reference quantizer for these types: same bytes means same layout and type ids.
    values = _matrix()
    qtype = gguf.GGMLQuantizationType[type_name]
    assert np.array_equal(ggml.quantize(values, type_name, threads=1), gguf.quants.quantize(values, qtype))


@pytest.mark.parametrize(("type_name", "tolerance"), [("Q6_K", 0.004), ("Q4_K", 0.015)])
def test_k_quants_dequantize_close_and_threads_do_not_matter(ggml, type_name, tolerance):
    values = _matrix(rows=37)
    qtype = gguf.GGMLQuantizationType[type_name]
    raw = ggml.quantize(values, type_name, threads=1)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    assert raw.dtype == np.uint8 and raw.shape == (37, 512 // block * size)
    back = gguf.quants.dequantize(raw, qtype).reshape(values.shape)
    error = np.abs(back - values)
    assert 0 < np.delete(error, 3, axis=0).max() < tolerance and back[3, 17] == pytest.approx(0.9, rel=0.05)
    assert np.array_equal(ggml.quantize(values, type_name, threads=3), raw)  # row chunks split over threads


def test_bad_input_named(ggml):
    with pytest.raises(ValueError, match=r"values.shape=\(4, 100\) is invalid for Q6_K: rows must be a multiple of 256"):
        ggml.quantize(np.zeros((4, 100), np.float32), "Q6_K")
    with pytest.raises(ValueError, match="values.shape=.* expected a 2-D"):
        ggml.quantize(np.zeros(256, np.float32), "Q6_K")
    with pytest.raises(ValueError, match="type_name='Q9_K' is invalid"):
        ggml.quantize(np.zeros((1, 256), np.float32), "Q9_K")
    with pytest.raises(ValueError, match="type_name='IQ2_XXS' needs an importance matrix"):
        ggml.quantize(np.zeros((1, 256), np.float32), "IQ2_XXS")


def test_library_from_environment_checked(tmp_path, monkeypatch):
    monkeypatch.setenv(ggml_quants.GGML_LIB_ENV, str(tmp_path))
    with pytest.raises(ggml_quants.GGMLUnavailableError, match="OPTIMUM_SUPERWEIGHT_GGML_LIB"):
        ggml_quants.library_path()
    assert "OPTIMUM_SUPERWEIGHT_GGML_LIB" in ggml_quants.unavailable_reason() and not ggml_quants.available()
    fake = tmp_path / "libggml-base.so"
    fake.write_bytes(b"not a library")
    assert ggml_quants.library_path() == fake
    assert not ggml_quants.available()  # dlopen fails: a reason, not a crash
    with pytest.raises(OSError):
        ggml_quants.quantize(np.zeros((1, 256), np.float32), "Q6_K")


def test_export_falls_back_to_gguf_py_types_without_the_library(monkeypatch, tmp_path):
    from optimum_superweight.export.gguf_types import embedding_type

    monkeypatch.setenv(ggml_quants.GGML_LIB_ENV, str(tmp_path / "missing"))
    type_name, reason = embedding_type("output.weight", 1536, has_output=True)
    assert type_name == "Q8_0" and "OPTIMUM_SUPERWEIGHT_GGML_LIB" in reason and "gguf-py cannot write Q6_K" in reason
