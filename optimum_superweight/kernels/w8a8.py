"""Kernels for :class:`~optimum_superweight.nn.w8a8.SuperWeightW8A8Linear` (8-bit weights, 8-bit activations).

One operation, with the super activation held out of the activation quantization::

    x' = x with the held-out channels H set to 0          # equivalent to the paper's "median": see below
    s  = absmax(x') / 127        (per tensor, or per token = per row of x)
    q  = clamp(round(x' / s), -127, 127)                  # int8
    x~ = s * q ;  x~[..., H] = x[..., H]                  # held-out channels stay exact
    y  = x~ @ W^T + b                                     # W: int8 codes per output row, super weights exact

Replacing the held-out values by the median instead of 0 gives the same scale (the median's magnitude never
exceeds the absmax of the remaining values) and the same output once the exact values are restored, so 0 is used.

================  ===========================================================================================
kernel            when
================  ===========================================================================================
``cpu-onednn-w8a8``  CPU with oneDNN (``torch.ops.onednn.qlinear_pointwise``, AMX/VNNI int8 where the CPU has
                  them), from ``dense_threshold()`` tokens per call (default 64): activations quantized by
                  ``torch.quantize_per_tensor`` (once per input tensor shared by several projections), the
                  int8 GEMM with both scales applied inside, the held-out channels' exact contribution added
                  by oneDNN's ``sum`` post-op; per tensor it writes bfloat16 directly. 3x slower than
                  ``cpu-w8a8`` at batch-1 decode (per-call overhead).
``cpu-w8a8``      CPU, any float input, no gradient needed: ``torch._int_mm`` (int8 x int8 -> int32), then
                  ``y = acc * s_x * s_w`` + held-out columns ``x[:, H] @ W[:, H]^T`` in float32 + sparse
                  super-weight correction. ``_int_mm`` takes any shape on CPU (checked: M=1, K=70, N=5).
``cuda-w8a8``     CUDA: the same with ``torch._int_mm`` on CUDA, whose shape rules (M > 16, K and N multiples
                  of 8) are met by zero padding. **Untested: no GPU was available when it was written.**
``w8a8-reference``  everything else and ``force_reference()``: fake quantization in float32 (the exact
                  semantics above, written out).
================  ===========================================================================================

Both int8 kernels equal the reference up to float32 summation order (the int32 accumulation is exact; the
reference sums ``s*q`` products in float32), plus, for bfloat16 input per tensor on oneDNN, one bfloat16
rounding of the held-out contribution before it is summed.

>>> import torch
>>> from optimum_superweight.nn.w8a8 import SuperWeightW8A8Linear
>>> layer = SuperWeightW8A8Linear.from_linear(torch.nn.Linear(64, 32), holdout_channels=[5])
>>> _ = layer(torch.randn(3, 64)); layer.kernel
'cpu-w8a8'
"""

from __future__ import annotations

import threading
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..tensor.packing import unpack_codes
from . import Kernel, KernelSelection, dense_threshold, insert_kernel
from .fused import ACTIVATION_ZERO_POINT, quantize_fused, scale_rows_fused
from .guard import stepped_aside

__all__ = [
    "ACTIVATION_SCALES",
    "quantize_activations",
    "fake_quantize_activations",
    "select_w8a8_kernel",
    "register_w8a8_kernel",
    "registered_w8a8_kernels",
    "W8A8ReferenceKernel",
    "W8A8Int8Kernel",
    "W8A8OneDNNKernel",
]

#: How the activation scale is computed: one for the whole call, or one per token (row of the input).
ACTIVATION_SCALES = ("per_tensor", "per_token")
_QMAX = 127.0


