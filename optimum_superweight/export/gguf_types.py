"""Which llama.cpp type each GGUF tensor takes, the file's type label, and super weights carried inside blocks.

Three choices the GGUF writer (:mod:`.gguf`) delegates here:

- **Embeddings and output head** take the type llama.cpp's own quantizer (``llama-quantize``, Q4_K_M and
  the other 4-bit levels) gives them: the output head, or the token embeddings when they are tied to it,
  Q6_K when the row length is a multiple of 256 and Q8_0 otherwise; untied token embeddings Q4_K, or Q5_0
  when the row length is not a multiple of 256. The k-quants are written by llama.cpp's own quantizer
  (:mod:`.ggml_quants`, the ``libggml-base`` of the llama.cpp build), byte for byte what ``llama-quantize``
  writes; where that library is absent, gguf-py (which has no Q6_K / Q4_K quantizer) writes the next type up
  (Q8_0 / Q5_0) and :func:`embedding_type`'s reason says why.
- **The file type label** (``general.file_type``) names the type that holds most of the decoder layers'
  weights, as llama.cpp labels its own files (its Q4_K_M files hold Q6_K / Q8_0 embeddings too).
- **A super weight inside a quantized tensor** (:func:`carry_super_weights`): the tensor keeps its block type;
  the one block of 32 that holds the super weight is re-fitted so that the super weight is one of its levels,
  bit-exact, and its other 31 weights are rounded to the nearest level of that block (a super weight is
  hundreds of quantization steps away from its neighbours, so no 16-level grid holds both exactly). Every
  other block of the tensor stays our codes, unchanged. Where no block of the type can hold the value, the
  caller writes the tensor dense instead.

>>> embedding_type("output.weight", columns=576, has_output=True)
('Q8_0', "llama.cpp's quantizer picks Q8_0 for the output head when rows are not a multiple of 256 (576)")
>>> embedding_type("output.weight", columns=1536, has_output=True, k_quants=False)[0]
'Q8_0'
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["embedding_type", "file_type_label", "carry_super_weights", "CarriedSuperWeight", "EMBEDDING_TYPES", "K_QUANT_FALLBACK"]

_QK_K = 256  # super-block of llama.cpp's k-quants
_BLOCK = 32  # block of Q4_0 / Q4_1 / Q8_0
#: Types that ``embedding_type=`` may name explicitly; ``"auto"`` is llama.cpp's choice, ``"keep"`` the dense type.
EMBEDDING_TYPES = ("Q8_0", "Q6_K", "Q5_0", "Q5_1", "Q4_K", "Q4_1", "Q4_0", "F16", "BF16", "F32")
#: Types only llama.cpp's quantizer (:mod:`.ggml_quants`) writes -> what gguf-py writes in their place.
K_QUANT_FALLBACK = {"Q6_K": "Q8_0", "Q4_K": "Q5_0"}


def embedding_type(gguf_name: str, columns: int, has_output: bool, k_quants: bool | None = None) -> tuple[str, str]:
    """``(type, reason)`` for ``token_embd.weight`` / ``output.weight`` as llama.cpp's 4-bit levels choose it.

    ``k_quants``: whether llama.cpp's quantizer can write Q6_K / Q4_K here (default: whether
    :func:`.ggml_quants.available`); without it the gguf-py types of :data:`K_QUANT_FALLBACK` take their place.
    """
    if gguf_name == "output.weight" or (gguf_name == "token_embd.weight" and not has_output):
        role = "output head" if gguf_name == "output.weight" else "token embeddings (tied to the output head)"
        picked, fallback = "Q6_K", "Q8_0"
    elif gguf_name == "token_embd.weight":
        role, picked, fallback = "token embeddings", "Q4_K", "Q5_0"
    else:
        raise ValueError(f"gguf_name={gguf_name!r} is invalid: expected 'token_embd.weight' or 'output.weight'.")
    if columns % _QK_K:
        return fallback, f"llama.cpp's quantizer picks {fallback} for the {role} when rows are not a multiple of 256 ({columns})"
    missing = None
    if k_quants is None:
        from .ggml_quants import unavailable_reason

        missing = unavailable_reason()
    elif not k_quants:
        missing = "llama.cpp's quantizer is not used (k_quants=False)"
    if missing is None:
        return picked, f"llama.cpp's quantizer picks {picked} for the {role}; written by llama.cpp's own ggml_quantize_chunk"
    written = K_QUANT_FALLBACK[picked]
    return written, f"llama.cpp's quantizer picks {picked} for the {role}; {missing}, and gguf-py cannot write {picked}, so {written}"


def file_type_label(elements_by_type: dict[str, int]) -> str:
    """The ``LlamaFileType`` member name for the type that holds most elements of the decoder layers."""
    if not elements_by_type:
        return "ALL_F32"
    dominant = Counter(elements_by_type).most_common(1)[0][0]
    return {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16"}.get(dominant, f"MOSTLY_{dominant}")


@dataclass(frozen=True)
class CarriedSuperWeight:
    """One super weight written inside a re-fitted block: where, its exact value, what its neighbours became."""

    tensor: str
    row: int  # row in the GGUF tensor (after the converter's permutation)
    col: int
    value: float
    block_type: str
    neighbours_max_change: float  # largest |new - ours| over the block's other weights

    def as_dict(self) -> dict:
        return {"tensor": self.tensor, "row": self.row, "col": self.col, "value": self.value,
                "block_type": self.block_type, "neighbours_max_change": self.neighbours_max_change}


def _fp16(value: float) -> np.float16 | None:
    half = np.float16(value)
    return half if np.isfinite(half) else None


def _refit_q4_1(values: np.ndarray, at: int) -> tuple[np.float16, np.float16, np.ndarray] | None:
    """float16 ``(d, m)`` and codes with ``m + 15*d == values[at]`` exactly, the neighbours' squared error least.

    ``m`` = value - 15*d is exact in float16 for many ``d``: the candidates put the bottom level ``m`` between
    the neighbours' mean and their far end, each nudged a few float16 steps until ``m`` is exact.
    """
    target = float(np.float32(values[at]))
    others = np.delete(values, at).astype(np.float64)
    far = others.min() if target > others.mean() else others.max()
    best = None
    for bottom in np.linspace(others.mean(), far, 12):
        base = np.float16((target - bottom) / 15)
        for step in range(-6, 7):
            d = np.float16(base + step * np.spacing(base)) if np.isfinite(base) and base != 0 else None
            if d is None or not np.isfinite(d) or d == 0:
                continue
            m = target - 15 * float(d)
            if not np.isfinite(np.float16(m)) or float(np.float16(m)) != m:
                continue
            q = np.clip(np.rint((values - np.float32(m)) / np.float32(d)), 0, 15).astype(np.uint8)
            q[at] = 15
            back = q.astype(np.float32) * np.float32(d) + np.float32(np.float16(m))
            if back[at] != np.float32(values[at]):
                continue
            error = float(((back - values) ** 2).sum())
            if best is None or error < best[0]:
                best = (error, d, np.float16(m), q)
    return None if best is None else best[1:]


def _refit(block_type: str, values: np.ndarray, at: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Block bytes and dequantized values of a block of 32 whose element ``at`` is ``values[at]`` exactly."""
    target = np.float32(values[at])
    others = np.delete(values, at)
    if block_type == "Q4_1":  # w = d*q + m: the super weight is the top level, m + 15*d, and m the far end
        fitted = _refit_q4_1(values, at)
        if fitted is None:
            return None
        d, m, q = fitted
        back = q.astype(np.float32) * np.float32(d) + np.float32(m)
        head = np.array([d, m], dtype=np.float16).view(np.uint8)
        body = q[:16] | (q[16:] << 4)
    elif block_type == "Q4_0":  # w = d*(q - 8): the super weight is q = 0, d = -value/8 (exact: a power of two)
        d = _fp16(-target / 8)
        if d is None or np.float32(-8) * np.float32(d) != target:
            return None
        q = np.clip(np.rint(values / np.float32(d)) + 8, 0, 15).astype(np.uint8)
        q[at] = 0
        back = (q.astype(np.float32) - 8) * np.float32(d)
        head = np.array([d], dtype=np.float16).view(np.uint8)
        body = q[:16] | (q[16:] << 4)
    elif block_type == "Q8_0":  # w = d*q: the largest |q| <= 127 with d*q == value in float32
        for level in range(127, 63, -1):
            d = _fp16(target / level)
            if d is not None and np.float32(d) * np.float32(level) == target:
                break
        else:
            return None
        q = np.clip(np.rint(values / np.float32(d)), -127, 127).astype(np.int8)
        q[at] = level
        back = q.astype(np.float32) * np.float32(d)
        head = np.array([d], dtype=np.float16).view(np.uint8)
        body = q.view(np.uint8)
    else:
        return None
    if back[at] != target:
        return None
    return np.concatenate([head, body.astype(np.uint8)]), back


