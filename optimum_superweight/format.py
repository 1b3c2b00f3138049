"""The checkpoint format: the one place that names, shapes and checks the tensors of a quantized layer.

Per quantized linear module ``<m>`` a checkpoint stores the tensors of :data:`TENSORS` (in this order),
each present under a condition of the layer's settings:

==========================  =========================  ===================  ============================
tensor                      dtype                      shape                present when
==========================  =========================  ===================  ============================
``<m>.weight``              uint8                      ``[out, groups, B]`` always (packed codes)
``<m>.weight_scale``        ``scale_dtype``            ``[out, groups]``    ``weight_format="affine"``
``<m>.weight_absmax``       float32, bfloat16 values   ``[blocks]``         ``weight_format="bnb-nf4"``
``<m>.weight_zero_point``   uint8, ``<= 2**bits - 1``  ``[out, groups]``    asymmetric, ``zero_point="uint8"``
``<m>.weight_offset``       ``scale_dtype``, finite    ``[out, groups]``    asymmetric, ``zero_point="float"``
``<m>.super_weight_indices`` int32, in the matrix       ``[k, 2]``           the module has k > 0 super weights
``<m>.super_weight_values`` float32, finite            ``[k]``              the module has k > 0 super weights
``<m>.bias``                the model's float dtype    ``[out]``            the original layer had one
``<m>.held_out_columns``    int32, sorted, distinct    ``[c]``              a packed embedding or head
``<m>.held_out_values``     the model's float dtype    ``[out, c]``         a packed embedding or head
==========================  =========================  ===================  ============================

With ``embedding_bits=8`` the input embeddings and the output head (``[vocab, hidden]``, one row per token) are
stored as 8-bit symmetric codes with one float32 scale per row (``bits=8``, ``group_size=-1``, ``symmetric``,
``scale_dtype="float32"``; :mod:`optimum_superweight.nn.embedding`), except the hidden channels of the super
activation (``super_activation_channels``): those columns hold the zero code and are stored exactly in
``held_out_values`` (``held_out_columns`` names them; ``c`` may be 0). ``held_out_values`` is the module's first
floating tensor, so ``model.dtype`` (transformers' first floating parameter) stays the model's dtype.

With ``weight_format="bnb-nf4"`` a layer is bitsandbytes' NF4 ``Linear4bit`` (:mod:`optimum_superweight.nn.nf4`):
``weight`` holds its packed codes as bitsandbytes lays them out, uint8 ``[ceil(out*in/2), 1]``, and
``weight_absmax`` its float32 absmax per block of 64 (``blocks = ceil(out*in/64)``), each a bfloat16 value
(what bitsandbytes' CPU kernel runs); a super weight holds code 7, whose NF4 level is exactly 0.

``B`` is :func:`optimum_superweight.tensor.packing.packed_size` of a group; every byte pattern of a packed
group decodes to codes inside the bit width's range, so ``weight`` needs no value check beyond its dtype
and shape. Held-out coordinates (the super weights) hold their group's zero code, so the packed matrix is
exactly 0 there; the kernels rely on it (they add the exact value as a sparse correction).

``config.json["quantization_config"]`` explains every tensor: ``bits``, ``group_size``, ``symmetric`` and
``scale_dtype`` fix the dtypes and shapes, ``super_weights`` lists exactly the entries of
``super_weight_indices``/``super_weight_values``, and ``digests`` holds one content digest per quantized
module (:func:`layer_digest`). ``digests`` is an additive field, not a layout change: checkpoints written
before it existed load with every other check, and the safetensors header metadata of a checkpoint written
with digests says so (:data:`DIGESTS_METADATA_KEY`), so removing them from config.json alone is an error.

To add a variant (say float offsets instead of integer zero-points), add a row to :data:`TENSORS` with its
presence condition, dtype, shape, the config field that explains it and a value check, and a field to
:class:`LayerFormat`; the loader, the verifier and the digest pick it up from the table.

>>> fmt = LayerFormat(out_features=64, in_features=128, bits=4, group_size=32, symmetric=False, num_super_weights=1)
>>> [(s.name, s.shape) for s in fmt.tensors()]  # doctest: +NORMALIZE_WHITESPACE
[('weight', (64, 4, 16)), ('weight_scale', (64, 4)), ('weight_zero_point', (64, 4)),
 ('super_weight_indices', (1, 2)), ('super_weight_values', (1,))]
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .tensor.nf4 import NF4_ZERO_CODE, bf16_exact, nf4_blocks, nf4_code_at, nf4_packed_shape
from .tensor.packing import unpack_codes
from .tensor.quantize import GroupLayout

__all__ = [
    "FORMAT_VERSION",
    "DIGEST_ALGORITHM",
    "WEIGHT",
    "SCALE",
    "ABSMAX",
    "ZERO_POINT",
    "OFFSET",
    "DIGESTS_METADATA_KEY",
    "read_safetensors_metadata",
    "SUPER_WEIGHT_INDICES",
    "SUPER_WEIGHT_VALUES",
    "BIAS",
    "HELD_OUT_COLUMNS",
    "HELD_OUT_VALUES",
    "EMBEDDING_FORMAT",
    "SCALE_DTYPES",
    "TENSORS",
    "QUANTIZED_ONLY",
    "CheckpointFormatError",
    "TensorSpec",
    "LayerFormat",
    "StoredTensor",
    "read_safetensors_index",
    "safetensors_dtype_name",
    "layer_digest",
    "DIGEST_ALGORITHMS",
    "digest_mismatch",
    "check_layer_stored",
    "check_layer_values",
    "check_held_out_codes",
    "check_quantizable",
]

#: Version of the on-disk tensor layout; a checkpoint written by a newer layout is refused with an upgrade hint.
FORMAT_VERSION = 2
#: The layouts this version reads.
READABLE_VERSIONS = (1, 2)
#: safetensors header metadata key naming the digest algorithm of a checkpoint written with digests.
DIGESTS_METADATA_KEY = "optimum_superweight_digests"
#: The per-module content digest written (prefix of every digest string in config.json). A checksum, not a
#: signature: it catches tensors that are valid but not the ones written (swapped, rescaled, edited); whoever can
#: rewrite the tensors can rewrite config.json too, so a cryptographic hash would buy nothing and cost ~3x the
#: time (see benchmarks/RESULTS.md). Readers accept every name of ``DIGEST_ALGORITHMS``.
DIGEST_ALGORITHM = "crc32"

WEIGHT = "weight"
SCALE = "weight_scale"
ABSMAX = "weight_absmax"
ZERO_POINT = "weight_zero_point"
OFFSET = "weight_offset"
SUPER_WEIGHT_INDICES = "super_weight_indices"
SUPER_WEIGHT_VALUES = "super_weight_values"
BIAS = "bias"
HELD_OUT_COLUMNS = "held_out_columns"
HELD_OUT_VALUES = "held_out_values"
#: The grid of a packed embedding or head (``embedding_bits=8``): 8-bit symmetric codes, one float32 scale per row.
EMBEDDING_FORMAT = {"bits": 8, "group_size": -1, "symmetric": True, "scale_dtype": "float32"}

#: ``scale_dtype`` names and the torch dtype each stores.
SCALE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# safetensors header dtype names.
_ST_DTYPES = {
    torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
    torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64", torch.bool: "BOOL",
}
_FLOAT_ST = ("F16", "BF16", "F32", "F64")
#: Largest safetensors JSON header read (the format itself caps it at 100 MB).
SAFETENSORS_HEADER_CAP = 100 * 2**20


class CheckpointFormatError(ValueError):
    """A checkpoint whose tensors disagree with the format or with its config.json."""


@dataclass(frozen=True)
class LayerFormat:
    """The settings that fix one quantized layer's tensors.

    >>> LayerFormat(64, 128, bits=8, group_size=-1, symmetric=True).layout.packed_shape
    (64, 1, 128)
    """

    out_features: int
    in_features: int
    bits: int
    group_size: int
    symmetric: bool
    scale_dtype: str = "float16"
    num_super_weights: int = 0
    bias: bool = False
    #: Asymmetric offset storage: ``"uint8"`` integer zero-points (``w = s*(q - z)``) or ``"float"`` offsets
    #: (``w = s*q + m``, tensor ``weight_offset``), see the quality branch's ``SuperWeightConfig.zero_point``.
    zero_point: str = "uint8"
    #: ``"affine"`` (this package's groups) or ``"bnb-nf4"`` (bitsandbytes' NF4 layer), see ``SuperWeightConfig``.
    weight_format: str = "affine"
    #: A packed embedding or head (``embedding_bits=8``): how many columns are stored exactly; ``None`` otherwise.
    held_out_columns: int | None = None

    @property
    def nf4(self) -> bool:
        return self.weight_format == "bnb-nf4"

    @property
    def layout(self) -> GroupLayout:
        return GroupLayout(self.out_features, self.in_features, self.bits, self.group_size)

    @property
    def max_code(self) -> int:
        return 2**self.bits - 1

    def tensors(self) -> list["TensorSpec"]:
        """The tensors this layer stores, in the table's order."""
        return [spec.bind(self) for spec in TENSORS if spec.present(self)]

    @classmethod
    def of_module(cls, module: Any) -> "LayerFormat":
        """The format of a :class:`~optimum_superweight.nn.linear.SuperWeightLinear`."""
        return cls(
            out_features=module.out_features, in_features=module.in_features, bits=module.bits,
            group_size=module.group_size, symmetric=module.symmetric, scale_dtype=module.scale_dtype,
            num_super_weights=module.num_super_weights, bias=module.bias is not None,
            zero_point=getattr(module, "zero_point", None) or "uint8",
            weight_format=getattr(module, "weight_format", "affine"),
            held_out_columns=getattr(module, "num_held_out_columns", None),
        )


