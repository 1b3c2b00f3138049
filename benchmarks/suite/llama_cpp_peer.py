"""llama.cpp's own quantizers as peer rows: its converter, its quantizer, its block formats.

The full-precision transformers folder is converted to GGUF **F32** by llama.cpp's ``convert_hf_to_gguf.py`` (once
per model and process: :func:`f32_conversion`), quantized by ``llama_model_quantize`` of llama-cpp-python with one
``ftype`` (``Q4_K_M``, ``Q4_0``, ...; no importance matrix: data-free), or, with an importance matrix, by
``llama-imatrix`` (on a calibration text given as a file, windows of 512) and ``llama-quantize --imatrix`` (the
command-line tools of the same llama.cpp, :func:`llama_tools`), and read back with gguf-py
(``gguf.GGUFReader`` + ``gguf.quants.dequantize``). Every decoder matrix is mapped back to its transformers module
(:func:`tensor_mapping`): names through gguf-py's tensor-name map, rows through the inverse of the converter's
rotary q/k row permutation where it applied one. The mapping is trusted only after the F32 tensors equal the
model's float32 weights exactly; otherwise the row fails.

Bits/weight count the bytes of each matrix's GGUF tensor as llama.cpp wrote it: a k-quant ``ftype`` is a mix
(some tensors get 6-bit types, and a matrix whose input width is not a multiple of 256 falls back to a
32-element block type), so the tensor types are recorded per row.

    >>> source = f32_conversion("/path/to/model")                           # doctest: +SKIP
    >>> denses, stored, seconds, extra = quantize(source, weights, "Q4_K_M")  # doctest: +SKIP
    >>> denses, stored, seconds, extra = quantize(source, weights, "IQ4_XS", imatrix_text="calibration text ...")  # doctest: +SKIP

Needs llama-cpp-python, gguf and llama.cpp's converter (``$OPTIMUM_SUPERWEIGHT_LLAMA_CPP``, or the source
distribution that ``scripts/test_llama_cpp.sh`` unpacks into the cache).
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["FTYPES", "GGUFSource", "f32_conversion", "tensor_mapping", "rope_row_order", "quantize", "converter_folder",
           "llama_cpp_version", "llama_tools", "importance_matrix"]

#: The ``ftype`` names this module accepts (``LLAMA_FTYPE_MOSTLY_<name>`` of llama-cpp-python; ``llama-quantize`` names).
FTYPES: tuple[str, ...] = ("Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_M", "Q3_K_S", "IQ4_XS")
#: Windows (tokens) of ``llama-imatrix``, like the package's calibration windows.
IMATRIX_CONTEXT = 512

_BENCHMARKS = Path(__file__).resolve().parents[1]


def converter_folder() -> Path:
    """llama.cpp's source folder: ``$OPTIMUM_SUPERWEIGHT_LLAMA_CPP`` or the sdist in the package cache."""
    from optimum_superweight.default_model import cache_dir
    from optimum_superweight.export.gguf import CONVERTER_ENV, find_converter

    if os.environ.get(CONVERTER_ENV):
        return find_converter()
    unpacked = sorted([*cache_dir().glob("llama-cpp-python-sdist/llama_cpp_python-*/vendor/llama.cpp"),
                       *cache_dir().glob("llama.cpp-*/src/llama_cpp_python-*/vendor/llama.cpp")])
    if unpacked:
        return find_converter(unpacked[-1])
    return find_converter()  # raises, saying how to get it


def _llama_cpp():
    """llama-cpp-python, not ``benchmarks/llama_cpp.py`` (the benchmarks folder is on sys.path)."""
    module = sys.modules.get("llama_cpp")
    if module is not None and hasattr(module, "llama_model_quantize"):
        return module
    sys.modules.pop("llama_cpp", None)
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCHMARKS]
    try:
        return importlib.import_module("llama_cpp")
    finally:
        sys.path[:] = saved


