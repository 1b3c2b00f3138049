"""Export to GGUF for llama.cpp: tensor names, layout and tokenizer from llama.cpp's own converter, codes from us.

llama.cpp's ``convert_hf_to_gguf.py`` (its ``conversion`` package, loaded at run time from a llama.cpp checkout:
nothing of it is copied here) reads the dense twin of the checkpoint (see :mod:`.source`) and does names, the
q/k row permutation, hyper-parameters and the tokenizer. A subclass of its model class intercepts each of our
quantized weights: the converter's own ``modify_tensors`` runs on a column of row numbers, which yields the GGUF
name and the row permutation, and the tensor is written from our codes, permuted the same way, as the
llama.cpp block type that holds them exactly (:data:`ENCODINGS`). Every written block is dequantized again with
gguf-py and compared with our weights; a mismatch is an error.

Tensors that hold super weights are written dense (``super_weight_type``); the coordinates go to the metadata
under ``superweight.*``.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .codes import ModuleCodes, exactly_representable
from .errors import NotExpressibleError, require

__all__ = ["export_gguf", "ENCODINGS", "GGUFEncoding", "encode", "find_converter", "CONVERTER_ENV"]

logger = logging.getLogger(__name__)

#: Environment variable naming a llama.cpp source folder (with ``convert_hf_to_gguf.py`` and ``conversion/``).
CONVERTER_ENV = "OPTIMUM_SUPERWEIGHT_LLAMA_CPP"
_BLOCK = 32  # elements per block of Q4_0, Q4_1, Q8_0


def _gguf():
    try:
        import gguf
    except ImportError as error:
        raise ImportError("GGUF export needs the `gguf` package: pip install 'optimum-superweight[gguf]'") from error
    return gguf


def _fp16_bytes(values: torch.Tensor) -> np.ndarray:
    return values.to(torch.float16).numpy().view(np.uint8).reshape(*values.shape, 2)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    # ggml's 4-bit block: byte j holds element j (low nibble) and element j + 16 (high nibble).
    return (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8)


@dataclass(frozen=True)
class GGUFEncoding:
    """A llama.cpp block type and the checkpoint variants it holds exactly (``w = d*c + m`` per group)."""

    name: str
    bits: int
    variants: tuple[str, ...]
    stores_offset: bool  # Q4_1 stores m; Q4_0 / Q8_0 imply m = -d * center

    def check(self, codes: ModuleCodes) -> None:
        """Raise :class:`NotExpressibleError` unless this type holds ``codes`` exactly."""
        require(codes.bits == self.bits, codes.name, f"{codes.bits}-bit codes ({self.name} holds {self.bits})")
        require(codes.variant in self.variants, codes.name, f"variant {codes.variant!r} ({self.name} holds {self.variants})")
        require(codes.in_features % _BLOCK == 0, codes.name, f"in_features {codes.in_features} is not a multiple of {_BLOCK}")
        require(
            codes.group_size % _BLOCK == 0,
            codes.name,
            f"group_size {codes.group_size} is not a multiple of {self.name}'s block of {_BLOCK}",
        )
        d, m = codes.affine()
        require(exactly_representable(d, torch.float16), codes.name, f"scales not representable in {self.name}'s float16")
        if self.stores_offset:
            require(exactly_representable(m, torch.float16), codes.name, f"offsets not representable in {self.name}'s float16")

    def encode(self, codes: ModuleCodes, rows: torch.Tensor) -> np.ndarray:
        """uint8 ``[out, blocks * bytes]`` of the rows ``rows`` (the converter's permutation)."""
        d, m = codes.affine()
        blocks = codes.in_features // _BLOCK
        group_of_block = torch.arange(blocks) * _BLOCK // codes.group_size
        d_blocks = d[rows][:, group_of_block]
        q = codes.codes[rows].numpy().reshape(codes.out_features, blocks, _BLOCK)
        parts = [_fp16_bytes(d_blocks)]
        if self.stores_offset:
            parts.append(_fp16_bytes(m[rows][:, group_of_block]))
        if self.bits == 4:
            parts.append(_nibbles(q))
        else:
            parts.append((q.astype(np.int16) - codes.center).astype(np.int8).view(np.uint8))
        return np.concatenate(parts, axis=-1).reshape(codes.out_features, -1)


#: Block types tried in order for each quantized layer; add a variant to ``variants`` to export it.
ENCODINGS: tuple[GGUFEncoding, ...] = (
    GGUFEncoding("Q4_0", 4, ("symmetric",), stores_offset=False),
    GGUFEncoding("Q4_1", 4, ("symmetric", "zero_point", "float_offset"), stores_offset=True),
    GGUFEncoding("Q8_0", 8, ("symmetric",), stores_offset=False),
)


def encoding_for(codes: ModuleCodes) -> GGUFEncoding:
    """The first of :data:`ENCODINGS` that holds ``codes`` exactly, else :class:`NotExpressibleError` with every reason."""
    reasons = []
    for encoding in ENCODINGS:
        try:
            encoding.check(codes)
            return encoding
        except NotExpressibleError as error:
            reasons.append(f"{encoding.name}: {error.what}")
    raise NotExpressibleError(codes.name, "no llama.cpp block type holds it (" + "; ".join(reasons) + ")")


def encode(codes: ModuleCodes, rows: torch.Tensor | None = None) -> tuple[np.ndarray, str]:
    """Our codes as llama.cpp blocks, verified by gguf-py's dequantize: ``(bytes, type name)``."""
    gguf = _gguf()
    rows = torch.arange(codes.out_features) if rows is None else rows
    encoding = encoding_for(codes)
    data = encoding.encode(codes, rows)
    qtype = gguf.GGMLQuantizationType[encoding.name]
    back = gguf.quants.dequantize(data, qtype)
    if not np.array_equal(back, codes.dequantize()[rows].numpy()):
        raise RuntimeError(f"{codes.name}: {encoding.name} blocks do not dequantize to our weights; nothing was written.")
    return data, encoding.name


# -- the converter ----------------------------------------------------------------------------------------------
def find_converter(path: str | os.PathLike[str] | None = None) -> Path:
    """The llama.cpp source folder holding ``convert_hf_to_gguf.py`` and its ``conversion`` package."""
    candidates = [path, os.environ.get(CONVERTER_ENV)]
    for candidate in candidates:
        if candidate is None:
            continue
        folder = Path(candidate)
        if (folder / "vendor" / "llama.cpp" / "conversion").is_dir():
            folder = folder / "vendor" / "llama.cpp"  # the llama-cpp-python source distribution
        if (folder / "conversion").is_dir() and (folder / "convert_hf_to_gguf.py").is_file():
            return folder
        raise FileNotFoundError(f"converter={os.fspath(candidate)!r} holds no convert_hf_to_gguf.py with a conversion/ package.")
    raise FileNotFoundError(
        "GGUF export needs llama.cpp's converter (convert_hf_to_gguf.py + conversion/). Get it with "
        "`pip download --no-binary :all: --no-deps llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz` (or a llama.cpp "
        f"checkout) and pass converter=PATH (--converter PATH) or set {CONVERTER_ENV}=PATH."
    )


def _use_converter_gguf(folder: Path) -> None:
    """Import the gguf-py that ships with the converter: it may be newer than the release of the same number."""
    vendored = folder / "gguf-py"
    if not vendored.is_dir():
        return
    loaded = sys.modules.get("gguf")
    if loaded is not None and Path(getattr(loaded, "__file__", "")).resolve().is_relative_to(vendored.resolve()):
        return
    for name in [n for n in sys.modules if n == "gguf" or n.startswith("gguf.")]:
        del sys.modules[name]
    sys.path.insert(0, str(vendored))


def _conversion_module(folder: Path):
    _use_converter_gguf(folder)
    _gguf()
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    try:
        return importlib.import_module("conversion")
    except ImportError as error:
        raise ImportError(f"llama.cpp's conversion package in {folder} failed to import ({error}); install gguf and sentencepiece: pip install 'optimum-superweight[gguf]'") from error


_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}