@dataclass(frozen=True)
class TensorSpec:
    """One row of the format table.

    ``dtype`` is ``None`` for a tensor stored in the model's float dtype (the bias). ``field`` names the
    config.json field that says whether (and how) the tensor is there, for error messages. ``check`` returns
    a description of the first bad value, or ``None``.
    """

    name: str
    present: Callable[[LayerFormat], bool]
    dtype_of: Callable[[LayerFormat], torch.dtype | None]
    shape_of: Callable[[LayerFormat], tuple[int, ...]]
    field: str
    check: Callable[[LayerFormat, torch.Tensor], str | None] | None = None
    dtype: torch.dtype | None = None
    shape: tuple[int, ...] = ()

    def bind(self, fmt: LayerFormat) -> "TensorSpec":
        return TensorSpec(
            self.name, self.present, self.dtype_of, self.shape_of, self.field, self.check,
            dtype=self.dtype_of(fmt), shape=tuple(self.shape_of(fmt)),
        )

    def dtype_label(self) -> str:
        return "a float dtype" if self.dtype is None else str(self.dtype).removeprefix("torch.")

    def accepts_stored_dtype(self, stored: str) -> bool:
        """Whether a safetensors dtype name (``"U8"``, ``"F16"``, ...) is this tensor's."""
        return stored in _FLOAT_ST if self.dtype is None else stored == _ST_DTYPES.get(self.dtype)