def llama_cpp_version() -> str:
    try:
        return str(getattr(_llama_cpp(), "__version__", "unknown"))
    except Exception as error:  # noqa: BLE001 - reported, not raised
        return f"unavailable: {type(error).__name__}: {error}"


@dataclass
class GGUFSource:
    """The F32 conversion of one model, and what converting it cost."""

    path: Path
    seconds: float
    converter: Path
    folder: Path = field(repr=False)
    #: Filled by the first :func:`quantize`: the mapping checked against the model's weights, and what that cost.
    mapping: dict[str, TensorMap] | None = field(default=None, repr=False)
    mapping_seconds: float = 0.0


_CONVERSIONS: dict[str, GGUFSource | Exception] = {}


def f32_conversion(source: str | os.PathLike[str]) -> GGUFSource:
    """Convert ``source`` (a transformers folder) to GGUF F32 with llama.cpp's converter, once per process.

    A failed conversion is remembered too, so each row of a model that the converter rejects fails at once.
    """
    key = str(Path(source).resolve())
    cached = _CONVERSIONS.get(key)
    if isinstance(cached, Exception):
        raise cached
    if cached is not None:
        return cached
    try:
        converter = converter_folder()
        folder = Path(tempfile.mkdtemp(prefix="llama-cpp-peer-"))
        atexit.register(shutil.rmtree, folder, True)
        out = folder / "f32.gguf"
        env = dict(os.environ, PYTHONPATH=str(converter / "gguf-py"))
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(converter / "convert_hf_to_gguf.py"), key, "--outtype", "f32",
                               "--outfile", str(out)], capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            if "pre-tokenizer was not recognized" in last:  # the tiny test models' byte tokenizer
                raise RuntimeError("not applicable: llama.cpp's converter does not know this model's tokenizer")
            raise RuntimeError(f"llama.cpp's converter rejected {key}: {last}")
        result = GGUFSource(out, seconds, converter, folder)
    except Exception as error:
        _CONVERSIONS[key] = error
        raise
    _CONVERSIONS[key] = result
    return result


def rope_row_order(rows: int, n_head: int) -> torch.Tensor:
    """Row ``i`` of the converter's permuted q/k matrix is row ``order[i]`` of the transformers matrix.

    llama.cpp's Llama converter interleaves each head's two rotary halves (``LlamaModel.permute``); for k,
    ``n_head`` is the number of key/value heads.
    """
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(rows)


def _field(reader: Any, name: str) -> Any:
    entry = reader.fields.get(name)
    return None if entry is None else entry.contents()


def _dense(tensor: Any) -> torch.Tensor:
    """A GGUF tensor as float32 ``[out, in]`` (GGUF lists dimensions innermost first)."""
    import gguf

    values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    shape = [int(d) for d in reversed(tensor.shape.tolist())]
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))


@dataclass(frozen=True)
class TensorMap:
    """One transformers module's GGUF tensor, and the row order that undoes the converter's permutation."""

    gguf_name: str
    order: torch.Tensor | None  # gguf row i = transformers row order[i]; None: same order

    def to_module(self, gguf_weight: torch.Tensor) -> torch.Tensor:
        if self.order is None:
            return gguf_weight
        out = torch.empty_like(gguf_weight)
        out[self.order] = gguf_weight
        return out