def carry_super_weights(
    tensor: str, block_type: str, data: np.ndarray, exact: np.ndarray, positions: list[tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray, list[CarriedSuperWeight]] | None:
    """Re-fit the blocks of ``data`` (uint8 ``[rows, bytes]`` of ``block_type``) that hold ``positions``.

    ``exact`` is the float32 ``[rows, cols]`` tensor the file must hold (super weights included).
    Returns the new bytes, the float32 tensor they dequantize to, and one record per super weight;
    ``None`` when some super weight fits no block of this type (the caller writes the tensor dense).
    """
    data, expected = data.copy(), exact.copy()
    per_block = data.shape[1] // (exact.shape[1] // _BLOCK)
    blocks: dict[tuple[int, int], list[int]] = {}
    for row, col in positions:
        blocks.setdefault((row, col // _BLOCK), []).append(col % _BLOCK)
    records = []
    for (row, block), ats in blocks.items():
        if len(ats) != 1:
            return None  # two super weights in one block of 32: no single level holds both
        at = ats[0]
        values = exact[row, block * _BLOCK : (block + 1) * _BLOCK].astype(np.float32)
        fitted = _refit(block_type, values, at)
        if fitted is None:
            return None
        raw, back = fitted
        data[row, block * per_block : (block + 1) * per_block] = raw
        expected[row, block * _BLOCK : (block + 1) * _BLOCK] = back
        change = float(np.abs(np.delete(back - values, at)).max())
        records.append(CarriedSuperWeight(tensor, row, block * _BLOCK + at, float(values[at]), block_type, change))
    return data, expected, records


def dense_type_for(values: torch.Tensor) -> str:
    """The smallest dense GGUF type that holds ``values`` bit-exactly: F16, then BF16, then F32."""
    values = values.detach().to(torch.float32)
    for dtype, name in ((torch.float16, "F16"), (torch.bfloat16, "BF16")):
        cast = values.to(dtype)
        if bool(torch.isfinite(cast).all()) and torch.equal(cast.to(torch.float32), values):
            return name
    return "F32"
