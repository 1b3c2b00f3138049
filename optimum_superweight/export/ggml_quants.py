"""llama.cpp's own block quantizer (``ggml_quantize_chunk`` of ``libggml-base``), bound with ctypes.

gguf-py quantizes only the legacy block types (Q4_0 ... Q8_0); the k-quants that ``llama-quantize`` gives a
model's output head and token embeddings (Q6_K, Q4_K) exist only in ggml's C code. This module loads the
``libggml-base`` of the llama.cpp build that ``scripts/setup.sh`` makes (``scripts/build_llama_cpp.sh``) and
calls the routine ``llama-quantize`` runs on each tensor (``ggml_quantize_chunk``, no importance matrix), so
the bytes are the ones ``llama-quantize --output-tensor-type q6_k`` would write for the same float32 matrix.

Where the library is looked for, first match wins:

1. ``$OPTIMUM_SUPERWEIGHT_GGML_LIB`` (a ``libggml-base`` file or the folder holding it), then ``$LLAMA_CPP_BIN``
   (the folder of llama.cpp's tools, as ``benchmarks/serve.py`` reads it);
2. the ``lib/`` folder of the ``llama_cpp`` bindings on ``sys.path`` (setup.sh links it to the build of this CPU);
3. the only ``llama.cpp-*/cpu-*/build/bin`` under the package cache (a build is for one CPU: with several,
   none is guessed).

Before first use the ggml type ids, block sizes and block bytes are checked against gguf-py's
``GGMLQuantizationType`` / ``GGML_QUANT_SIZES``; a library that disagrees is refused, not used.

>>> from optimum_superweight.export.ggml_quants import available, quantize
>>> if available():  # doctest: +SKIP
...     raw = quantize(np.zeros((4, 256), np.float32), "Q6_K")  # uint8 [4, 210]
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = ["GGML_LIB_ENV", "GGMLUnavailableError", "available", "library_path", "quantize", "unavailable_reason"]

#: Environment variable naming llama.cpp's ``libggml-base`` shared library (or its folder).
GGML_LIB_ENV = "OPTIMUM_SUPERWEIGHT_GGML_LIB"
_NAMES = ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll")
_INSTALL = "run `bash scripts/setup.sh` (builds llama.cpp once per CPU) or set $OPTIMUM_SUPERWEIGHT_GGML_LIB to a libggml-base"


class GGMLUnavailableError(ImportError):
    """llama.cpp's ``libggml-base`` was not found, or it disagrees with gguf-py about a type."""


def _in_folder(folder: Path) -> Path | None:
    return next((folder / name for name in _NAMES if (folder / name).is_file()), None)


def library_path() -> Path | None:
    """The ``libggml-base`` this module would load, or ``None`` (see the module docstring for the order)."""
    given = os.environ.get(GGML_LIB_ENV)
    if given:
        path = Path(given).expanduser()
        found = _in_folder(path) if path.is_dir() else path
        if found is None or not found.is_file():
            raise GGMLUnavailableError(f"${GGML_LIB_ENV}={given!r} is invalid: expected a libggml-base file or a folder holding one.")
        return found
    if os.environ.get("LLAMA_CPP_BIN") and (found := _in_folder(Path(os.environ["LLAMA_CPP_BIN"]).expanduser())):
        return found
    spec = importlib.util.find_spec("llama_cpp")  # its folder only: importing it would load libllama too
    if spec is not None and spec.origin and (found := _in_folder(Path(spec.origin).parent / "lib")):
        return found
    from ..default_model import cache_dir

    builds = sorted({p.resolve() for p in cache_dir().glob("llama.cpp-*/cpu-*/build/bin/libggml-base.*") if p.suffix in (".so", ".dylib", ".dll")})
    return builds[0] if len(builds) == 1 else None