def _first(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0].tolist())


def _check_scale(fmt: LayerFormat, scale: torch.Tensor) -> str | None:
    values = scale.detach().to(torch.float32)
    bad = ~torch.isfinite(values) | (values <= 0)
    if bool(bad.any()):
        at = _first(bad)
        return f"holds {values[at].item()!r} at {list(at)}; accepted are finite scales > 0"
    return None


def _check_absmax(fmt: LayerFormat, absmax: torch.Tensor) -> str | None:
    bad = ~torch.isfinite(absmax) | (absmax < 0) | (bf16_exact(absmax) != absmax)
    if bool(bad.any()):
        at = _first(bad)
        return f"holds {absmax[at].item()!r} at {list(at)}; accepted are finite bfloat16 values >= 0 (stored as float32)"
    return None


def _check_zero_point(fmt: LayerFormat, zero: torch.Tensor) -> str | None:
    bad = zero.to(torch.int32) > fmt.max_code
    if bool(bad.any()):
        at = _first(bad)
        return f"holds {int(zero[at])} at {list(at)}; accepted are codes 0..{fmt.max_code} for bits={fmt.bits}"
    return None


def _check_indices(fmt: LayerFormat, indices: torch.Tensor) -> str | None:
    idx = indices.to(torch.int64)
    rows_ok = (idx[:, 0] >= 0) & (idx[:, 0] < fmt.out_features)
    cols_ok = (idx[:, 1] >= 0) & (idx[:, 1] < fmt.in_features)
    bad = ~(rows_ok & cols_ok)
    if bool(bad.any()):
        i = _first(bad)[0]
        return (
            f"entry #{i} ({int(idx[i, 0])}, {int(idx[i, 1])}) is outside the {fmt.out_features}x{fmt.in_features} "
            "matrix"
        )
    pairs = [tuple(p) for p in idx.tolist()]
    if len(set(pairs)) != len(pairs):
        return f"repeats a coordinate ({pairs})"
    return None