@dataclass
class _Plan:
    encoded: dict[str, ModuleCodes]  # HF tensor name -> codes written from our blocks
    dense_types: dict[str, str]  # HF tensor name -> forced GGUF type
    requantize: dict[str, str]  # HF tensor name -> type gguf-py re-quantizes it to (on request)
    written: dict[str, tuple[np.ndarray, str]]  # GGUF name -> our blocks, filled while converting
    gguf_names: dict[str, str]  # HF tensor name -> GGUF name


def _exporting_class(base: type, plan: _Plan, metadata: Callable[[Any], None], pre_tokenizer: str | None) -> type:
    gguf = _gguf()

    class SuperWeightExport(base):  # type: ignore[misc, valid-type]
        model_arch = base.model_arch  # the converter checks each subclass declares it

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            add_tensor = self.gguf_writer.add_tensor

            def add_ours(name: str, tensor: Any, *a: Any, raw_dtype: Any = None, **kw: Any) -> None:
                if name in plan.written:
                    data, type_name = plan.written.pop(name)
                    return add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[type_name])
                return add_tensor(name, tensor, *a, raw_dtype=raw_dtype, **kw)

            self.gguf_writer.add_tensor = add_ours

        def modify_tensors(self, data_torch, name, bid):
            codes = plan.encoded.get(name)
            if codes is None:
                for new_name, data in super().modify_tensors(data_torch, name, bid):
                    plan.gguf_names[name] = new_name
                    yield new_name, data
                return
            # The converter's own name mapping and row permutation, run on a column of row numbers.
            index = torch.arange(codes.out_features, dtype=torch.float32).unsqueeze(1)
            outputs = list(super().modify_tensors(index, name, bid))
            if len(outputs) != 1 or tuple(outputs[0][1].shape) != (codes.out_features, 1):
                raise NotExpressibleError(name, "the converter reshapes this tensor beyond a row permutation")
            new_name, permuted = outputs[0]
            rows = permuted[:, 0].long()
            plan.written[new_name] = encode(codes, rows)
            plan.gguf_names[name] = new_name
            yield new_name, permuted  # placeholder, replaced by our blocks in add_tensor

        def tensor_force_quant(self, name, new_name, bid, n_dims):
            if name in plan.encoded:
                return gguf.GGMLQuantizationType.F32  # placeholder only
            if name in plan.requantize:
                return gguf.GGMLQuantizationType[plan.requantize[name]]
            if name in plan.dense_types:
                return gguf.GGMLQuantizationType[plan.dense_types[name]]
            return super().tensor_force_quant(name, new_name, bid, n_dims)

        def set_gguf_parameters(self):
            super().set_gguf_parameters()
            metadata(self.gguf_writer)

        if pre_tokenizer is not None:

            def get_vocab_base_pre(self, tokenizer) -> str:
                return pre_tokenizer

    return SuperWeightExport


