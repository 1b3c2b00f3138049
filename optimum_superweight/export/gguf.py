"""Export to GGUF for llama.cpp: tensor names, layout and tokenizer from llama.cpp's own converter, codes from us.

llama.cpp's ``convert_hf_to_gguf.py`` (its ``conversion`` package, loaded at run time from a llama.cpp checkout:
nothing of it is copied here) reads the dense twin of the checkpoint (see :mod:`.source`) and does names, the
q/k row permutation, hyper-parameters and the tokenizer. A subclass of its model class intercepts each of our
quantized weights: the converter's own ``modify_tensors`` runs on a column of row numbers, which yields the GGUF
name and the row permutation, and the tensor is written from our codes, permuted the same way, as the
llama.cpp block type that holds them exactly (:data:`ENCODINGS`). Every written block is dequantized again with
gguf-py and compared with our weights; a mismatch is an error.

A layer that holds super weights keeps its block type: the block of 32 around each super weight is re-fitted
so that the super weight is exact (:mod:`.gguf_types`); ``super_weight_type`` writes such layers dense instead.
Token embeddings and output head take the type llama.cpp's quantizer gives them (the k-quants written by
llama.cpp's own quantizer, :mod:`.ggml_quants`), and ``general.file_type``
names the type of most layer weights. The super weights' coordinates go to the metadata under ``superweight.*``.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..progress import progress_bar, routed_tqdm
from . import ggml_quants
from .codes import ModuleCodes, exactly_representable
from .errors import NotExpressibleError, require
from .gguf_types import EMBEDDING_TYPES, K_QUANT_FALLBACK, CarriedSuperWeight, carry_super_weights, dense_type_for, file_type_label
from .gguf_types import embedding_type as llama_cpp_embedding_type

__all__ = ["export_gguf", "ENCODINGS", "GGUFEncoding", "encode", "find_converter", "CONVERTER_ENV", "SUPER_WEIGHT_TYPES"]

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


def encode(codes: ModuleCodes, rows: torch.Tensor | None = None, *, carry: bool = False) -> tuple[np.ndarray, str, list[CarriedSuperWeight]]:
    """Our codes as llama.cpp blocks, verified by gguf-py's dequantize: ``(bytes, type name, carried)``.

    With ``carry``, a layer's super weights are written exactly inside re-fitted blocks
    (:func:`.gguf_types.carry_super_weights`; :class:`NotExpressibleError` where no block holds one); every
    other block must dequantize bit-exactly to our weights.
    """
    gguf = _gguf()
    rows = torch.arange(codes.out_features) if rows is None else rows
    encoding = encoding_for(codes)
    data = encoding.encode(codes, rows)
    exact = codes.dequantize()[rows].numpy()
    expected, carried = exact, []
    if codes.num_super_weights:
        if not carry:
            raise NotExpressibleError(codes.name, "holds super weights: carry them (carry=True) or write the tensor dense")
        where = torch.empty_like(rows)
        where[rows] = torch.arange(len(rows))  # GGUF row of each of our rows
        positions = [(int(where[r]), int(c)) for r, c in codes.super_indices.tolist()]
        fitted = carry_super_weights(codes.name, encoding.name, data, exact, positions)
        if fitted is None:
            raise NotExpressibleError(codes.name, f"no {encoding.name} block holds its super weight exactly")
        data, expected, carried = fitted
        if any(expected[r, c] != exact[r, c] for r, c in positions):
            raise RuntimeError(f"{codes.name}: a carried super weight is not exact; nothing was written.")
    qtype = gguf.GGMLQuantizationType[encoding.name]
    back = gguf.quants.dequantize(data, qtype)
    if not np.array_equal(back, expected):
        raise RuntimeError(f"{codes.name}: {encoding.name} blocks do not dequantize to our weights; nothing was written.")
    return data, encoding.name, carried


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
#: ``super_weight_type`` choices: ``block`` (the layer keeps its block type; see :func:`.gguf_types.carry_super_weights`),
#: ``auto`` (dense, the smallest type that holds the layer exactly: F16, BF16, then F32) or a dense type.
SUPER_WEIGHT_TYPES = ("block", "auto", *_TYPES)
_EMBEDDINGS = ("token_embd.weight", "output.weight")


@dataclass
class _Plan:
    encoded: dict[str, ModuleCodes]  # HF tensor name -> codes written from our blocks
    carried: set[str]  # HF tensor names whose super weights ride in re-fitted blocks
    dense_types: dict[str, str]  # HF tensor name -> forced GGUF type
    requantize: dict[str, str]  # HF tensor name -> type gguf-py re-quantizes it to (on request)
    embedding_type: str  # "auto" (llama.cpp's choice), "keep" (dense_types) or a type name
    shapes: dict[str, tuple[int, ...]]  # HF tensor name -> shape, for every tensor of the dense twin
    label: str  # LlamaFileType member written as general.file_type
    written: dict[str, tuple[np.ndarray, str]] = field(default_factory=dict)  # GGUF name -> our bytes
    gguf_names: dict[str, str] = field(default_factory=dict)  # HF tensor name -> GGUF name
    carried_records: list[CarriedSuperWeight] = field(default_factory=list)
    embeddings: dict[str, dict[str, Any]] = field(default_factory=dict)  # GGUF name -> type and error
    has_output: bool = True


def _quantize_embedding(plan: _Plan, new_name: str, data: torch.Tensor) -> None:
    """Quantize ``token_embd`` / ``output`` (k-quants with llama.cpp's quantizer, others with gguf-py), recording the rounding."""
    gguf = _gguf()
    if plan.embedding_type == "auto":
        type_name, reason = llama_cpp_embedding_type(new_name, int(data.shape[-1]), plan.has_output)
    else:
        type_name, reason = plan.embedding_type, "requested"
    values = data.to(torch.float32).numpy().reshape(-1, data.shape[-1])
    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name in K_QUANT_FALLBACK:
        raw, quantizer = ggml_quants.quantize(values, type_name), "llama.cpp (ggml_quantize_chunk)"
    else:
        raw, quantizer = gguf.quants.quantize(values, qtype), "gguf-py"
    worst = total = 0.0
    for begin in range(0, len(values), 8192):  # in slices: a 150k-row vocabulary dequantized whole takes GBs
        error = np.abs(gguf.quants.dequantize(raw[begin : begin + 8192], qtype).reshape(-1, values.shape[1]) - values[begin : begin + 8192])
        worst, total = max(worst, float(error.max())), total + float(error.sum(dtype=np.float64))
    plan.written[new_name] = (raw, type_name)
    plan.embeddings[new_name] = {"type": type_name, "reason": reason, "quantizer": quantizer, "exact": worst == 0,
                                 "max_abs_error": worst, "mean_abs_error": total / max(values.size, 1)}


def _exporting_class(base: type, plan: _Plan, metadata: Callable[[Any], None], pre_tokenizer: str | None) -> type:
    gguf = _gguf()

    class SuperWeightExport(base):  # type: ignore[misc, valid-type]
        model_arch = base.model_arch  # the converter checks each subclass declares it

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            writer = self.gguf_writer
            add_tensor, add_file_type = writer.add_tensor, writer.add_file_type

            def add_ours(name: str, tensor: Any, *a: Any, raw_dtype: Any = None, **kw: Any) -> None:
                if name in plan.written:
                    data, type_name = plan.written.pop(name)
                    return add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[type_name])
                return add_tensor(name, tensor, *a, raw_dtype=raw_dtype, **kw)

            writer.add_tensor = add_ours
            write_tensors = writer.write_tensors_to_file

            def write_tensors_to_file(*, progress: bool = False) -> None:
                # gguf-py's own "Writing" bar (bytes), made by `from tqdm import tqdm` at the call: under our switches.
                with routed_tqdm(importlib.import_module("tqdm")):
                    write_tensors(progress=progress)

            writer.write_tensors_to_file = write_tensors_to_file
            # The converter writes every tensor as F32 placeholders: label the file by what it holds.
            writer.add_file_type = lambda ftype: add_file_type(int(gguf.LlamaFileType[plan.label]))
            plan.has_output = any(self._gguf_name(key) == "output.weight" for key in plan.shapes)

        def get_tensors(self):
            # The converter reads, converts and (for our layers) encodes each tensor as it is drawn from here.
            total = len(getattr(self, "model_tensors", ())) or None
            with progress_bar(total=total, desc="GGUF export: converting tensors", unit="tensor") as bar:
                for item in super().get_tensors():
                    yield item
                    bar.update()

        def _gguf_name(self, key: str) -> str | None:
            try:
                return self.map_tensor_name(key)
            except ValueError:
                return None

        def modify_tensors(self, data_torch, name, bid):
            codes = plan.encoded.get(name)
            if codes is None:
                for new_name, data in super().modify_tensors(data_torch, name, bid):
                    plan.gguf_names[name] = new_name
                    if new_name in _EMBEDDINGS and plan.embedding_type != "keep":
                        _quantize_embedding(plan, new_name, data)
                    yield new_name, data
                return
            # The converter's own name mapping and row permutation, run on a column of row numbers.
            index = torch.arange(codes.out_features, dtype=torch.float32).unsqueeze(1)
            outputs = list(super().modify_tensors(index, name, bid))
            if len(outputs) != 1 or tuple(outputs[0][1].shape) != (codes.out_features, 1):
                raise NotExpressibleError(name, "the converter reshapes this tensor beyond a row permutation")
            new_name, permuted = outputs[0]
            rows = permuted[:, 0].long()
            data, type_name, carried = encode(codes, rows, carry=name in plan.carried)
            plan.written[new_name] = (data, type_name)
            plan.carried_records.extend(replace(record, tensor=new_name) for record in carried)
            plan.gguf_names[name] = new_name
            yield new_name, permuted  # placeholder, replaced by our blocks in add_tensor

        def tensor_force_quant(self, name, new_name, bid, n_dims):
            if new_name in plan.written:
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