def _check_finite(fmt: LayerFormat, tensor: torch.Tensor) -> str | None:
    bad = ~torch.isfinite(tensor.detach().to(torch.float32))
    if bool(bad.any()):
        at = _first(bad)
        return f"holds {tensor[at].item()!r} at {list(at)}; accepted are finite values"
    return None


def _check_columns(fmt: LayerFormat, columns: torch.Tensor) -> str | None:
    values = [int(c) for c in columns.tolist()]
    if any(not 0 <= c < fmt.in_features for c in values):
        return f"holds {values} outside the {fmt.in_features} hidden channels"
    if values != sorted(set(values)):
        return f"holds {values}; accepted are distinct channels in increasing order"
    return None


#: The format table (see the module docstring); rows in storage and digest order.
TENSORS: tuple[TensorSpec, ...] = (
    TensorSpec(WEIGHT, lambda f: True, lambda f: torch.uint8,
               lambda f: nf4_packed_shape(f.out_features, f.in_features) if f.nf4 else f.layout.packed_shape,
               "bits/group_size/weight_format"),
    TensorSpec(SCALE, lambda f: not f.nf4, lambda f: SCALE_DTYPES[f.scale_dtype], lambda f: f.layout.scale_shape,
               "scale_dtype", _check_scale),
    TensorSpec(ABSMAX, lambda f: f.nf4, lambda f: torch.float32,
               lambda f: (nf4_blocks(f.out_features * f.in_features, f.group_size),), "weight_format", _check_absmax),
    TensorSpec(ZERO_POINT, lambda f: not f.symmetric and f.zero_point == "uint8", lambda f: torch.uint8,
               lambda f: f.layout.scale_shape, "symmetric", _check_zero_point),
    TensorSpec(OFFSET, lambda f: not f.symmetric and f.zero_point == "float", lambda f: SCALE_DTYPES[f.scale_dtype],
               lambda f: f.layout.scale_shape, "zero_point", _check_finite),
    TensorSpec(SUPER_WEIGHT_INDICES, lambda f: f.num_super_weights > 0, lambda f: torch.int32,
               lambda f: (f.num_super_weights, 2), "super_weights", _check_indices),
    TensorSpec(SUPER_WEIGHT_VALUES, lambda f: f.num_super_weights > 0, lambda f: torch.float32,
               lambda f: (f.num_super_weights,), "super_weights", _check_finite),
    TensorSpec(BIAS, lambda f: f.bias, lambda f: None, lambda f: (f.out_features,), "the model's own config",
               _check_finite),
    TensorSpec(HELD_OUT_COLUMNS, lambda f: f.held_out_columns is not None, lambda f: torch.int32,
               lambda f: (f.held_out_columns,), "embedding_bits/super_activation_channels", _check_columns),
    TensorSpec(HELD_OUT_VALUES, lambda f: f.held_out_columns is not None, lambda f: None,
               lambda f: (f.out_features, f.held_out_columns), "embedding_bits/super_activation_channels", _check_finite),
)
#: Tensor names that only a quantized layer stores (a dense layer has ``weight`` and ``bias`` too).
QUANTIZED_ONLY: frozenset[str] = frozenset(s.name for s in TENSORS) - {WEIGHT, BIAS}