def _dense_types(dense_folder: Path, names: set[str], super_names: set[str], super_type: str, dense_type: str) -> dict[str, str]:
    """GGUF type of each dense 2-D tensor: ``auto`` = F16 where that is lossless, else F32."""
    from safetensors import safe_open

    types = {}
    with safe_open(str(dense_folder / "model.safetensors"), "pt") as handle:
        for key in handle.keys():
            if key in names:
                continue
            wanted = super_type if key.removesuffix(".weight") in super_names else dense_type
            if wanted != "auto":
                types[key] = _TYPES[wanted]
                continue
            tensor = handle.get_tensor(key)
            if tensor.dim() >= 2 and tensor.is_floating_point():
                types[key] = "F16" if exactly_representable(tensor, torch.float16) else "F32"
    return types


def _metadata(records: list, summary: dict[str, Any]) -> Callable[[Any], None]:
    def write(writer: Any) -> None:
        writer.add_uint32("superweight.version", 1)
        writer.add_uint32("superweight.count", len(records))
        if records:
            writer.add_array("superweight.modules", [sw.module for sw in records])
            writer.add_array("superweight.rows", [int(sw.row) for sw in records])
            writer.add_array("superweight.cols", [int(sw.col) for sw in records])
            writer.add_array("superweight.values", [float(sw.value) for sw in records])
        writer.add_string("superweight.encoding", json.dumps(summary, sort_keys=True))

    return write


