"""Fast CPU kernels for :class:`~optimum_superweight.nn.linear.SuperWeightLinear`.

Three paths, all built from the plain packed format at first use (the layouts are cached on the module,
never saved, and rebuilt when the packed weight, its scales or the device change):

``cpu-int4``
    torch's ``aten._weight_int4pack_mm_for_cpu`` for 1- to 4-bit codes (every code fits a nibble), any
    group size that is a multiple of 32 (the kernel takes 32/64/128/256; a larger group, ``-1`` included,
    repeats its scale over several kernel groups), ``out_features % 16 == 0``. The kernel computes
    ``w = (q - 8) * scale + zero`` per group. Symmetric codes (``w = s*(q - 2^(b-1))``) and asymmetric codes
    of up to 3 bits (``w = s*(q - z)``, ``|q - z| <= 7``) are re-centred to ``q - z + 8`` with ``zero = 0``;
    4-bit asymmetric codes keep ``q`` with ``zero = s*(8 - z)``; float offsets (``w = s*q + m``) become
    ``q - 2^(b-1) + 8`` with ``zero = m + 2^(b-1)*s``. A ragged last group (``in_features`` not a multiple of the group) is stored padded
    with zero codes; the input is zero-padded to match. Scales and zeros are bfloat16 in the kernel.
``cpu-int8``
    ``torch._weight_int8pack_mm`` for 5- to 8-bit codes with one scale per row (``group_size=-1`` or a
    single group): ``w = s * (q - c) + s * (c - z)`` with ``c = 2^(b-1)``; the second term (asymmetric
    only) is a rank-1 correction ``rowsum(x) * s*(c - z)`` (``s*c + m`` with a float offset ``m``). ``in_features`` is zero-padded to a multiple of
    32 (the kernel crashes on other sizes).
``cpu-dense``
    For many tokens at once (prefill) the two kernels above cost time linear in the token count while a
    dense bfloat16 GEMM is nearly flat, so past ``dense_threshold`` tokens the weight is dequantized in the
    activation dtype (from the packed codes, no cached dense copy) and multiplied densely.

Super weights are added after the matmul as a sparse correction ``y[..., row] += x[..., col] * value``
(their codes decode to exactly 0; with float offsets to a value ``d`` near 0, so ``value - d`` is added). All three paths need bfloat16 activations to be fast (float32 inputs
are 30-70x slower in the int kernels); :mod:`optimum_superweight.kernels` decides what float32 inputs do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..tensor.packing import unpack_codes
from ..tensor.quantize import held_out_decoded

__all__ = ["Int4CpuKernel", "Int8CpuKernel", "DenseCpuKernel", "int4_kernel_group", "dequantize_fast"]

_INT4_KERNEL_GROUPS = (256, 128, 64, 32)
_INT8_K_MULTIPLE = 32


def int4_kernel_group(group: int) -> int | None:
    """Largest group size the CPU int4 kernel accepts that divides ``group`` (``None`` if none does).

    >>> int4_kernel_group(128), int4_kernel_group(576), int4_kernel_group(48)
    (128, 64, None)
    """
    for candidate in _INT4_KERNEL_GROUPS:
        if group % candidate == 0:
            return candidate
    return None


def _codes(module: nn.Module) -> torch.Tensor:
    """uint8 codes ``[out, groups, group]`` (the ragged last group padded with the zero code)."""
    layout = module.layout
    return unpack_codes(module.weight.detach(), layout.bits, layout.effective_group_size)


def _zero_codes(module: nn.Module) -> torch.Tensor:
    """float32 ``[out, groups]``: the code that decodes to 0 in every group."""
    if module.symmetric:
        return torch.full(module.layout.scale_shape, float(2 ** (module.bits - 1)), device=module.weight.device)
    return module.weight_zero_point.detach().to(torch.float32)


def _sparse_indices(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    if module.super_weight_indices is None or module.super_weight_indices.numel() == 0:
        return None
    indices = module.super_weight_indices.detach()
    values = module.super_weight_values.detach().to(torch.float32)
    offset = getattr(module, "weight_offset", None)
    if offset is not None:  # the codes there decode to the value nearest 0, not to 0: add the difference
        values = values - held_out_decoded(
            module.weight.detach(), module.weight_scale.detach(), offset.detach(), module.layout, indices
        )
    return indices[:, 0].long(), indices[:, 1].long(), values


def add_super_weights(y: torch.Tensor, x: torch.Tensor, sparse: tuple | None) -> torch.Tensor:
    """``y[:, row] += x[:, col] * value`` for every super weight (rows may repeat), in place; 2-D tensors."""
    if sparse is not None:
        rows, cols, values = sparse
        y.index_add_(1, rows, (x[:, cols].to(torch.float32) * values).to(y.dtype))
    return y


def _finish(module: nn.Module, y: torch.Tensor, x2: torch.Tensor, sparse, shape: torch.Size) -> torch.Tensor:
    add_super_weights(y, x2, sparse)
    if module.bias is not None:
        y = y + module.bias.to(y.dtype)
    return y.reshape(*shape[:-1], module.out_features)


# -- int4 ----------------------------------------------------------------------------------------------------
@dataclass
class Int4State:
    packed: torch.Tensor  # kernel layout (uint8, opaque)
    scales_and_zeros: torch.Tensor  # bfloat16 [padded_in / kernel_group, out, 2]
    kernel_group: int
    padded_in: int
    sparse: tuple | None


class Int4CpuKernel:
    """``aten._weight_int4pack_mm_for_cpu`` with bfloat16 activations (see the module docstring)."""

    name = "cpu-int4"

    def unsupported(self, module: nn.Module, dtype: torch.dtype, device: torch.device, tokens: int) -> str | None:
        if device.type != "cpu":
            return f"device {device.type}"
        if dtype != torch.bfloat16:
            return f"{dtype} input (needs bfloat16)"
        if module.bits > 4:
            return f"bits={module.bits} (needs <= 4)"
        group = module.layout.effective_group_size
        if int4_kernel_group(group) is None:
            return f"group size {group} (needs a multiple of 32)"
        if module.out_features % 16:
            return f"out_features={module.out_features} (needs a multiple of 16)"
        return None

    def prepare(self, module: nn.Module, device: torch.device, dtype: torch.dtype) -> Int4State:
        layout = module.layout
        group = layout.effective_group_size
        kernel_group = int4_kernel_group(group)
        codes = _codes(module).to(torch.int32)
        scale = module.weight_scale.detach().to(torch.float32)
        offset = getattr(module, "weight_offset", None)
        if offset is not None:
            # w = s*q + m = (q' - 8)*s + (m + c*s) with q' = q - c + 8, c = 2^(bits-1): the zero m + c*s is the
            # group's centre, small, so no two large bfloat16 terms nearly cancel (for 4 bits q' = q).
            center = 2 ** (module.bits - 1)
            codes = codes - center + 8
            zero = offset.detach().to(torch.float32) + center * scale
        elif module.symmetric or module.bits <= 3:
            zero_codes = _zero_codes(module)
            # Re-centre the codes on the kernel's 8 when q - z fits a nibble: zero becomes exactly 0, which
            # avoids adding two large bfloat16 terms (q - 8)*s and s*(8 - z) that nearly cancel.
            codes = codes - zero_codes.to(torch.int32).unsqueeze(-1) + 8
            zero = torch.zeros_like(scale)
        else:
            zero = scale * (8.0 - _zero_codes(module))
        codes = codes.reshape(layout.out_features, -1)
        padded_in = codes.shape[1]
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        repeat = group // kernel_group
        scales_and_zeros = torch.stack((scale, zero), dim=-1).repeat_interleave(repeat, dim=1)
        scales_and_zeros = scales_and_zeros.transpose(0, 1).contiguous().to(torch.bfloat16)
        return Int4State(packed, scales_and_zeros, kernel_group, padded_in, _sparse_indices(module))

    def run(self, module: nn.Module, state: Int4State, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xk = x2 if state.padded_in == shape[-1] else nn.functional.pad(x2, (0, state.padded_in - shape[-1]))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xk, state.packed, state.kernel_group, state.scales_and_zeros)
        return _finish(module, y, x2, state.sparse, shape)


# -- int8 ----------------------------------------------------------------------------------------------------
@dataclass
class Int8State:
    weight: torch.Tensor  # int8 [out, padded_in]
    scale: torch.Tensor  # bfloat16 [out]
    offset: torch.Tensor | None  # float32 [out]: s*(c - z), asymmetric only
    padded_in: int
    sparse: tuple | None


class Int8CpuKernel:
    """``torch._weight_int8pack_mm`` (per-row scales) with bfloat16 activations."""

    name = "cpu-int8"

    def unsupported(self, module: nn.Module, dtype: torch.dtype, device: torch.device, tokens: int) -> str | None:
        if device.type != "cpu":
            return f"device {device.type}"
        if dtype != torch.bfloat16:
            return f"{dtype} input (needs bfloat16)"
        if module.bits <= 4:
            return f"bits={module.bits} (the int4 kernel's)"
        if module.layout.num_groups != 1:
            return f"group_size={module.group_size} with {module.layout.num_groups} groups per row (needs one scale per row)"
        return None

    def prepare(self, module: nn.Module, device: torch.device, dtype: torch.dtype) -> Int8State:
        in_features = module.in_features
        center = 2 ** (module.bits - 1)
        codes = _codes(module)[:, 0, :in_features].to(torch.int16) - center
        padded_in = -(-in_features // _INT8_K_MULTIPLE) * _INT8_K_MULTIPLE
        weight = nn.functional.pad(codes, (0, padded_in - in_features)).to(torch.int8).contiguous()
        scale32 = module.weight_scale.detach().to(torch.float32)[:, 0]
        offset = None
        if getattr(module, "weight_offset", None) is not None:  # w = s*(q - c) + (s*c + m)
            offset = scale32 * center + module.weight_offset.detach().to(torch.float32)[:, 0]
        elif not module.symmetric:
            offset = scale32 * (center - module.weight_zero_point.detach().to(torch.float32)[:, 0])
        return Int8State(weight, scale32.to(torch.bfloat16), offset, padded_in, _sparse_indices(module))

    def run(self, module: nn.Module, state: Int8State, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xk = x2 if state.padded_in == shape[-1] else nn.functional.pad(x2, (0, state.padded_in - shape[-1]))
        y = torch._weight_int8pack_mm(xk.contiguous(), state.weight, state.scale)
        if state.offset is not None:
            y = (y.to(torch.float32) + x2.to(torch.float32).sum(-1, keepdim=True) * state.offset).to(y.dtype)
        return _finish(module, y, x2, state.sparse, shape)


# -- dense (prefill) -------------------------------------------------------------------------------------
@dataclass
class DenseState:
    scale: torch.Tensor  # [out, groups, 1] in the compute dtype
    zero: torch.Tensor | None  # [out, groups, 1] zero codes in the compute dtype (None with float offsets)
    dtype: torch.dtype
    sparse: tuple | None
    offset: torch.Tensor | None = None  # [out, groups, 1] float offsets in the compute dtype: w = s*q + m


def dequantize_fast(module: nn.Module, state: DenseState, rows: slice = slice(None)) -> torch.Tensor:
    """Dense ``[out, in]`` weight (or the output rows ``rows`` of it, 4-bit codes only) in ``state.dtype``,
    computed in that dtype (super weights still 0)."""
    layout = module.layout
    packed = module.weight.detach()[rows]
    if layout.bits == 4:
        # Two nibbles per byte, low first, written straight into the output (converted on the way): fewer
        # passes and temporaries than unpack -> convert -> subtract.
        codes = torch.empty((*packed.shape, 2), dtype=state.dtype, device=packed.device)
        codes[..., 0] = packed & 0x0F
        codes[..., 1] = packed >> 4
        codes = codes.reshape(packed.shape[0], layout.num_groups, -1)[..., : layout.effective_group_size]
    else:
        if rows != slice(None):
            raise ValueError("dequantize_fast dequantizes row blocks of 4-bit codes only")
        codes = _codes(module).to(state.dtype)
    if state.offset is not None:
        weight = codes.mul_(state.scale[rows]).add_(state.offset[rows]).reshape(packed.shape[0], -1)
        return weight[:, : layout.in_features]
    # Codes and zero codes are integers below 256: exact in bfloat16, so only the scale product rounds.
    weight = codes.sub_(state.zero[rows]).mul_(state.scale[rows]).reshape(packed.shape[0], -1)
    return weight[:, : layout.in_features]


#: Matrices with more weights than this are dequantized in blocks of output rows of about
#: :data:`_DENSE_BLOCK_WEIGHTS` weights, each multiplied while still in cache ("Kernels by CPU" in
#: benchmarks/RESULTS.md): a whole 2048 x 8192 bfloat16 matrix is written to memory and read back otherwise.
_DENSE_BLOCKED_ABOVE = 1 << 22
_DENSE_BLOCK_WEIGHTS = 1 << 20


def _blocked_linear(module: nn.Module, state: DenseState, x2: torch.Tensor) -> torch.Tensor:
    out_features, in_features = module.out_features, module.in_features
    step = max(32, _DENSE_BLOCK_WEIGHTS // in_features)
    y = torch.empty(x2.shape[0], out_features, dtype=x2.dtype, device=x2.device)
    for start in range(0, out_features, step):
        block = slice(start, min(start + step, out_features))
        y[:, block] = nn.functional.linear(x2, dequantize_fast(module, state, block))
    return y


class DenseCpuKernel:
    """Dequantize in the activation dtype, then a dense GEMM: the prefill path (many tokens per call)."""

    name = "cpu-dense"

    def unsupported(self, module: nn.Module, dtype: torch.dtype, device: torch.device, tokens: int) -> str | None:
        if device.type != "cpu":
            return f"device {device.type}"
        if dtype not in (torch.bfloat16, torch.float16):
            return f"{dtype} input (needs bfloat16 or float16)"
        return None

    def prepare(self, module: nn.Module, device: torch.device, dtype: torch.dtype) -> DenseState:
        scale = module.weight_scale.detach().to(dtype).unsqueeze(-1)
        offset = getattr(module, "weight_offset", None)
        if offset is not None:
            return DenseState(scale, None, dtype, _sparse_indices(module), offset.detach().to(dtype).unsqueeze(-1))
        zero = _zero_codes(module).to(dtype).unsqueeze(-1)
        return DenseState(scale, zero, dtype, _sparse_indices(module))

    def run(self, module: nn.Module, state: DenseState, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if module.layout.bits == 4 and module.out_features * module.in_features > _DENSE_BLOCKED_ABOVE:
            y = _blocked_linear(module, state, x2)
        else:
            y = nn.functional.linear(x2, dequantize_fast(module, state))
        return _finish(module, y, x2, state.sparse, shape)