# -- the stored side: safetensors headers --------------------------------------------------------------
@dataclass(frozen=True)
class StoredTensor:
    """Where a checkpoint tensor lives and what its header says (read without loading any data)."""

    file: str
    dtype: str  # safetensors name: "U8", "F16", ...
    shape: tuple[int, ...]


def safetensors_dtype_name(dtype: torch.dtype) -> str:
    """The safetensors header name of a torch dtype (``torch.uint8`` -> ``"U8"``)."""
    return _ST_DTYPES.get(dtype, str(dtype))


def _read_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        if not 0 < size <= SAFETENSORS_HEADER_CAP:
            raise CheckpointFormatError(f"{path} is not a safetensors file (header size {size}).")
        try:
            header = json.loads(handle.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointFormatError(f"{path} has a corrupt safetensors header ({error}).") from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path} has a corrupt safetensors header.")
    return header


def read_safetensors_metadata(files: Iterable[str | Path]) -> dict[str, dict[str, Any]]:
    """The ``__metadata__`` of each safetensors file's header, by file."""
    return {str(f): dict(_read_header(Path(f)).get("__metadata__") or {}) for f in files}


def read_safetensors_index(files: Iterable[str | Path]) -> dict[str, StoredTensor]:
    """Every tensor of the given safetensors files by name, from their JSON headers only.

    A name stored in two files is an error (a shard left over from another save).
    """
    index: dict[str, StoredTensor] = {}
    for file in files:
        path = Path(file)
        for key, entry in _read_header(path).items():
            if key == "__metadata__":
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list):
                raise CheckpointFormatError(f"{path}: the header entry of '{key}' is malformed.")
            if key in index:
                raise CheckpointFormatError(
                    f"Tensor '{key}' is stored twice, in {index[key].file} and {path}: the checkpoint mixes shards of "
                    "different saves. Re-save it with save_pretrained."
                )
            index[key] = StoredTensor(str(path), str(entry.get("dtype")), tuple(int(d) for d in entry["shape"]))
    return index


def check_layer_stored(module: str, fmt: LayerFormat, stored: Mapping[str, StoredTensor | None]) -> None:
    """Check one quantized layer's stored tensors (name -> header entry) against its format.

    Every tensor the format requires must be there with its dtype and shape, and every stored tensor must be
    one the format requires; the error names the module, the tensor and the config field.

    >>> fmt = LayerFormat(8, 16, bits=4, group_size=8, symmetric=True)
    >>> check_layer_stored("m", fmt, {"weight": StoredTensor("f", "U8", (8, 2, 4)), "weight_scale": StoredTensor("f", "F32", (8, 2))})
    Traceback (most recent call last):
    ...
    optimum_superweight.format.CheckpointFormatError: m.weight_scale is stored as F32 [8, 2], but config.json (scale_dtype='float16', ...) requires float16 [8, 2]; the checkpoint's config.json and tensors disagree.
    """
    expected = {spec.name: spec for spec in fmt.tensors()}
    settings = _settings(fmt)
    for name, spec in expected.items():
        entry = stored.get(name)
        if entry is None:
            raise CheckpointFormatError(
                f"{module}.{name} is missing from the checkpoint, but config.json ({spec.field}; {settings}) requires "
                f"it; the checkpoint is incomplete or its config.json was edited."
            )
        if not spec.accepts_stored_dtype(entry.dtype) or tuple(entry.shape) != spec.shape:
            raise CheckpointFormatError(
                f"{module}.{name} is stored as {entry.dtype} {list(entry.shape)}, but config.json ({settings}) "
                f"requires {spec.dtype_label()} {list(spec.shape)}; the checkpoint's config.json and tensors disagree."
            )
    for name in stored:
        if name not in expected:
            raise CheckpointFormatError(f"{module}.{name} is in the checkpoint, but {_unexplained(name, fmt)}.")


