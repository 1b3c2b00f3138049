"""Activation quantization and per-token rescaling fused by ``torch.compile`` (Inductor), for the oneDNN W8A8
kernel (:mod:`optimum_superweight.kernels.w8a8`).

Eager PyTorch quantizes a bfloat16 activation in four memory passes (cast to float32, mask the held-out
channels, absmax, round) and writes a float32 copy twice its size; Inductor fuses them into one reduction and
one rounding pass that read the bfloat16 input directly (speed: the quantizer table of
``benchmarks/RESULTS.md``, from ``benchmarks/w8a8.py``). The
codes and scales are exactly the reference's (:func:`~optimum_superweight.kernels.w8a8.quantize_activations`:
``round(x / s)`` with ``s = absmax / 127``), stored offset by 128 as uint8, which the tests check.

The functions are compiled once per process with dynamic shapes, at the first prefill call (about 10 s on
2 cores; Inductor's on-disk cache makes later processes faster). That needs a working C++ compiler; when
compiling fails, a warning names the cause and the eager path takes over for the rest of the process. Turn it
off with ``set_fused_quantization(False)`` or ``OPTIMUM_SUPERWEIGHT_COMPILE=0``.

>>> import torch
>>> enabled = fused_quantization_enabled()
>>> set_fused_quantization(False); fused_quantization_enabled()
False
>>> quantize_fused(torch.randn(4, 8), torch.ones(8), "per_tensor") is None   # disabled: caller runs eager
True
>>> set_fused_quantization(enabled)
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

__all__ = ["ACTIVATION_ZERO_POINT", "quantize_fused", "scale_rows_fused", "set_fused_quantization", "fused_quantization_enabled"]

logger = logging.getLogger(__name__)
_QMAX = 127.0
#: Zero-point of the uint8 activation codes: ``code = round(x / s) + 128``.
ACTIVATION_ZERO_POINT = 128


def _env_enabled() -> bool:
    value = os.environ.get("OPTIMUM_SUPERWEIGHT_COMPILE", "1").strip().lower()
    if value not in ("0", "1", "false", "true"):
        raise ValueError(f"OPTIMUM_SUPERWEIGHT_COMPILE={value!r} is invalid: use 1 (default) or 0.")
    return value in ("1", "true")


_settings: dict = {"enabled": _env_enabled(), "failure": None}
_compiled: dict[str, Callable] = {}


def set_fused_quantization(enabled: bool) -> None:
    """Use the ``torch.compile``-fused activation quantizer (default) or the eager one; re-enabling also
    retries after a compile failure."""
    _settings["enabled"] = bool(enabled)
    if enabled:
        _settings["failure"] = None


def fused_quantization_enabled() -> bool:
    """Whether the next call will use (or try to compile) the fused quantizer."""
    return _settings["enabled"] and _settings["failure"] is None


# The held-out channels are zeroed by multiplying with a 0/1 vector: ``torch.where`` on a channel mask stops
# Inductor from vectorizing the reduction (5x slower, measured).
def _absmax_per_tensor(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return (x * keep).abs().amax().to(torch.float32)


def _absmax_per_token(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return (x * keep).abs().amax(dim=-1, keepdim=True).to(torch.float32)


def _codes(x: torch.Tensor, keep: torch.Tensor, absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = torch.where(absmax > 0, absmax / _QMAX, torch.ones_like(absmax))
    codes = torch.round((x * keep).to(torch.float32) / scale).clamp(-_QMAX, _QMAX)
    # Offset by the zero-point 128 into uint8: oneDNN runs unsigned activations natively on every x86 CPU,
    # signed ones only on some (1000x slower on AMD EPYC without AMX).
    return (codes + ACTIVATION_ZERO_POINT).to(torch.uint8), scale


def _scale_rows(y: torch.Tensor, token_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (y * token_scale).to(dtype)


def _scale_rows_bias(
    y: torch.Tensor, token_scale: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    return (y * token_scale + bias).to(dtype)


_FUNCTIONS = {f.__name__: f for f in (_absmax_per_tensor, _absmax_per_token, _codes, _scale_rows, _scale_rows_bias)}


def _run(name: str, *args):
    if not fused_quantization_enabled():
        return None
    function = _compiled.get(name)
    try:
        if function is None:
            if not _compiled:
                logger.info("optimum-superweight: compiling the W8A8 activation quantizer (once per process).")
            function = _compiled[name] = torch.compile(_FUNCTIONS[name], dynamic=True)
        return function(*args)
    except Exception as error:  # noqa: BLE001 - any compiler failure: warn once, run eager from now on
        first_line = (str(error).strip().splitlines() or [""])[0]
        _settings["failure"] = f"{type(error).__name__}: {first_line}"
        logger.warning(
            "optimum-superweight: torch.compile could not build the fused W8A8 activation quantizer (%s); the "
            "eager quantizer runs instead (same results, slower prefill). Install a C++ compiler (g++) for "
            "Inductor, or set OPTIMUM_SUPERWEIGHT_COMPILE=0 to skip the attempt.",
            _settings["failure"],
        )
        return None


def quantize_fused(x2: torch.Tensor, keep: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """uint8 codes ``[T, K]`` (the reference's int8 codes + :data:`ACTIVATION_ZERO_POINT`) and float32 scales
    (``[]`` per tensor, ``[T, 1]`` per token) of a 2-D input whose channels are multiplied by ``keep`` (1, or 0
    for held-out channels; the input's dtype) first; ``None`` when the fused path is off or could not be
    compiled."""
    absmax = _run("_absmax_per_tensor" if mode == "per_tensor" else "_absmax_per_token", x2, keep)
    if absmax is None:
        return None
    return _run("_codes", x2, keep, absmax)


def scale_rows_fused(
    y: torch.Tensor, token_scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor | None:
    """``y * token_scale [+ bias]`` cast to ``dtype`` in one pass; ``None`` when the fused path is off."""
    if bias is None:
        return _run("_scale_rows", y, token_scale, dtype)
    return _run("_scale_rows_bias", y, token_scale, bias, dtype)