def tensor_mapping(path: Path, weights: dict[str, torch.Tensor]) -> dict[str, TensorMap]:
    """Map every module of ``weights`` (name -> float32 weight) to its tensor in the F32 GGUF at ``path``.

    Names come from gguf-py's tensor-name map of the file's architecture; the row order is the identity or the
    converter's rotary permutation (with the file's head counts), whichever reproduces the weight exactly. A
    module whose tensor is missing or matches neither raises: a mapping is never guessed.
    """
    import gguf

    reader = gguf.GGUFReader(path)
    arch_name = _field(reader, "general.architecture")
    arch = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}.get(arch_name)
    if arch is None:
        raise ValueError(f"{path}: architecture {arch_name!r} unknown to gguf-py {gguf.__name__}")
    names = gguf.get_tensor_name_map(arch, int(_field(reader, f"{arch_name}.block_count")))
    heads = [_field(reader, f"{arch_name}.attention.head_count"), _field(reader, f"{arch_name}.attention.head_count_kv")]
    tensors = {t.name: t for t in reader.tensors}
    mapping: dict[str, TensorMap] = {}
    for module, weight in weights.items():
        base = names.get_name(module)
        if base is None or f"{base}.weight" not in tensors:
            raise KeyError(f"{module}: no GGUF tensor (gguf-py maps it to {base!r})")
        gguf_weight = _dense(tensors[f"{base}.weight"])
        expected = weight.detach().to(torch.float32).cpu()
        candidates: list[torch.Tensor | None] = [None]
        candidates += [rope_row_order(expected.shape[0], int(h)) for h in dict.fromkeys(heads)
                       if h and expected.shape[0] % (2 * int(h)) == 0]
        for order in candidates:
            entry = TensorMap(f"{base}.weight", order)
            if gguf_weight.shape == expected.shape and torch.equal(entry.to_module(gguf_weight), expected):
                mapping[module] = entry
                break
        else:
            raise ValueError(f"{module}: GGUF tensor {base}.weight {tuple(gguf_weight.shape)} equals the model's weight "
                             f"{tuple(expected.shape)} in no known row order")
    return mapping


def _quantize_file(source: Path, out: Path, ftype: str, threads: int) -> None:
    llama_cpp = _llama_cpp()
    if ftype not in FTYPES:
        raise ValueError(f"ftype={ftype!r}: accepted {', '.join(FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize {ftype} of {source} failed")


def llama_tools() -> Path:
    """The folder of llama.cpp's command-line tools (``llama-imatrix``, ``llama-quantize``): ``$LLAMA_CPP_BIN``, else
    what ``scripts/build_llama_cpp.sh`` prints (it builds them once, from the llama-cpp-python source of the cache)."""
    folder = os.environ.get("LLAMA_CPP_BIN")
    if folder is None:
        script = _BENCHMARKS.parent / "scripts" / "build_llama_cpp.sh"
        done = subprocess.run(["bash", str(script)], capture_output=True, text=True)
        if done.returncode != 0 or not done.stdout.strip():
            raise FileNotFoundError(f"no llama.cpp tools: set LLAMA_CPP_BIN ({script} failed: {done.stderr.strip()[-300:]})")
        folder = done.stdout.strip().splitlines()[-1]
    for tool in ("llama-imatrix", "llama-quantize"):
        if not (Path(folder) / tool).is_file():
            raise FileNotFoundError(f"{folder} has no {tool} (LLAMA_CPP_BIN or scripts/build_llama_cpp.sh)")
    return Path(folder)


def _run(command: list[Any]) -> float:
    start = time.perf_counter()
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(str(command[0])).name} failed ({done.returncode}): {done.stderr.strip()[-1500:]}")
    return time.perf_counter() - start


def importance_matrix(converted: GGUFSource, text: str, threads: int) -> tuple[Path, float, int]:
    """``llama-imatrix`` of the F32 conversion on ``text`` (windows of :data:`IMATRIX_CONTEXT`, as many as the text
    fills; BOS first where the model's vocabulary adds one), once per conversion and text: ``(file, seconds, chunks)``."""
    key = f"imatrix-{hashlib.sha1(text.encode()).hexdigest()[:12]}"
    target = converted.folder / f"{key}.gguf"
    if target.is_file():
        return target, 0.0, int((converted.folder / f"{key}.chunks").read_text())
    text_file = converted.folder / f"{key}.txt"
    text_file.write_text(text, encoding="utf-8")
    seconds = _run([llama_tools() / "llama-imatrix", "-m", converted.path, "-f", text_file, "-o", target,
                    "-c", IMATRIX_CONTEXT, "-b", IMATRIX_CONTEXT, "-t", threads, "--no-ppl"])
    if not target.is_file():
        raise RuntimeError(f"llama-imatrix wrote no {target}")
    # The number of windows llama.cpp's tokens of the text fill (what the matrix averages over).
    import gguf

    counts = _field(gguf.GGUFReader(target), "imatrix.chunk_count")
    chunks = int(counts) if counts is not None else -1
    (converted.folder / f"{key}.chunks").write_text(str(chunks))
    return target, seconds, chunks