def _settings(fmt: LayerFormat) -> str:
    if fmt.nf4:
        return f"weight_format='bnb-nf4', {fmt.num_super_weights} super weight(s) in super_weights"
    return (
        f"scale_dtype={fmt.scale_dtype!r}, bits={fmt.bits}, group_size={fmt.group_size}, symmetric={fmt.symmetric}, "
        f"{fmt.num_super_weights} super weight(s) in super_weights"
    )


def _unexplained(name: str, fmt: LayerFormat) -> str:
    if name == ZERO_POINT:
        return (
            f"config.json says symmetric={fmt.symmetric}, zero_point={fmt.zero_point!r} (no integer zero-points): its "
            "fields 'symmetric'/'zero_point' disagree with the tensors"
        )
    if name == OFFSET:
        return (
            f"config.json says symmetric={fmt.symmetric}, zero_point={fmt.zero_point!r} (no float offsets): its fields "
            "'symmetric'/'zero_point' disagree with the tensors"
        )
    if name in (SCALE, ABSMAX):
        return (
            f"config.json says weight_format={fmt.weight_format!r}, which stores {ABSMAX if fmt.nf4 else SCALE} instead: "
            "its field 'weight_format' disagrees with the tensors"
        )
    if name in (SUPER_WEIGHT_INDICES, SUPER_WEIGHT_VALUES):
        return (
            "config.json's field 'super_weights' lists no super weight for this module: the list was emptied, "
            "removed or moved, while the tensors still hold them"
        )
    if name == BIAS:
        return "the model's config builds this layer without a bias"
    if name in (HELD_OUT_COLUMNS, HELD_OUT_VALUES):
        return "config.json's field 'embedding_bits' does not pack this module (it is a linear layer of the usual format)"
    return "no field of config.json explains such a tensor (unexpected tensor; the checkpoint was altered)"


def check_layer_values(
    module: str, fmt: LayerFormat, tensors: Mapping[str, torch.Tensor | None], *, held_out_codes: bool = True
) -> None:
    """Value checks of one quantized layer's loaded tensors (dtypes and shapes already checked).

    Scales finite and > 0, zero-points within the code range, super-weight indices inside the matrix and
    distinct, exact values and bias finite, and the packed code at each super weight equal to its group's zero code.
    """
    for spec in fmt.tensors():
        tensor = tensors.get(spec.name)
        if tensor is None or spec.check is None:
            continue
        problem = spec.check(fmt, tensor)
        if problem:
            raise CheckpointFormatError(f"{module}.{spec.name} {problem}; the checkpoint is corrupt.")
    if held_out_codes:
        check_held_out_codes(module, fmt, tensors)


