"""``cpu-tiled``: 2- to 8-bit weights decoded tile by tile in native code, each multiplied while in cache (or,
for a few tokens per call, row by row in registers).

The prefill kernel (and much of the decode) of the default format (4-bit codes with scales and float offsets, uint8 zero-points or
symmetric codes; any group size, per-channel included; super weights held out), and of 2-, 3- and 8-bit
codes. The C++ extension
(``csrc/tiled_linear.cpp``, built at first use by :mod:`~optimum_superweight.kernels.build`) walks the
output rows in tiles: it decodes a tile's codes into a buffer in the activation dtype in one pass (a 4-bit
group has 16 distinct values, computed as the reference dequantization computes them, then looked up per
code with AVX-512 permutes; 2- and 3-bit codes likewise after a shuffle and shift extract them; 8-bit codes
are converted and scaled 16 at a time), writes the tile's super weights at their exact value, and multiplies the
whole token block by the tile (``at::mm_out``: oneDNN for bfloat16) into the tile's output columns. Tiles
run in parallel over torch's threads.

The decoded weights are bit-identical to ``module.dequantize_weight(dtype)`` (super weights included), so
the output equals the reference kernel's up to GEMM summation order; the tests check both. This replaces
the eager ``cpu-dense`` path (several full-size passes and temporaries per call) and, for bfloat16 input, the
per-token int8 kernel and (from :data:`INT4_TOKENS` + 1 tokens) the int4 kernel; float32 and float16 inputs
take it at any token count (exact float32 arithmetic, unlike the reference kernel without a full dequantization per call).

**Few tokens** (fewer than :data:`MIN_TOKENS` per call, decode; up to :data:`BYTE_TOKENS` for 5- to 8-bit
codes, whose tiles cost the most to decode): no tile is written. Each output row is
decoded in registers, 32 weights at a time, to the float32 values the reference computes (the same lookup
and conversion as above), and multiplied with every token at once, accumulating in float32: bfloat16 inputs
with bfloat16 dot products (``vdpbf16ps``, the weights rounded to bfloat16 as the reference rounds them; on
CPUs without it, as float32), float16 and float32 inputs with float32 fused multiply-adds (activations
converted to float32 once per call). Held-out super weights add ``x[:, col] * (value - decoded)`` to their
row, so they count at their exact value. Results equal the reference's up to summation order. For bfloat16
input this path also serves 5- to 8-bit layers with one scale per row (faster than ``cpu-int8`` at every
token count measured) and, from :data:`INT4_TOKENS` + 1 tokens, the layers ``cpu-int4`` takes (2- to 4-bit
codes, groups of a multiple of 32); calls of at most :data:`INT4_TOKENS` tokens stay on ``cpu-int4``.
Speed against bfloat16 dense: the "Kernels by CPU" table of benchmarks/RESULTS.md.

Without AVX-512 (the library then decodes with scalar code) or when the build fails, the kernel reports
itself unsupported with the reason and the dispatcher falls back to the other kernels.

5-, 6- and 7-bit codes have no packed decoder: they are unpacked to one byte each when the layer is prepared
and take the 8-bit decoder (the same arithmetic as the reference, so the same weights).

Memory: the layer's state holds float32 copies of the scales and zero-points or offsets (a quarter of a
4-bit group-64 packed weight) and references the packed codes (5- to 7-bit layers: a one-byte-per-code
copy); each thread keeps one decode buffer of about :data:`_TILE_BYTES`, reused across calls and layers.

>>> import torch
>>> from optimum_superweight.nn.linear import SuperWeightLinear
>>> layer = SuperWeightLinear.from_linear(torch.nn.Linear(128, 64), bits=4, group_size=64)
>>> TiledCpuKernel().unsupported(layer, torch.bfloat16, torch.device("cpu"), tokens=1)
'1 tokens per call (<= 4: cpu-int4 is faster)'
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..tensor.packing import unpack_codes
from . import build
from .cpu import Int4CpuKernel

__all__ = ["TiledCpuKernel", "MIN_TOKENS", "INT4_TOKENS", "BYTE_TOKENS", "tile_rows", "unavailable"]

_SOURCE = "tiled_linear"
#: Calls of fewer tokens multiply in registers instead of decoding tiles (no tile write: faster up to 11 tokens
#: for 2- to 4-bit codes on SmolLM2 and 1B-class layer shapes).
MIN_TOKENS = 12
#: ... and up to this many for byte codes (5- to 8-bit; measured faster than tiles up to 16 on those shapes;
#: at most the library's ``small_tokens()``).
BYTE_TOKENS = 16
#: bfloat16 calls of at most this many tokens go to ``cpu-int4`` where it takes the layer (it reads half a byte
#: per weight: faster there; from 5 tokens the register path is as fast or faster).
INT4_TOKENS = 4
#: Decoded weights per tile, in bytes: large tiles keep the GEMM efficient, and a tile still fits the
#: last-level cache (measured best at 2-8 MiB on AMD EPYC).
_TILE_BYTES = 4 << 20
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_BITS = (2, 3, 4, 5, 6, 7, 8)
#: Widths the library has no packed decoder for: their codes are unpacked to bytes once and run as 8-bit codes.
_BYTE_CODE_BITS = (5, 6, 7)


def tile_rows(out_features: int, in_features: int, element_size: int, threads: int) -> int:
    """Output rows per tile: about :data:`_TILE_BYTES` of decoded weights, a multiple of 16, and at least
    one tile per thread.

    >>> tile_rows(2048, 8192, 2, 1), tile_rows(576, 1536, 2, 1), tile_rows(576, 1536, 2, 2)
    (256, 576, 288)
    """
    rows = max(16, _TILE_BYTES // max(1, in_features * element_size) // 16 * 16)
    if threads > 1:
        rows = min(rows, -(-out_features // threads))
    return max(1, min(rows, out_features))


#: What the library's decoder needs (``/proc/cpuinfo`` flags): without them it is not built at all (its scalar
#: decoder would lose to ``cpu-dense``, and compiling it takes about a minute).
CPU_FEATURES = ("avx512f", "avx512bw")


def _library():
    return build.load(_SOURCE, requires=CPU_FEATURES)


def unavailable() -> str | None:
    """Why ``cpu-tiled`` cannot run on this machine (build failed or disabled, no AVX-512), or ``None``; the first
    call builds the library if needed."""
    library = _library()
    if library is None:
        return build.native_failure(_SOURCE)
    if not library.vectorized():
        return "the native library was built without AVX-512 (its scalar decoder is slower than cpu-dense)"
    return None


@dataclass
class TiledState:
    codes: torch.Tensor  # uint8 [out, groups, bytes per group], contiguous
    scale: torch.Tensor  # float32 [out, groups]
    zero: torch.Tensor  # float32 [out, groups] zero codes (empty with float offsets)
    offset: torch.Tensor  # float32 [out, groups] float offsets (empty otherwise)
    rows: torch.Tensor  # int64 [k] super weights
    cols: torch.Tensor  # int64 [k]
    values: torch.Tensor  # float32 [k]
    group: int
    bits: int


def _int4_takes(module: nn.Module, dtype: torch.dtype, device: torch.device, tokens: int) -> bool:
    """Whether ``cpu-int4`` runs this layer (then it keeps calls of up to :data:`INT4_TOKENS` tokens)."""
    return Int4CpuKernel().unsupported(module, dtype, device, tokens) is None


class TiledCpuKernel:
    """Native tile-by-tile dequantize + GEMM for 2- to 8-bit codes (see the module docstring)."""

    name = "cpu-tiled"

    def unsupported(self, module: nn.Module, dtype: torch.dtype, device: torch.device, tokens: int) -> str | None:
        if device.type != "cpu":
            return f"device {device.type}"
        if dtype not in _DTYPES:
            return f"{dtype} input"
        if module.bits not in _BITS:
            return f"bits={module.bits} (needs one of {', '.join(map(str, _BITS))})"
        if dtype == torch.bfloat16 and tokens <= INT4_TOKENS and _int4_takes(module, dtype, device, tokens):
            return f"{tokens} tokens per call (<= {INT4_TOKENS}: cpu-int4 is faster)"
        return unavailable()

    def prepare(self, module: nn.Module, device: torch.device, dtype: torch.dtype) -> TiledState:
        empty = torch.empty(0, dtype=torch.float32)
        scale = module.weight_scale.detach().to(torch.float32).contiguous()
        offset = getattr(module, "weight_offset", None)
        if offset is not None:
            zero, offset = empty, offset.detach().to(torch.float32).contiguous()
        elif module.symmetric:
            zero, offset = torch.full_like(scale, float(2 ** (module.bits - 1))), empty
        else:
            zero, offset = module.weight_zero_point.detach().to(torch.float32).contiguous(), empty
        indices = module.super_weight_indices
        if indices is None or indices.numel() == 0:
            rows = cols = torch.empty(0, dtype=torch.int64)
            values = empty
        else:
            rows, cols = indices.detach()[:, 0].long().contiguous(), indices.detach()[:, 1].long().contiguous()
            values = module.super_weight_values.detach().to(torch.float32).contiguous()
        codes, bits, group = module.weight.detach().contiguous(), module.bits, module.layout.effective_group_size
        if bits in _BYTE_CODE_BITS:
            codes, bits = unpack_codes(codes, bits, group).contiguous(), 8
        return TiledState(codes, scale, zero, offset, rows, cols, values, group, bits)

    def run(self, module: nn.Module, state: TiledState, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        bias = module.bias
        # Added inside the GEMM as F.linear adds it (before rounding), unless its gradient is wanted.
        tracked = bias is not None and bias.requires_grad and torch.is_grad_enabled()
        native_bias = None if bias is None or tracked else bias.detach().to(x2.dtype).contiguous()
        weights = (state.codes, state.scale, state.zero, state.offset, state.rows, state.cols, state.values)
        if 0 < x2.shape[0] <= (BYTE_TOKENS if state.bits == 8 else MIN_TOKENS - 1):
            y = _library().small_linear(x2, *weights, native_bias, state.group, state.bits)
        else:
            tile = tile_rows(module.out_features, module.in_features, x2.element_size(), torch.get_num_threads())
            y = _library().tiled_linear(x2, *weights, native_bias, state.group, state.bits, tile)
        if tracked:
            y = y + bias.to(y.dtype)
        return y.reshape(*shape[:-1], module.out_features)  # super weights are in (tiles) or added (registers)

    def dequantize(self, module: nn.Module, state: TiledState, dtype: torch.dtype) -> torch.Tensor:
        """The dense weight as this kernel decodes it (tests compare it bit for bit with the reference)."""
        return _library().dequantize(
            state.codes, state.scale, state.zero, state.offset, state.rows, state.cols, state.values, state.group,
            state.bits, module.in_features, dtype,
        )
