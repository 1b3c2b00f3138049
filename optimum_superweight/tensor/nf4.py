"""NF4 codes in bitsandbytes' own layout, super weights held out, each block's absmax chosen for the output.

bitsandbytes' NF4 (``quant_type="nf4"``) flattens a weight ``[out, in]`` row-major into blocks of ``blocksize``
values; each block stores one float32 ``absmax`` and each value the index (0..15) of the nearest level of
:data:`NF4_LEVELS` to ``value / absmax``, two indices per byte (the even element in the high nibble). This module
writes exactly that layout (:func:`nf4_codes`), so ``bitsandbytes.functional.dequantize_4bit`` and its CPU and CUDA
matmuls read it unchanged, with two differences in how the numbers are chosen:

- **held-out coordinates** (the super weights) take no part in their block's absmax and hold code
  :data:`NF4_ZERO_CODE`, whose level is exactly 0: the matrix is 0 there and the layer adds the exact value back;
- **each block's absmax is searched**: among the block's absmax times the factors of ``grid`` (rounded to
  bfloat16, see :func:`bf16_exact`), the one with the smallest ``sum importance[col] * (w - dequantized)^2``,
  ``importance`` being each input channel's mean squared activation on calibration text (``None``: plain squared
  error). ``grid=None`` keeps the plain absmax (still rounded to bfloat16).

Every absmax is a bfloat16 value stored in float32: bitsandbytes' CPU kernel converts absmax to bfloat16 when it
repacks a layer for inference, so only such values make the running layer and the stored state identical (and the
repacking's inverse, which runs before every save, bit-exact).

>>> w = torch.randn(8, 128)
>>> packed, absmax = nf4_codes(w, holdout=torch.tensor([[2, 5]]))
>>> packed.shape, absmax.shape, float(nf4_dequantize(packed, absmax, (8, 128))[2, 5])
(torch.Size([512, 1]), torch.Size([16]), 0.0)
"""

from __future__ import annotations

import torch

__all__ = [
    "NF4_LEVELS",
    "NF4_ZERO_CODE",
    "NF4_BLOCKSIZE",
    "DEFAULT_ABSMAX_GRID",
    "nf4_codes",
    "nf4_dequantize",
    "nf4_code_at",
    "nf4_packed_shape",
    "nf4_blocks",
    "bf16_exact",
]

#: bitsandbytes' NF4 levels (``bitsandbytes.functional.get_4bit_type("nf4")``; equal, checked in the tests).
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
#: The code whose level is exactly 0: what a held-out coordinate stores.
NF4_ZERO_CODE = 7
#: The one block size of this form (bitsandbytes' default; its CPU kernels are checked with it).
NF4_BLOCKSIZE = 64
#: Factors of each block's plain absmax searched by default (1.00, 0.98, ..., 0.70).
DEFAULT_ABSMAX_GRID: tuple[float, ...] = tuple(round(1.0 - 0.02 * i, 2) for i in range(16))
_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
#: Elements per chunk of the search (bounds its temporaries to a few hundred MB on any layer).
_CHUNK = 1 << 20