def check_held_out_codes(module: str, fmt: LayerFormat, tensors: Mapping[str, torch.Tensor | None]) -> None:
    """The packed code at every super weight (and in every held-out column of a packed embedding) is its group's zero
    code (the matrix is exactly 0 there)."""
    if fmt.held_out_columns:
        columns = tensors[HELD_OUT_COLUMNS].to(torch.int64)
        bad = tensors[WEIGHT][:, 0, columns] != 2 ** (fmt.bits - 1)  # 8-bit codes are stored one per byte
        if bool(bad.any()):
            row, i = _first(bad)
            raise CheckpointFormatError(
                f"{module}.{WEIGHT} holds code {int(tensors[WEIGHT][row, 0, columns[i]])} at row {row} of held-out column "
                f"{int(columns[i])}, where the format stores the zero code {2 ** (fmt.bits - 1)}: the held-out columns "
                "or the packed weight were altered."
            )
    if fmt.nf4 and fmt.num_super_weights:
        indices = tensors[SUPER_WEIGHT_INDICES].to(torch.int64)
        codes = nf4_code_at(tensors[WEIGHT], indices[:, 0] * fmt.in_features + indices[:, 1])
        bad = codes != NF4_ZERO_CODE
        if bool(bad.any()):
            i = _first(bad)[0]
            raise CheckpointFormatError(
                f"{module}.{WEIGHT} holds NF4 code {int(codes[i])} at super weight #{i} ({int(indices[i, 0])}, "
                f"{int(indices[i, 1])}), where the format stores code {NF4_ZERO_CODE} (level 0): the super weight "
                "indices or the packed weight were altered."
            )
        return
    if not fmt.num_super_weights or (not fmt.symmetric and fmt.zero_point != "uint8"):
        return  # float offsets have no exact zero code: the kernels correct the decoded value instead
    group = fmt.layout.effective_group_size
    packed, zero = tensors[WEIGHT], tensors.get(ZERO_POINT)
    for i, (row, col) in enumerate(tensors[SUPER_WEIGHT_INDICES].to(torch.int64).tolist()):
        g = col // group
        code = int(unpack_codes(packed[row, g], fmt.bits, group)[col % group])
        zero_code = 2 ** (fmt.bits - 1) if fmt.symmetric else int(zero[row, g])
        if code != zero_code:
            raise CheckpointFormatError(
                f"{module}.{WEIGHT} holds code {code} at super weight #{i} ({row}, {col}), where the format stores the "
                f"group's zero code {zero_code}: the super weight indices or the packed weight were altered."
            )