def export_gguf(
    all_codes: list[ModuleCodes],
    dense_folder: Path,
    out: Path,
    *,
    records: list,
    allow_requantize: bool = False,
    super_weight_type: str = "auto",
    dense_type: str = "auto",
    requantize_type: str = "q8_0",
    llama_quantize: str | None = None,
    converter: str | os.PathLike[str] | None = None,
    pre_tokenizer: str | None = None,
) -> dict[str, Any]:
    """Write the GGUF file ``out``.

    Args:
        super_weight_type: Type of tensors holding super weights: ``"auto"`` (F16 where lossless, else F32: the
            super weight is never rounded), ``"f16"``, ``"f32"``, ``"q8_0"`` (rounding accepted explicitly).
        dense_type: Type of the other full-precision matrices (embeddings, untied output): same choices.
        requantize_type: With ``allow_requantize``, gguf-py re-quantizes layers no block type holds to this.
        llama_quantize: e.g. ``"Q4_K_M"``: llama.cpp then re-quantizes every tensor from our dequantized
            weights except the super-weight tensors (kept at ``super_weight_type``); needs llama-cpp-python.
        converter: llama.cpp source folder (default ``$OPTIMUM_SUPERWEIGHT_LLAMA_CPP``).
        pre_tokenizer: Override llama.cpp's pre-tokenizer name when its converter does not know the tokenizer.
    """
    for field_name, value in (("super_weight_type", super_weight_type), ("dense_type", dense_type)):
        if value != "auto" and value not in _TYPES:
            raise ValueError(f"{field_name}={value!r} is invalid: expected 'auto' or one of {sorted(_TYPES)}.")
    if requantize_type not in _TYPES:
        raise ValueError(f"requantize_type={requantize_type!r} is invalid: expected one of {sorted(_TYPES)}.")
    folder = find_converter(converter)
    conversion = _conversion_module(folder)
    gguf = _gguf()
    super_modules = {c.name for c in all_codes if c.num_super_weights}
    encoded, requantize = {}, {}
    for codes in all_codes:
        if codes.name in super_modules:
            continue
        key = f"{codes.name}.weight"
        if llama_quantize is not None:
            continue  # written dense (F32) and handed to llama.cpp's quantizer
        try:
            encoding_for(codes)
            encoded[key] = codes
        except NotExpressibleError:
            if not allow_requantize:
                raise
            requantize[key] = _TYPES[requantize_type]
    dense_types = _dense_types(dense_folder, set(encoded), super_modules, super_weight_type, "f32" if llama_quantize else dense_type)
    plan = _Plan(encoded, dense_types, requantize, {}, {})
    summary = {
        "encoded": len(encoded),
        "requantized": sorted(k.removesuffix(".weight") for k in requantize),
        "super_weight_tensors": sorted(super_modules),
        "llama_quantize": llama_quantize,
    }
    hparams = conversion.ModelBase.load_hparams(dense_folder, False)
    base = conversion.get_model_class(conversion.get_model_architecture(hparams, conversion.ModelType.TEXT))
    model_class = _exporting_class(base, plan, _metadata(records, summary), pre_tokenizer)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name: a failed export never leaves a file that looks complete.
    target = out.with_suffix(".partial.gguf" if llama_quantize is None else ".f32.gguf")
    try:
        with torch.inference_mode():
            model_class(dense_folder, gguf.LlamaFileType.ALL_F32, target, eager=True).write()
        if plan.written:
            raise RuntimeError(f"tensors {sorted(plan.written)} were encoded but never written; nothing was exported.")
        if llama_quantize is None:
            target.replace(out)
        else:
            keep = {plan.gguf_names[f"{n}.weight"]: dense_types.get(f"{n}.weight", "F32") for n in super_modules}
            _llama_quantize(target, out, llama_quantize, keep)
    finally:
        target.unlink(missing_ok=True)
    super_gguf = sorted(plan.gguf_names[f"{n}.weight"] for n in super_modules if f"{n}.weight" in plan.gguf_names)
    types = {plan.gguf_names[k]: enc.name for k, enc in ((k, encoding_for(c)) for k, c in encoded.items())}
    return {
        "format": "gguf",
        "path": str(out),
        "encoded": types,
        "super_weight_tensors": super_gguf,
        "requantized": summary["requantized"],
        "llama_quantize": llama_quantize,
    }


def _llama_quantize(source: Path, out: Path, ftype_name: str, keep: dict[str, str]) -> None:
    """llama.cpp's quantizer on ``source``, with the super-weight tensors pinned to their type."""
    import ctypes

    try:
        import llama_cpp
    except ImportError as error:
        raise ImportError("llama_quantize= needs llama-cpp-python: pip install 'optimum-superweight[llama-cpp]'") from error
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name.upper()}", None)
    if ftype is None:
        raise ValueError(f"llama_quantize={ftype_name!r} is invalid: expected a llama.cpp file type such as Q4_K_M, Q4_0, Q8_0.")
    gguf = _gguf()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    keep_gguf = dict(keep)
    overrides = (llama_cpp.llama_model_tensor_override * (len(keep_gguf) + 1))()
    patterns = []
    for i, (name, type_name) in enumerate(sorted(keep_gguf.items())):
        pattern = ("^" + name.replace(".", r"\.") + "$").encode()
        patterns.append(pattern)
        overrides[i].pattern = ctypes.c_char_p(pattern)
        overrides[i].type = int(gguf.GGMLQuantizationType[type_name])
    overrides[len(keep_gguf)].pattern = None
    params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if code != 0:
        raise RuntimeError(f"llama_model_quantize({ftype_name}) failed with code {code}.")