def nf4_blocks(numel: int, blocksize: int = NF4_BLOCKSIZE) -> int:
    """Number of absmax values of a weight with ``numel`` elements (the last block may be shorter)."""
    return -(-numel // blocksize)


def nf4_packed_shape(out_features: int, in_features: int) -> tuple[int, int]:
    """Shape of the packed codes, as ``bitsandbytes.functional.quantize_4bit`` returns them: ``[ceil(n/2), 1]``."""
    return (-(-(out_features * in_features) // 2), 1)


def bf16_exact(values: torch.Tensor) -> torch.Tensor:
    """``values`` rounded to the nearest bfloat16, as float32 (unchanged by a later cast to bfloat16 and back)."""
    return values.to(torch.bfloat16).to(torch.float32)


def _nearest(scaled: torch.Tensor) -> torch.Tensor:
    # searchsorted(midpoints, v) == bucketize(v, midpoints) (bitsandbytes' own rule; ties go down), ~2x faster.
    return torch.searchsorted(_MIDPOINTS.to(scaled.device), scaled.clamp_(-1, 1))


def _search(
    blocks: torch.Tensor, weights: torch.Tensor | None, base: torch.Tensor, grid: tuple[float, ...]
) -> torch.Tensor:
    """Per block (rows of ``blocks``), the candidate absmax ``bf16(base * f)`` with the smallest weighted error."""
    levels = NF4_LEVELS.to(blocks.device)
    best = bf16_exact(base)
    best_err = torch.full_like(base, float("inf"))
    for factor in grid:
        absmax = bf16_exact(base * factor)
        safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(1)
        err = blocks - levels[_nearest(blocks / safe)].mul_(safe)
        err = (err.square_().mul_(weights) if weights is not None else err.square_()).sum(1)
        better = err < best_err
        best = torch.where(better, absmax, best)
        best_err = torch.where(better, err, best_err)
    return best


def nf4_codes(
    weight: torch.Tensor,
    holdout: torch.Tensor | None = None,
    importance: torch.Tensor | None = None,
    grid: tuple[float, ...] | None = DEFAULT_ABSMAX_GRID,
    blocksize: int = NF4_BLOCKSIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 codes of ``weight`` ``[out, in]`` in bitsandbytes' layout: ``(packed uint8 [ceil(n/2), 1], absmax float32
    [blocks])``. ``holdout``: ``[k, 2]`` (row, col) kept out of the absmax, code :data:`NF4_ZERO_CODE`;
    ``importance``: ``[in]`` weights of each input channel's squared error in the search; ``grid``: absmax factors
    searched per block (``None``: the plain absmax). See the module docstring.

    >>> packed, absmax = nf4_codes(torch.ones(2, 64), grid=None)
    >>> absmax.tolist(), int(packed[0, 0])
    ([1.0, 1.0], 255)
    """
    out_features, in_features = weight.shape
    flat = weight.detach().to(torch.float32).reshape(-1).clone()
    held = None
    if holdout is not None and holdout.numel():
        held = holdout[:, 0].long() * in_features + holdout[:, 1].long()
        flat[held] = 0.0  # out of the absmax and of the search; code 7 (level 0) below
    n = flat.numel()
    blocks = nf4_blocks(n, blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - n)).reshape(blocks, blocksize)
    base = padded.abs().amax(1)
    if grid is None:
        absmax = bf16_exact(base)
    else:
        weights = None
        if importance is not None:
            per_element = importance.to(torch.float32).reshape(1, -1).expand(out_features, -1).reshape(-1)
            weights = torch.nn.functional.pad(per_element, (0, blocks * blocksize - n)).reshape(blocks, blocksize)
        step = max(1, _CHUNK // blocksize)
        absmax = torch.cat([
            _search(padded[i:i + step], None if weights is None else weights[i:i + step], base[i:i + step], grid)
            for i in range(0, blocks, step)
        ])
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(1)
    codes = _nearest(padded / safe).reshape(-1)[:n]
    if held is not None:
        codes[held] = NF4_ZERO_CODE
    if n % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    codes = codes.to(torch.uint8)
    packed = ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)
    return packed, absmax


def _unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    flat = packed.reshape(-1)
    codes = torch.empty(flat.numel() * 2, dtype=torch.long, device=flat.device)
    codes[0::2] = (flat >> 4).long()
    codes[1::2] = (flat & 0xF).long()
    return codes[:numel]


def nf4_dequantize(
    packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int], blocksize: int = NF4_BLOCKSIZE,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The dense weight ``level[code] * absmax[block]`` (float32 products, as bitsandbytes computes them), no super
    weights added back.

    >>> packed, absmax = nf4_codes(torch.ones(2, 64), grid=None)
    >>> nf4_dequantize(packed, absmax, (2, 64)).unique().tolist()
    [1.0]
    """
    n = shape[0] * shape[1]
    values = NF4_LEVELS.to(packed.device)[_unpack(packed, n)]
    blocks = nf4_blocks(n, blocksize)
    values = torch.nn.functional.pad(values, (0, blocks * blocksize - n)).reshape(blocks, blocksize)
    return (values * absmax.to(torch.float32).unsqueeze(1)).reshape(-1)[:n].reshape(shape).to(dtype)


def nf4_code_at(packed: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """The codes (0..15) at the given row-major element indices of the packed matrix."""
    byte = packed.reshape(-1)[flat_index // 2].long()
    return torch.where(flat_index % 2 == 0, byte >> 4, byte & 0xF)