def quantize_activations(
    x2: torch.Tensor, holdout: torch.Tensor | None, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes ``[T, K]`` and float32 scales (``[T, 1]`` per token, ``[1, 1]`` per tensor) of a 2-D input,
    the ``holdout`` channels (long indices) set to 0 first so they neither set the scale nor get codes.

    >>> q, s = quantize_activations(torch.tensor([[1.0, -2.0, 1000.0]]), torch.tensor([2]), "per_tensor")
    >>> q.tolist(), round(s.item() * 127, 4)
    ([[64, -127, 0]], 2.0)
    """
    if mode not in ACTIVATION_SCALES:
        raise ValueError(f"activation scale mode {mode!r} is invalid: accepted values are {ACTIVATION_SCALES}.")
    xf = x2.to(torch.float32)
    if holdout is not None and holdout.numel():
        xf = xf.index_fill(1, holdout, 0.0)
    if mode == "per_token":
        absmax = xf.abs().amax(dim=-1, keepdim=True)
    else:
        absmax = xf.abs().amax().reshape(1, 1)
    # An all-zero input gets scale 1 (codes 0): avoids 0/0.
    scale = torch.where(absmax > 0, absmax / _QMAX, torch.ones_like(absmax))
    codes = torch.round(xf / scale).clamp_(-_QMAX, _QMAX).to(torch.int8)
    return codes, scale


def fake_quantize_activations(x2: torch.Tensor, holdout: torch.Tensor | None, mode: str) -> torch.Tensor:
    """float32 ``s * q`` with the held-out channels restored to their exact values (the reference semantics)."""
    codes, scale = quantize_activations(x2, holdout, mode)
    out = codes.to(torch.float32) * scale
    if holdout is not None and holdout.numel():
        out[:, holdout] = x2[:, holdout].to(torch.float32)
    return out


def _holdout(module: nn.Module, device: torch.device) -> torch.Tensor | None:
    channels = module.holdout_channels
    return torch.tensor(channels, dtype=torch.long, device=device) if channels else None


def _bias_and_shape(module: nn.Module, y: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    if module.bias is not None:
        y = y + module.bias.to(torch.float32)
    return y.to(dtype).reshape(*shape[:-1], module.out_features)


class W8A8ReferenceKernel:
    """Fake quantization in float32: the exact semantics of the module docstring."""

    name = "w8a8-reference"
    is_reference = True  # the semantics every other W8A8 kernel is tested against; closes the registry

    def unsupported(self, module: nn.Module, dtype: torch.dtype, device: torch.device, tokens: int) -> str | None:
        return None

    def prepare(self, module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        return None

    def run(self, module: nn.Module, state: None, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xq = fake_quantize_activations(x2, _holdout(module, x.device), module.activation_scale)
        y = nn.functional.linear(xq, module.dequantize_weight(torch.float32))
        return _bias_and_shape(module, y, shape, x.dtype)


@dataclass
class W8A8State:
    weight_t: torch.Tensor  # int8 [padded_in, padded_out]: codes - 128, transposed for _int_mm
    scale: torch.Tensor  # float32 [out]
    holdout: torch.Tensor | None  # long [k]
    holdout_weight_t: torch.Tensor | None  # float32 [k, out]: dequantized codes of the held-out columns
    sparse: tuple | None  # (rows, cols, values, held-out mask of cols)
    padded_in: int
    min_rows: int


class W8A8Int8Kernel:
    """``torch._int_mm`` on int8 activations and int8 weights with int32 accumulation (CPU or CUDA)."""

    def __init__(self, device_type: str, k_multiple: int = 1, n_multiple: int = 1, min_rows: int = 1) -> None:
        self.device_type = device_type
        self.name = f"{device_type}-w8a8"
        self.k_multiple, self.n_multiple, self.min_rows = k_multiple, n_multiple, min_rows

    def unsupported(self, module: nn.Module, dtype: torch.dtype, device: torch.device, tokens: int) -> str | None:
        if device.type != self.device_type:
            return f"device {device.type}"
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"{dtype} input"
        return None

    def prepare(self, module: nn.Module, device: torch.device, dtype: torch.dtype) -> W8A8State:
        layout = module.layout
        in_features, out_features = module.in_features, module.out_features
        codes = unpack_codes(module.weight.detach(), 8, layout.effective_group_size)[:, 0, :in_features]
        codes = codes.to(torch.int16) - 128  # symmetric 8-bit: w = s * (q - 128)
        padded_in = -(-in_features // self.k_multiple) * self.k_multiple
        padded_out = -(-out_features // self.n_multiple) * self.n_multiple
        codes = nn.functional.pad(codes, (0, padded_in - in_features, 0, padded_out - out_features))
        weight_t = codes.to(torch.int8).t().contiguous()
        scale = module.weight_scale.detach().to(torch.float32)[:, 0]
        holdout = _holdout(module, device)
        holdout_weight_t = None
        if holdout is not None:
            # Super weights inside held-out columns decode to 0 here; the sparse correction adds them.
            holdout_weight_t = (codes[:out_features, holdout].to(torch.float32) * scale[:, None]).t().contiguous()
        sparse = None
        if module.super_weight_indices is not None and module.super_weight_indices.numel():
            indices = module.super_weight_indices.detach().long()
            cols = indices[:, 1]
            held = torch.zeros_like(cols, dtype=torch.bool)
            if holdout is not None:
                held = (cols[:, None] == holdout[None, :]).any(dim=1)
            sparse = (indices[:, 0], cols, module.super_weight_values.detach().to(torch.float32), held)
        return W8A8State(weight_t, scale, holdout, holdout_weight_t, sparse, padded_in, self.min_rows)

    def run(self, module: nn.Module, state: W8A8State, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        tokens = x2.shape[0]
        codes, scale = quantize_activations(x2, state.holdout, module.activation_scale)
        pad_rows = max(state.min_rows - tokens, 0)
        if pad_rows or state.padded_in != shape[-1]:
            codes = nn.functional.pad(codes, (0, state.padded_in - shape[-1], 0, pad_rows))
        acc = torch._int_mm(codes, state.weight_t)[:tokens, : module.out_features]
        y = acc.to(torch.float32).mul_(scale).mul_(state.scale)
        if state.holdout is not None:
            y.addmm_(x2[:, state.holdout].to(torch.float32), state.holdout_weight_t)
        if state.sparse is not None:
            rows, cols, values, held = state.sparse
            # The super weight multiplies the activation the matmul sees: exact if held out, else s * q.
            xs = torch.where(held, x2[:, cols].to(torch.float32), codes[:tokens, cols].to(torch.float32) * scale)
            y.index_add_(1, rows, xs * values)
        return _bias_and_shape(module, y, shape, x.dtype)


def _onednn_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def _offset_codes(unit_scaled: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``round(x) + 128`` of a float32 tensor already divided by its scale.

    Rounds in int8 (``torch.quantize_per_tensor`` with zero-point 0), then flips the top bit in place, which
    adds 128: asking ``quantize_per_tensor`` for zero-point 128 instead adds it before rounding, in float32,
    which moves values within a few ulps of a tie onto it. The codes are read through a view of the quantized
    tensor's storage (``int_repr()`` copies, slowly: it cost as much as the quantization itself at 4096 x 576).
    """
    quantized = torch.quantize_per_tensor(unit_scaled, 1.0, 0, torch.qint8)
    codes = torch.empty(0, dtype=torch.int8, device=quantized.device)
    codes.set_(quantized.untyped_storage(), quantized.storage_offset(), quantized.shape, quantized.stride())
    return codes.bitwise_xor_(-128).view(torch.uint8)


@dataclass
class OneDNNActivations:
    """A 2-D input quantized for ``qlinear_pointwise``: uint8 codes (the reference's int8 codes plus
    :data:`ACTIVATION_ZERO_POINT`) and either one float scale (per tensor; ``token_scale`` None) or float32
    per-row scales ``[T, 1]`` (``x_scale`` 1.0).

    Unsigned: oneDNN's int8 GEMM takes unsigned activations natively on every x86 CPU; signed ones only with
    AMX (on AMD EPYC with AVX-512 VNNI one 512 x 576 @ 576 x 1536 product took 33 s signed, 4.5 ms unsigned)."""

    codes: torch.Tensor
    x_scale: float
    token_scale: torch.Tensor | None

    def signed_codes(self) -> torch.Tensor:
        """The int8 codes ``round(x / s)`` (a new tensor): flipping the top bit subtracts 128."""
        return self.codes.view(torch.int8).bitwise_xor(-128)


def quantize_activations_onednn(
    x2: torch.Tensor, holdout: torch.Tensor | None, mode: str, keep: torch.Tensor | None = None
) -> OneDNNActivations:
    """:func:`quantize_activations` in the fewest passes: the same codes and scales (tested). ``keep`` (1, or 0
    on the held-out channels, in the input's dtype) enables the ``torch.compile``-fused quantizer
    (:mod:`~optimum_superweight.kernels.fused`); without it, or when that is off, eager PyTorch with
    ``torch.quantize_per_tensor`` doing the rounding pass."""
    if keep is not None:
        fused = quantize_fused(x2, keep, mode)
        if fused is not None:
            codes, scale = fused
            if mode == "per_tensor":
                return OneDNNActivations(codes, float(scale), None)
            return OneDNNActivations(codes, 1.0, scale)
    xf = x2.to(torch.float32)
    if holdout is not None:
        # In place only on a copy: the caller's tensor (shared by q/k/v, the residual, ...) stays intact.
        xf = xf.index_fill_(1, holdout, 0.0) if xf is not x2 else xf.index_fill(1, holdout, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized-tensor constructors are deprecated; no fused replacement yet
        if mode == "per_tensor":
            low, high = torch.aminmax(xf)
            absmax = torch.maximum(-low, high)  # float32 arithmetic, as in the reference
            x_scale = float(absmax / _QMAX) if absmax > 0 else 1.0
            # Divide, then round with unit scale: quantize_per_tensor(xf, s) multiplies by 1/s, which rounds
            # ties such as x = absmax / 2 (x / s = 63.5) the other way than the reference's division.
            xf = xf.div_(x_scale) if xf is not x2 else xf.div(x_scale)
            return OneDNNActivations(_offset_codes(xf), x_scale, None)
        # amax and amin separately: 5x faster than aminmax(dim=-1) on this CPU.
        absmax = torch.maximum(xf.amax(dim=-1, keepdim=True), xf.amin(dim=-1, keepdim=True).neg_())
        token_scale = torch.where(absmax > 0, absmax / _QMAX, torch.ones_like(absmax))
        # Divide (as the reference does), then round with unit scale: 3-4x faster than quantize_per_channel
        # over tokens, which also multiplies by the inverse scale.
        xf = xf.div_(token_scale) if xf is not x2 else xf.div(token_scale)
        return OneDNNActivations(_offset_codes(xf), 1.0, token_scale)


class _SharedInputCodes(threading.local):
    """The last input quantized by the oneDNN kernel, so that projections fed the same tensor (q/k/v, gate/up)
    quantize it once. Matched on identity (a weak reference), the in-place version counter, the held-out
    channels and the scale mode; inference-mode tensors, which keep no version counter, are never shared."""

    def __init__(self) -> None:
        self.entry: tuple | None = None

    @staticmethod
    def _key(x: torch.Tensor, holdout: tuple, mode: str) -> tuple | None:
        try:
            return (x._version, holdout, mode)
        except RuntimeError:  # inference tensor: an in-place change would go unseen
            return None

    def quantize(
        self, x: torch.Tensor, x2: torch.Tensor, module: nn.Module, holdout: torch.Tensor | None, keep: torch.Tensor
    ) -> OneDNNActivations:
        key = self._key(x, tuple(module.holdout_channels) if holdout is not None else (), module.activation_scale)
        entry = self.entry
        if key is not None and entry is not None and entry[1] == key and entry[0]() is x:
            return entry[2]
        activations = quantize_activations_onednn(x2, holdout, module.activation_scale, keep)
        self.entry = None if key is None else (weakref.ref(x), key, activations)
        return activations


_SHARED_INPUT = _SharedInputCodes()


@dataclass
class OneDNNState:
    packed: torch.Tensor  # oneDNN's int8 weight layout (kernel-specific, never saved)
    scale: torch.Tensor  # float32 [out]
    zero_points: torch.Tensor  # int64 [out] zeros (symmetric weights)
    bias: torch.Tensor | None  # float32 [out]
    holdout: torch.Tensor | None
    # [k, out], super weights of held-out columns included exactly: float32, and in the dtype the per-tensor
    # GEMM writes (bfloat16 for bfloat16 input, else float32: then the same tensor)
    holdout_weight_t: torch.Tensor | None
    holdout_weight_t_compute: torch.Tensor | None
    sparse: tuple | None  # super weights outside held-out columns: (rows, cols, values)
    keep: torch.Tensor  # [in] 1, or 0 on held-out channels, in the input dtype (the fused quantizer's mask)


class W8A8OneDNNKernel:
    """oneDNN int8 linear (``torch.ops.onednn.qlinear_pointwise``) on CPU; same semantics as the reference.

    What it saves over running the reference's steps one by one (measured on SmolLM2 prefill, 8 x 512 tokens):
    an input shared by several projections is quantized once; per-tensor calls write the output in the input
    dtype straight from the GEMM, with the held-out channels' exact contribution (and any super weight outside
    them) added by oneDNN's ``sum`` post-op; per-token calls scale the float32 GEMM output in place.
    For bfloat16 inputs per tensor, that contribution is rounded to bfloat16 before the sum (one bfloat16
    rounding more than the reference, well inside the tested bound); float32 inputs keep float32 throughout.
    """

    name = "cpu-onednn-w8a8"

    def unsupported(self, module: nn.Module, dtype: torch.dtype, device: torch.device, tokens: int) -> str | None:
        if device.type != "cpu":
            return f"device {device.type}"
        if not _onednn_available():
            return "torch built without oneDNN"
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"{dtype} input"
        if tokens < dense_threshold():
            # Measured (benchmarks/w8a8.py): batch-1 decode 3.3 tok/s here vs 10.3 on torch._int_mm.
            return f"{tokens} tokens per call (< {dense_threshold()}): torch._int_mm has less per-call overhead"
        return None

    def prepare(self, module: nn.Module, device: torch.device, dtype: torch.dtype) -> OneDNNState:
        # The _int_mm layout gives the int8 codes, held-out columns and sparse correction; oneDNN repacks codes.
        base = W8A8Int8Kernel("cpu").prepare(module, device, dtype)
        codes = base.weight_t.t().contiguous()  # int8 [out, in]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            packed = torch.ops.onednn.qlinear_prepack(codes, None)
        zero_points = torch.zeros(module.out_features, dtype=torch.int64)
        holdout_weight_t, sparse = base.holdout_weight_t, None
        if base.sparse is not None:
            rows, cols, values, held = base.sparse
            if held.any():  # exact super weights go into the held-out columns' dense weights
                position = {int(c): i for i, c in enumerate(base.holdout.tolist())}
                for row, col, value in zip(rows[held].tolist(), cols[held].tolist(), values[held].tolist()):
                    holdout_weight_t[position[col], row] = value
            if (~held).any():
                sparse = (rows[~held], cols[~held], values[~held])
        compute = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        bias = None if module.bias is None else module.bias.detach().to(torch.float32)
        keep = torch.ones(module.in_features, dtype=dtype, device=device)
        if base.holdout is not None:
            keep[base.holdout] = 0
        return OneDNNState(
            packed, base.scale, zero_points, bias, base.holdout, holdout_weight_t,
            None if holdout_weight_t is None else holdout_weight_t.to(compute), sparse, keep,
        )

    def _correction(self, state: OneDNNState, x2: torch.Tensor, activations: OneDNNActivations, dtype: torch.dtype):
        """What the int8 GEMM misses, in units of its output (divided by the token scale per token): the held-out
        channels times their weights, and super weights outside them times the activation the GEMM saw."""
        token_scale = activations.token_scale
        if state.holdout is None and state.sparse is None:
            return None
        if state.sparse is None and token_scale is None:
            # The common case (hold-out, no stray super weight): one small GEMM straight in the output dtype.
            return torch.mm(x2[:, state.holdout].to(dtype), state.holdout_weight_t_compute)
        if state.holdout is not None:
            held = x2[:, state.holdout].to(torch.float32)
            if token_scale is not None:
                held = held.div_(token_scale)
            other = torch.mm(held, state.holdout_weight_t)
        else:
            other = torch.zeros(x2.shape[0], state.scale.numel(), dtype=torch.float32, device=x2.device)
        if state.sparse is not None:
            rows, cols, values = state.sparse
            xs = activations.codes[:, cols].to(torch.float32).sub_(ACTIVATION_ZERO_POINT)  # x scale: what the GEMM saw
            if token_scale is None:
                xs = xs * activations.x_scale
            other.index_add_(1, rows, xs * values)
        return other.to(dtype)

    # Opaque to a user's torch.compile (a graph break, run eagerly): Inductor lowers oneDNN's int8 linear only
    # for weights frozen into the graph as constants, and the shared-codes cache is Python state.
    @torch.compiler.disable
    def run(self, module: nn.Module, state: OneDNNState, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        activations = _SHARED_INPUT.quantize(x, x2, module, state.holdout, state.keep)
        per_token = activations.token_scale is not None
        # Per tensor, the GEMM writes the output dtype (bfloat16 or float32); per token, float32, scaled after.
        gemm_dtype = x.dtype if x.dtype == torch.bfloat16 and not per_token else torch.float32
        other = self._correction(state, x2, activations, gemm_dtype)
        bias = None if per_token else state.bias
        common = (activations.codes, activations.x_scale, ACTIVATION_ZERO_POINT, state.packed, state.scale, state.zero_points)
        if other is None:
            y = torch.ops.onednn.qlinear_pointwise(*common, bias, 1.0, 0, gemm_dtype, "none", [], "")
        else:
            y = torch.ops.onednn.qlinear_pointwise.binary(
                *common, other, bias, 1.0, 0, gemm_dtype, 1.0, 0, "sum", 1.0, "none", [], ""
            )
        if per_token:
            scaled = scale_rows_fused(y, activations.token_scale, state.bias, x.dtype)
            if scaled is not None:
                y = scaled
            else:  # in place on the float32 output: faster here than one mixed-dtype eager pass into bf16
                y = y.mul_(activations.token_scale)
                y = y if state.bias is None else y.add_(state.bias)
        return y.to(x.dtype).reshape(*shape[:-1], module.out_features)


W8A8_REFERENCE = W8A8ReferenceKernel()
_W8A8_KERNELS: list[Kernel] = [
    W8A8OneDNNKernel(),
    W8A8Int8Kernel("cpu"),
    # torch._int_mm on CUDA: M > 16, K and N multiples of 8 (padded here). Untested (no GPU when written).
    W8A8Int8Kernel("cuda", k_multiple=8, n_multiple=8, min_rows=17),
    W8A8_REFERENCE,
]


def register_w8a8_kernel(kernel, *, before: str = "w8a8-reference") -> None:
    """Add a W8A8 kernel (``name``, ``unsupported``, ``prepare``, ``run``) before another."""
    insert_kernel(_W8A8_KERNELS, kernel, before, "W8A8 kernel")


def registered_w8a8_kernels() -> list[str]:
    return [k.name for k in _W8A8_KERNELS]


def select_w8a8_kernel(
    module: nn.Module,
    dtype: torch.dtype,
    device: torch.device,
    tokens: int,
    requires_grad: bool,
    reference_only: bool,
) -> KernelSelection:
    """The W8A8 kernel for a call (called by :func:`optimum_superweight.kernels.select_kernel`)."""
    if reference_only:
        return KernelSelection(W8A8_REFERENCE, dtype, False, "OPTIMUM_SUPERWEIGHT_KERNELS=reference")
    many = tokens >= dense_threshold()
    passed = []
    for kernel in _W8A8_KERNELS:
        if requires_grad and kernel is not W8A8_REFERENCE:
            passed.append(f"{kernel.name}: input requires grad (no backward)")
            continue
        why = kernel.unsupported(module, dtype, device, tokens)
        if why is None and kernel is not W8A8_REFERENCE:
            why = stepped_aside(module, kernel.name, dtype, many)
        if why is None:
            return KernelSelection(kernel, dtype, False, "; ".join(passed))
        passed.append(f"{kernel.name}: {why}")
    raise RuntimeError("no W8A8 kernel accepted the call; the reference must close the list")  # unreachable