def _dense_types(dense_folder: Path, skip: set[str], super_names: set[str], super_type: str, dense_type: str) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """GGUF type of each dense 2-D tensor (``auto``: the smallest that holds it exactly), and every tensor's shape."""
    from safetensors import safe_open

    types, shapes = {}, {}
    with safe_open(str(dense_folder / "model.safetensors"), "pt") as handle:
        for key in handle.keys():
            shapes[key] = tuple(handle.get_slice(key).get_shape())
            if key in skip:
                continue
            wanted = super_type if key.removesuffix(".weight") in super_names else dense_type
            if wanted not in ("auto", "block"):
                types[key] = _TYPES[wanted]
                continue
            tensor = handle.get_tensor(key)
            if tensor.dim() >= 2 and tensor.is_floating_point():
                types[key] = dense_type_for(tensor)
    return types, shapes


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


def _check_options(super_weight_type: str, dense_type: str, requantize_type: str, embedding_type: str) -> str:
    """Validate the type options; returns ``embedding_type`` normalised (``auto``, ``keep`` or a type name)."""
    if super_weight_type not in SUPER_WEIGHT_TYPES:
        raise ValueError(f"super_weight_type={super_weight_type!r} is invalid: expected one of {list(SUPER_WEIGHT_TYPES)}.")
    if dense_type != "auto" and dense_type not in _TYPES:
        raise ValueError(f"dense_type={dense_type!r} is invalid: expected 'auto' or one of {sorted(_TYPES)}.")
    if requantize_type not in _TYPES:
        raise ValueError(f"requantize_type={requantize_type!r} is invalid: expected one of {sorted(_TYPES)}.")
    if embedding_type in ("auto", "keep"):
        return embedding_type
    if embedding_type.upper() not in EMBEDDING_TYPES:
        raise ValueError(f"embedding_type={embedding_type!r} is invalid: expected 'auto', 'keep' or one of {list(EMBEDDING_TYPES)}.")
    if embedding_type.upper() in K_QUANT_FALLBACK and (missing := ggml_quants.unavailable_reason()):
        raise ggml_quants.GGMLUnavailableError(f"embedding_type={embedding_type!r} needs llama.cpp's quantizer: {missing}.")
    return embedding_type.upper()