# -- content digest ---------------------------------------------------------------------------------------
class _Crc32:
    """zlib's CRC-32 behind hashlib's update/hexdigest interface (several GB/s, also on CPUs without SHA units)."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: Any) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


#: Digest algorithms a checkpoint may name (``"<name>:<hex>"``); :data:`DIGEST_ALGORITHM` is the one written.
DIGEST_ALGORITHMS: dict[str, Callable[[], Any]] = {"sha256-128": hashlib.sha256, "crc32": _Crc32}


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).cpu().numpy())


def layer_digest(tensors: Mapping[str, torch.Tensor | None], algorithm: str = DIGEST_ALGORITHM) -> str:
    """Content digest of one quantized layer: ``"<algorithm>:<hex>-<hex>..."``, one part per stored tensor in table
    order, each over the tensor's name, dtype, shape and bytes (so a mismatch names the tensor).

    >>> layer_digest({"weight": torch.zeros(2, 1, 4, dtype=torch.uint8)}, "crc32")
    'crc32:d45525f7'
    """
    if algorithm not in DIGEST_ALGORITHMS:
        raise CheckpointFormatError(
            f"Digest algorithm {algorithm!r} is unknown: accepted are {', '.join(DIGEST_ALGORITHMS)}."
        )
    parts = []
    for spec in TENSORS:
        tensor = tensors.get(spec.name)
        if tensor is None:
            continue
        h = DIGEST_ALGORITHMS[algorithm]()
        h.update(f"{spec.name}|{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}|".encode())
        h.update(_tensor_bytes(tensor))
        parts.append(h.hexdigest()[:32])
    return f"{algorithm}:{'-'.join(parts)}"


def digest_mismatch(tensors: Mapping[str, torch.Tensor | None], recorded: str) -> list[str]:
    """The names of the stored tensors whose part of ``recorded`` (a :func:`layer_digest`) differs; [] if none.

    >>> t = {"weight": torch.zeros(2, 1, 4, dtype=torch.uint8), "weight_scale": torch.ones(2, 1)}
    >>> d = layer_digest(t, "crc32"); t["weight_scale"] = t["weight_scale"] * 2
    >>> digest_mismatch(t, d)
    ['weight_scale']
    """
    algorithm = recorded.partition(":")[0]
    found = layer_digest(tensors, algorithm).partition(":")[2].split("-")
    expected = recorded.partition(":")[2].split("-")
    names = [spec.name for spec in TENSORS if tensors.get(spec.name) is not None]
    if len(found) != len(expected):
        return names
    return [name for name, a, b in zip(names, found, expected) if a != b]


# -- what can be quantized ------------------------------------------------------------------------------------
def check_quantizable(
    module: str,
    weight: torch.Tensor,
    holdout: Iterable[tuple[int, int]] = (),
    *,
    bits: int | None = None,
    group_size: int | None = None,
    symmetric: bool = True,
    scale_dtype: str = "float16",
) -> None:
    """Refuse a weight ``[out, in]`` the format cannot hold: non-finite values, or a group whose scale overflows
    ``scale_dtype``. Held-out coordinates (kept exact) only need to be finite. ``bits=None`` checks finiteness only.

    >>> w = torch.zeros(4, 8); w[1, 2] = 1e30
    >>> check_quantizable("m", w, bits=4, group_size=8)
    Traceback (most recent call last):
    ...
    optimum_superweight.format.CheckpointFormatError: m.weight[1, 2] = 1e+30 needs a scale of 1.4e+29 for bits=4, more than scale_dtype='float16' holds (max 65504). Quantize with scale_dtype='float32' (or 'bfloat16'), keep the module in full precision (modules_to_not_convert), or fix the weight.
    """
    w = weight.detach()
    finite = torch.isfinite(w)
    if not bool(finite.all()):
        row, col = _first(~finite)
        raise CheckpointFormatError(
            f"{module}.weight[{row}, {col}] = {w[row, col].item()!r}: the model to quantize holds non-finite weights, "
            "which no quantized format represents. Fix the checkpoint (or keep the module in full precision with "
            "modules_to_not_convert)."
        )
    if bits is None:
        return
    limit = torch.finfo(SCALE_DTYPES[scale_dtype]).max
    magnitude = w.abs().to(torch.float32)
    held = list(holdout)
    if held:
        magnitude = magnitude.clone()
        for row, col in held:
            magnitude[row, col] = 0.0
    # symmetric: absmax / qmax; asymmetric: (max - min) / qmax <= 2 * absmax / qmax: a safe bound per element.
    qmax = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1
    factor = 1.0 if symmetric else 2.0
    peak = float(magnitude.max()) if magnitude.numel() else 0.0
    if peak * factor / qmax <= limit:
        return
    # Exact per-group check before refusing (the bound above is loose for asymmetric groups).
    layout = GroupLayout(w.shape[0], w.shape[1], bits, -1 if group_size is None else group_size)
    group = layout.effective_group_size
    values = torch.nn.functional.pad(w.to(torch.float64), (0, layout.num_groups * group - w.shape[1]))
    values = values.reshape(w.shape[0], layout.num_groups, group)
    # Held-out (and zero) entries never set a scale: min/max are clamped around 0 anyway.
    mask = torch.nn.functional.pad(magnitude == 0.0, (0, layout.num_groups * group - w.shape[1]), value=True)
    mask = mask.reshape_as(values)
    if symmetric:
        needed = torch.where(mask, 0.0, values.abs()).amax(-1) / qmax
    else:
        hi = torch.where(mask, -math.inf, values).amax(-1).clamp(min=0)
        lo = torch.where(mask, math.inf, values).amin(-1).clamp(max=0)
        needed = (hi - lo) / qmax
    if not bool((needed > limit).any()):
        return
    r, g = _first(needed > limit)
    cols = slice(g * group, min((g + 1) * group, w.shape[1]))
    local = torch.where(mask[r, g, : cols.stop - cols.start], 0.0, values[r, g, : cols.stop - cols.start].abs())
    col = cols.start + int(local.argmax())
    raise CheckpointFormatError(
        f"{module}.weight[{r}, {col}] = {w[r, col].item():.6g} needs a scale of {float(needed[r, g]):.2g} for "
        f"bits={bits}, more than scale_dtype={scale_dtype!r} holds (max {limit:.6g}). Quantize with "
        "scale_dtype='float32' (or 'bfloat16'), keep the module in full precision (modules_to_not_convert), or fix "
        "the weight."
    )