def quantize(source: str | os.PathLike[str], weights: dict[str, torch.Tensor], ftype: str,
             threads: int | None = None, imatrix_text: str | None = None) -> tuple[dict[str, torch.Tensor], int, float, dict[str, Any]]:
    """llama.cpp's ``ftype`` of the model in ``source``: ``(dense float32 weight per module, GGUF bytes of those
    tensors, conversion + [importance matrix +] quantization seconds, details)``. ``weights`` are the module
    weights to replace. ``imatrix_text``: compute llama.cpp's importance matrix on that text
    (:func:`importance_matrix`) and quantize with it (``llama-quantize --imatrix``)."""
    import gguf

    _llama_cpp()  # a missing library fails before the conversion is spent
    if ftype not in FTYPES:
        raise ValueError(f"ftype={ftype!r}: accepted {', '.join(FTYPES)}")
    converted = f32_conversion(source)
    if converted.mapping is None:  # reading a GGUF parses its whole vocabulary: once per model
        start = time.perf_counter()
        converted.mapping = tensor_mapping(converted.path, weights)
        converted.mapping_seconds = time.perf_counter() - start
    mapping = converted.mapping
    if set(mapping) != set(weights):
        raise ValueError(f"the F32 conversion was mapped for {len(mapping)} modules, {len(weights)} asked")
    out = converted.folder / f"{ftype}.gguf"
    threads = threads or torch.get_num_threads()
    imatrix = None
    if imatrix_text is None:
        start = time.perf_counter()
        _quantize_file(converted.path, out, ftype, threads)
        quantize_seconds = time.perf_counter() - start
    else:
        matrix, matrix_seconds, chunks = importance_matrix(converted, imatrix_text, threads)
        quantize_seconds = matrix_seconds + _run([llama_tools() / "llama-quantize", "--imatrix", matrix, converted.path,
                                                  out, ftype, threads])
        imatrix = {"tool": "llama-imatrix", "context": IMATRIX_CONTEXT, "chunks": chunks, "seconds": matrix_seconds,
                   "text_characters": len(imatrix_text)}
    start = time.perf_counter()
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    denses, stored, types, unchanged = {}, 0, {}, 0
    for module, entry in mapping.items():
        tensor = tensors[entry.gguf_name]
        denses[module] = entry.to_module(_dense(tensor))
        if denses[module].shape != weights[module].shape:
            raise ValueError(f"{module}: {ftype} tensor {tuple(denses[module].shape)} != {tuple(weights[module].shape)}")
        unchanged += int((denses[module] == weights[module].to(torch.float32)).sum())
        stored += int(tensor.n_bytes)
        kind = tensor.tensor_type.name
        types[kind] = types.get(kind, 0) + 1
    del tensors
    out.unlink()
    # Near 1 when the reference weights already lie on this ftype's grid (a model dequantized from a llama.cpp file):
    # then the row measures nothing.
    extra = {"ftype": ftype, "tensor_types": types,
             "unchanged_fraction": unchanged / sum(w.numel() for w in weights.values()),
             "convert_seconds": converted.seconds, "llama_quantize_seconds": quantize_seconds,
             "read_dequantize_seconds": time.perf_counter() - start, "mapping_check_seconds": converted.mapping_seconds,
             "rope_permuted_matrices": sum(e.order is not None for e in mapping.values()),
             "gguf_input": "F32 (convert_hf_to_gguf.py --outtype f32)", "imatrix": imatrix,
             "llama_cpp_python": llama_cpp_version(), "converter": str(converted.converter)}
    return denses, stored, converted.seconds + quantize_seconds, extra