def _plan(all_codes: list[ModuleCodes], dense_folder: Path, *, allow_requantize: bool, super_weight_type: str, dense_type: str,
          requantize_type: str, embedding_type: str, llama_quantize: str | None) -> _Plan:
    """Which layer is written from our blocks, which is carried, re-quantized or dense, and the file's label."""
    encoded, carried, requantize, dense_super = {}, set(), {}, set()
    elements: Counter[str] = Counter()
    for codes in all_codes:
        key = f"{codes.name}.weight"
        if llama_quantize is not None:
            if codes.num_super_weights:
                dense_super.add(codes.name)
            continue  # written dense (F32) and handed to llama.cpp's quantizer
        if codes.num_super_weights:
            if super_weight_type != "block" or not _carries(codes):
                dense_super.add(codes.name)
                continue
            carried.add(key)
        try:
            elements[encoding_for(codes).name] += codes.out_features * codes.in_features
            encoded[key] = codes
        except NotExpressibleError:
            if not allow_requantize:
                raise
            requantize[key] = _TYPES[requantize_type]
            elements[requantize[key]] += codes.out_features * codes.in_features
    dense_types, shapes = _dense_types(dense_folder, set(encoded), dense_super, super_weight_type,
                                       "f32" if llama_quantize else dense_type)
    for name in dense_super:
        elements[dense_types.get(f"{name}.weight", "F32")] += int(np.prod(shapes[f"{name}.weight"]))
    return _Plan(encoded, carried, dense_types, requantize, "keep" if llama_quantize else embedding_type, shapes,
                 file_type_label(dict(elements)))


def _carries(codes: ModuleCodes) -> bool:
    try:
        encode(codes, carry=True)
        return True
    except NotExpressibleError as error:
        logger.info("%s: written dense (%s)", codes.name, error.what)
        return False


