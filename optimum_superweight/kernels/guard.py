"""First-use speed check: a kernel far slower than a dense GEMM on this CPU steps aside for the next one.

The same int8 or int4 instruction can be fast on one x86 CPU and orders of magnitude slower on another
(oneDNN's int8 GEMM with signed activations is native with AMX but emulated on AMD EPYC). So the first time a
layer shape meets a kernel, in a process, both the kernel and a dense ``F.linear`` on the dequantized weight
(in the input's dtype: what the user would run without this package) are timed on that call's own input. A
kernel slower than dense by more than :data:`STEP_ASIDE_RATIO` (and by more than
:data:`NOISE_FLOOR_SECONDS`, below which per-call overhead and timer noise dominate) is passed over for this
shape from then on, with a warning naming the CPU, and the next kernel is checked the same way. If every
candidate is slow, the fastest one measured keeps the shape (the reference kernel, which closes each
registry, is timed only then). Verdicts are per process and per (module type, shape, bits, group size,
activation mode, dtype, token band: decode, prefill, or in between; see ``kernels.token_band``).

Turn the check off with ``set_speed_check(False)`` or ``OPTIMUM_SUPERWEIGHT_SPEED_CHECK=0`` (for example to
benchmark a kernel on a CPU where it loses).

>>> enabled = speed_check_enabled()
>>> set_speed_check(False); speed_check_enabled()
False
>>> set_speed_check(enabled)
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import time
from typing import Any, Callable

import torch
from torch import nn

__all__ = [
    "STEP_ASIDE_RATIO",
    "NOISE_FLOOR_SECONDS",
    "cpu_name",
    "set_speed_check",
    "speed_check_enabled",
    "stepped_aside",
    "clear_speed_verdicts",
    "speed_verdicts",
]

logger = logging.getLogger(__name__)

#: A kernel more than this many times slower than dense ``F.linear`` steps aside.
STEP_ASIDE_RATIO = 1.5
#: ... unless it is slower by less than this per call (overhead of tiny layers, timer noise).
NOISE_FLOOR_SECONDS = 1e-4
_PROBE_ROWS = 512  # at most this many rows of the call's input are timed
_REPEATS = 3
_CONFIRM_ROUNDS = 10
_BUDGET_SECONDS = 0.5  # per timing loop, after the warm-up call


def _env_enabled() -> bool:
    value = os.environ.get("OPTIMUM_SUPERWEIGHT_SPEED_CHECK", "1").strip().lower()
    if value not in ("0", "1", "false", "true"):
        raise ValueError(f"OPTIMUM_SUPERWEIGHT_SPEED_CHECK={value!r} is invalid: use 1 (default) or 0.")
    return value in ("1", "true")


_settings = {"enabled": _env_enabled()}
# signature -> {kernel name: why it stepped aside}; a signature present here has been checked.
_verdicts: dict[tuple, dict[str, str]] = {}


def set_speed_check(enabled: bool) -> None:
    """Time each kernel against dense on first use and drop those far slower (default on)."""
    _settings["enabled"] = bool(enabled)


def speed_check_enabled() -> bool:
    return _settings["enabled"]


def clear_speed_verdicts() -> None:
    """Forget every verdict (the next call of each shape is checked again)."""
    _verdicts.clear()


def speed_verdicts() -> dict[tuple, dict[str, str]]:
    """A copy of the verdicts so far: ``{signature: {kernel name: why it stepped aside}}``."""
    return {key: dict(value) for key, value in _verdicts.items()}


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), e.g. ``'AMD EPYC 9R14'``; ``platform.processor()`` elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def signature(module: nn.Module, dtype: torch.dtype, many: bool) -> tuple:
    """What a verdict is keyed on: kernels behave alike for layers of one type, shape and format."""
    return (
        type(module).__name__,
        module.in_features,
        module.out_features,
        getattr(module, "bits", None),
        getattr(module, "group_size", None),
        getattr(module, "activation_scale", None),
        dtype,
        many,
    )


def stepped_aside(module: nn.Module, kernel_name: str, dtype: torch.dtype, many: bool) -> str | None:
    """Why ``kernel_name`` was passed over for layers like ``module``, or ``None``."""
    verdict = _verdicts.get(signature(module, dtype, many))
    return None if verdict is None else verdict.get(kernel_name)


def checked(module: nn.Module, dtype: torch.dtype, many: bool) -> bool:
    return signature(module, dtype, many) in _verdicts


def _best_time(function: Callable[[], Any], repeats: int = _REPEATS, warm_up: bool = True) -> float:
    if warm_up:
        function()  # caches, lazy layouts, a one-off compilation
    best, spent = float("inf"), 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
        if spent > _BUDGET_SECONDS:  # a pathological kernel is timed once, not many times
            break
    return best


def _too_slow(seconds: float, dense: float) -> bool:
    return seconds > STEP_ASIDE_RATIO * dense and seconds - dense > NOISE_FLOOR_SECONDS


def _confirmed_times(kernel: Callable[[], Any], dense: Callable[[], Any], first: tuple[float, float]) -> tuple[float, float]:
    """Time both again, interleaved, before a verdict of "slow": on a loaded machine one descheduled thread
    of a parallel kernel can stall a call for a whole time slice, and such stalls must not pass for the CPU."""
    seconds, reference = first
    deadline = time.perf_counter() + _BUDGET_SECONDS
    for _ in range(_CONFIRM_ROUNDS):
        if time.perf_counter() > deadline:
            break
        seconds = min(seconds, _best_time(kernel, 1, warm_up=False))
        reference = min(reference, _best_time(dense, 1, warm_up=False))
    return seconds, reference


def _describe(module: nn.Module, rows: int, dtype: torch.dtype) -> str:
    return f"{rows}x{module.in_features} @ {module.in_features}x{module.out_features} {str(dtype).replace('torch.', '')}"


def check_speed(
    module: nn.Module,
    x: torch.Tensor,
    many: bool,
    select: Callable[[], Any],
    run: Callable[[Any, torch.Tensor], torch.Tensor],
    is_last_resort: Callable[[Any], bool],
) -> Any:
    """Choose the kernel for ``module`` on inputs like ``x``: ``select()`` gives the registry's next choice
    (it skips kernels recorded here as stepped aside), ``run(selection, x)`` runs one. Returns the selection."""
    verdict = _verdicts.setdefault(signature(module, x.dtype, many), {})
    rows = x.reshape(-1, x.shape[-1])[:_PROBE_ROWS]
    shape = _describe(module, rows.shape[0], x.dtype)
    with torch.no_grad():
        weight = module.dequantize_weight(x.dtype)
        bias = None if module.bias is None else module.bias.to(x.dtype)
        run_dense = lambda: nn.functional.linear(rows, weight, bias)  # noqa: E731
        dense = _best_time(run_dense)
        measured: list[tuple[float, Any]] = []
        while True:
            selection = select()
            run_kernel = lambda: run(selection, rows)  # noqa: E731
            if is_last_resort(selection.kernel):
                if not measured:
                    return selection
                measured.append((_best_time(run_kernel), selection))
                break
            seconds = _best_time(run_kernel)
            if _too_slow(seconds, dense):
                seconds, dense = _confirmed_times(run_kernel, run_dense, (seconds, dense))
            if not _too_slow(seconds, dense):
                if measured:
                    logger.warning(
                        "optimum-superweight: %s on %s: %s; running %s instead (x%.2f of dense).",
                        shape, cpu_name(), "; ".join(verdict.values()), selection.label, seconds / dense,
                    )
                return selection
            verdict[selection.kernel.name] = (
                f"{selection.label} stepped aside, x{seconds / dense:.1f} of dense F.linear "
                f"({seconds * 1e3:.3f} vs {dense * 1e3:.3f} ms)"
            )
            measured.append((seconds, selection))
    seconds, chosen = min(measured, key=lambda item: item[0])
    verdict.pop(chosen.kernel.name, None)
    logger.warning(
        "optimum-superweight: no kernel within x%.1f of dense F.linear for %s on %s (%.3f ms): running the fastest, "
        "%s (x%.2f). Measured: %s.",
        STEP_ASIDE_RATIO, shape, cpu_name(), dense * 1e3, chosen.label, seconds / dense,
        ", ".join(f"{s.label} x{t / dense:.2f}" for t, s in measured),
    )
    return chosen