@lru_cache(maxsize=None)
def _library(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    for name in ("ggml_quantize_chunk", "ggml_row_size", "ggml_type_name", "ggml_blck_size", "ggml_type_size", "ggml_quantize_init",
                 "ggml_quantize_requires_imatrix"):
        if not hasattr(lib, name):
            raise GGMLUnavailableError(f"{path} does not export {name}: not a libggml-base of llama.cpp ({_INSTALL}).")
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    lib.ggml_type_name.restype = ctypes.c_char_p
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_type_size.argtypes = [ctypes.c_int]
    lib.ggml_type_size.restype = ctypes.c_size_t
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    return lib


@lru_cache(maxsize=None)
def _checked_type(path: str, type_name: str) -> int:
    """gguf-py's id of ``type_name`` once the library agrees on its name, block size and block bytes."""
    import gguf

    lib = _library(path)
    try:
        qtype = gguf.GGMLQuantizationType[type_name]
    except KeyError:
        raise ValueError(f"type_name={type_name!r} is invalid: expected a GGMLQuantizationType name such as 'Q6_K', 'Q4_K'.") from None
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    ours = (lib.ggml_type_name(int(qtype)) or b"").decode().upper(), lib.ggml_blck_size(int(qtype)), lib.ggml_type_size(int(qtype))
    if ours != (type_name.upper(), block, size):
        raise GGMLUnavailableError(f"{path} disagrees with gguf-py on type id {int(qtype)}: it says (name, block, bytes) = {ours}, "
                                   f"gguf-py {(type_name, block, size)}; the llama.cpp build and the gguf package are of different versions.")
    if lib.ggml_quantize_requires_imatrix(int(qtype)):
        raise ValueError(f"type_name={type_name!r} needs an importance matrix in llama.cpp; expected a type that does not (Q6_K, Q4_K, Q8_0, ...).")
    return int(qtype)


def unavailable_reason() -> str | None:
    """Why :func:`quantize` cannot run here (``None`` when it can): no library, or one that fails the checks."""
    try:
        path = library_path()
        if path is None:
            return f"llama.cpp's libggml-base was not found ({_INSTALL})"
        _checked_type(str(path), "Q6_K")
    except (OSError, ImportError) as error:  # GGMLUnavailableError is an ImportError
        return str(error)
    return None


def available() -> bool:
    """Whether llama.cpp's quantizer can be used here."""
    return unavailable_reason() is None


def quantize(values: np.ndarray, type_name: str, threads: int | None = None) -> np.ndarray:
    """``values`` (float32 ``[rows, n_per_row]``) as ggml blocks of ``type_name``: uint8 ``[rows, row bytes]``.

    The bytes ``llama-quantize`` writes for this matrix and type without an importance matrix. Rows are
    quantized independently, so ``threads`` (default: torch's thread count) split them into chunks, as
    ``llama-quantize`` does; the result does not depend on it.
    """
    path = library_path()
    if path is None:
        raise GGMLUnavailableError(f"llama.cpp's libggml-base was not found: {_INSTALL}.")
    qtype = _checked_type(str(path), type_name)
    lib = _library(str(path))
    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"values.shape={values.shape} is invalid: expected a 2-D [rows, n_per_row] matrix.")
    rows, n_per_row = values.shape
    block = lib.ggml_blck_size(qtype)
    if n_per_row % block:
        raise ValueError(f"values.shape={values.shape} is invalid for {type_name}: rows must be a multiple of {block} elements.")
    row_bytes = lib.ggml_row_size(qtype, n_per_row)
    out = np.empty((rows, row_bytes), dtype=np.uint8)
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    # ctypes releases the GIL during the call, so threads quantize their chunks of rows in parallel.
    step = max(1, min(rows, -(-rows // max(1, int(threads))), 4096))
    starts = range(0, rows, step)

    def chunk(start: int) -> int:
        # ``start`` counts elements, not rows: ggml writes from row start / n_per_row.
        return lib.ggml_quantize_chunk(qtype, values.ctypes.data, out.ctypes.data, start * n_per_row, min(step, rows - start), n_per_row, None)

    lib.ggml_quantize_init(qtype)  # its tables once, before the threads share them
    with ThreadPoolExecutor(max_workers=max(1, int(threads))) as pool:
        written = sum(pool.map(chunk, starts))
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes for {type_name} {values.shape}, expected {out.nbytes}.")
    return out