def _file_summary(out: Path) -> dict[str, Any]:
    """Tensor count per type, size and bits per weight of the written file, read back with gguf-py."""
    gguf = _gguf()
    reader = gguf.GGUFReader(out)
    count: Counter[str] = Counter()
    elements = payload = 0
    for tensor in reader.tensors:
        count[tensor.tensor_type.name] += 1
        elements += int(tensor.n_elements)
        payload += int(tensor.n_bytes)
    label = gguf.LlamaFileType(int(reader.fields["general.file_type"].parts[-1][0])).name
    return {"file_type": label, "tensor_types": dict(sorted(count.items())), "size_bytes": out.stat().st_size,
            "bits_per_weight": round(8 * payload / max(elements, 1), 3)}


def export_gguf(
    all_codes: list[ModuleCodes],
    dense_folder: Path,
    out: Path,
    *,
    records: list,
    allow_requantize: bool = False,
    super_weight_type: str = "block",
    embedding_type: str = "auto",
    dense_type: str = "auto",
    requantize_type: str = "q8_0",
    llama_quantize: str | None = None,
    converter: str | os.PathLike[str] | None = None,
    pre_tokenizer: str | None = None,
) -> dict[str, Any]:
    """Write the GGUF file ``out``.

    Args:
        super_weight_type: How a layer holding super weights is written: ``"block"`` (its block type, the
            super weight exact inside a re-fitted block of 32 whose other 31 weights are rounded to that
            block's levels; dense where no block holds it), ``"auto"`` (dense, the smallest of F16 / BF16 /
            F32 that holds the layer exactly), ``"f16"``, ``"bf16"``, ``"f32"``, ``"q8_0"`` (rounding accepted).
        embedding_type: Token embeddings and output head: ``"auto"`` (the type llama.cpp's quantizer gives
            them at 4-bit levels, see :func:`.gguf_types.embedding_type`), ``"keep"`` (dense, as
            ``dense_type``) or a type of :data:`.gguf_types.EMBEDDING_TYPES`.
        dense_type: Type of the other full-precision matrices: same choices as ``super_weight_type`` but ``block``.
        requantize_type: With ``allow_requantize``, gguf-py re-quantizes layers no block type holds to this.
        llama_quantize: e.g. ``"Q4_K_M"``: llama.cpp then re-quantizes every tensor from our dequantized
            weights except the super-weight tensors (kept dense); needs llama-cpp-python.
        converter: llama.cpp source folder (default ``$OPTIMUM_SUPERWEIGHT_LLAMA_CPP``).
        pre_tokenizer: Override llama.cpp's pre-tokenizer name when its converter does not know the tokenizer.

    >>> export_gguf(codes, dense, Path("m.gguf"), records=records)["file_type"]  # doctest: +SKIP
    'MOSTLY_Q4_1'
    """
    embedding_type = _check_options(super_weight_type, dense_type, requantize_type, embedding_type)
    folder = find_converter(converter)
    conversion = _conversion_module(folder)
    gguf = _gguf()
    plan = _plan(all_codes, dense_folder, allow_requantize=allow_requantize, super_weight_type=super_weight_type,
                 dense_type=dense_type, requantize_type=requantize_type, embedding_type=embedding_type,
                 llama_quantize=llama_quantize)
    super_modules = sorted(c.name for c in all_codes if c.num_super_weights)
    dense_super = [n for n in super_modules if f"{n}.weight" not in plan.carried]
    summary = {"encoded": len(plan.encoded), "requantized": sorted(k.removesuffix(".weight") for k in plan.requantize),
               "super_weight_tensors": super_modules, "dense_super_weight_tensors": dense_super,
               "llama_quantize": llama_quantize}
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
        missing = sorted((set(plan.encoded) | set(plan.requantize) | {f"{n}.weight" for n in super_modules}) - set(plan.gguf_names))
        if missing:
            raise RuntimeError(f"tensors {missing} never reached the converter; nothing was exported.")
        if llama_quantize is None:
            target.replace(out)
        else:
            keep = {plan.gguf_names[f"{n}.weight"]: plan.dense_types.get(f"{n}.weight", "F32") for n in super_modules}
            _llama_quantize(target, out, llama_quantize, keep)
    finally:
        target.unlink(missing_ok=True)
    gguf_name = plan.gguf_names.get
    return {
        "format": "gguf",
        "path": str(out),
        **_file_summary(out),
        "encoded": {gguf_name(k, k): encoding_for(c).name for k, c in plan.encoded.items()},
        "embeddings": plan.embeddings,
        "super_weight_tensors": sorted(gguf_name(f"{n}.weight", n) for n in super_modules),
        "dense_super_weight_tensors": {gguf_name(f"{n}.weight", n): plan.dense_types.get(f"{n}.weight", "F32") for n in dense_super},
        "carried_super_weights": [record.as_dict() for record in plan.carried_records],
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
