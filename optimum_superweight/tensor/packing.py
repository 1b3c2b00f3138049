"""Bit packing of unsigned integer codes into bytes.

Layout: along the last dimension, every run of 8 codes becomes ``bits`` bytes, little-endian: code ``i`` of
the run occupies bits ``[bits*i, bits*(i+1))`` of the run's ``8*bits``-bit word. For 4 bits this is the
usual nibble layout (two codes per byte, the first in the low nibble); for 8 bits the bytes are the codes.
The layout is plain on purpose: kernels build their own layouts from it at load time.
"""

from __future__ import annotations

import torch

__all__ = ["pack_codes", "unpack_codes", "packed_size"]

_CODES_PER_RUN = 8


def packed_size(num_codes: int, bits: int) -> int:
    """Bytes needed for ``num_codes`` codes of ``bits`` bits (the last run padded to 8 codes below 8 bits)."""
    if bits == 8:
        return num_codes
    runs = -(-num_codes // _CODES_PER_RUN)
    return runs * bits


def _check_bits(bits: int) -> None:
    if bits not in (1, 2, 3, 4, 5, 6, 7, 8):
        raise ValueError(f"bits={bits!r} is invalid: packing supports 1 to 8 bits per code.")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``uint8`` codes ``[..., n]`` (each ``< 2**bits``) into ``uint8`` ``[..., packed_size(n, bits)]``.

    >>> pack_codes(torch.tensor([1, 2, 3, 4, 5, 6, 7, 8], dtype=torch.uint8), 4).tolist()
    [33, 67, 101, 135]
    """
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"pack_codes expects uint8 codes, got {codes.dtype}.")
    if bits == 8:
        return codes.contiguous()
    n = codes.shape[-1]
    pad = (-n) % _CODES_PER_RUN
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    runs = codes.reshape(*codes.shape[:-1], -1, _CODES_PER_RUN).to(torch.int64)
    shifts = torch.arange(_CODES_PER_RUN, device=codes.device, dtype=torch.int64) * bits
    words = (runs << shifts).sum(dim=-1, keepdim=True)  # codes don't overlap, so sum == bitwise or
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    packed = ((words >> byte_shifts) & 0xFF).to(torch.uint8)
    return packed.reshape(*codes.shape[:-1], -1)


def unpack_codes(packed: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``uint8`` ``[..., packed_size(num_codes, bits)]`` -> ``uint8`` ``[..., num_codes]``."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_codes expects uint8 bytes, got {packed.dtype}.")
    if packed.shape[-1] != packed_size(num_codes, bits):
        raise ValueError(
            f"Packed tensor has {packed.shape[-1]} bytes in its last dimension; {num_codes} codes of {bits} bits "
            f"need {packed_size(num_codes, bits)}."
        )
    if bits == 8:
        return packed[..., :num_codes]
    if bits == 4:
        # The common case gets a cheaper path than the generic word arithmetic.
        low = packed & 0x0F
        high = packed >> 4
        codes = torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], -1)
        return codes[..., :num_codes]
    runs = packed.reshape(*packed.shape[:-1], -1, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    words = (runs << byte_shifts).sum(dim=-1, keepdim=True)
    shifts = torch.arange(_CODES_PER_RUN, device=packed.device, dtype=torch.int64) * bits
    codes = ((words >> shifts) & ((1 << bits) - 1)).to(torch.uint8)
    return codes.reshape(*packed.shape[:-1], -1)[..., :num_codes]
