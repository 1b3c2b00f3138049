"""First-use speed check: a kernel far slower than a dense GEMM on this CPU steps aside for the next one.

The same int8 or int4 instruction can be fast on one x86 CPU and orders of magnitude slower on another
(oneDNN's int8 GEMM with signed activations is native with AMX but emulated on AMD EPYC). So the first time a
layer shape meets a kernel on a machine, both the kernel and a dense ``F.linear`` on the dequantized weight
(in the input's dtype: what the user would run without this package) are timed on that call's own input, on
one torch thread and in that thread's CPU time (so that other processes on a loaded machine do not count). A
kernel slower than dense by more than :data:`STEP_ASIDE_RATIO` (and by more than
:data:`NOISE_FLOOR_SECONDS`, below which per-call overhead and timer noise dominate) is passed over for this
shape from then on, and the next kernel is checked the same way. If every candidate is slow, the fastest one
measured keeps the shape (the reference kernel, which closes each registry, is timed only then). Verdicts are
per (module type, shape, bits, group size, activation mode, dtype, token band: decode, prefill, or in between;
see ``kernels.token_band``).

**Same kernels in every run.** Kernels differ in their float results (summation order, bfloat16 roundings), so
a verdict that changed from one run to the next would change the logits. How kernels are chosen
(``set_kernel_choice`` or ``OPTIMUM_SUPERWEIGHT_KERNEL_CHOICE``):

``stored`` (default)
    timed once per machine: each verdict is stored beside the kernel cache per CPU model and torch version
    (:mod:`~optimum_superweight.kernels.verdicts`) and every later run reuses it without timing.
``fixed``
    never timed: every layer runs the first kernel of the registry that supports it (a fixed rule, the same on
    every run and on every machine with the same CPU features and build); ``OPTIMUM_SUPERWEIGHT_SPEED_CHECK=0`` and
    ``set_speed_check(False)`` choose it too (for example to benchmark a kernel on a CPU where it loses).
``timed``
    timed in every process, nothing stored (a run may then differ from the previous one on a loaded machine).

Log lines are bounded: each verdict is logged at INFO level; a WARNING is printed once per process, the first
time a shape has no kernel within :data:`STEP_ASIDE_RATIO` of dense (what to do about it, and where the rest
goes); :func:`speed_summary` (logged by ``kernels.prepare_kernels`` after each model load) sums them up.

>>> previous = kernel_choice()
>>> set_kernel_choice("fixed"); speed_check_enabled(), kernel_choice()
(False, 'fixed')
>>> set_kernel_choice(previous)
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import torch
from torch import nn

from . import verdicts as store
from .machine import cpu_name

__all__ = [
    "STEP_ASIDE_RATIO",
    "NOISE_FLOOR_SECONDS",
    "cpu_name",
    "set_speed_check",
    "speed_check_enabled",
    "set_kernel_choice",
    "kernel_choice",
    "KERNEL_CHOICES",
    "speed_summary",
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
#: Interleaved kernel/dense pairs timed again before a "slow" verdict (min of each over all rounds) ...
_CONFIRM_ROUNDS = 12
#: ... within this much of this thread's CPU time (not wall time: on a loaded machine a wall-clock deadline
#: cut the confirmation short exactly when it was needed).
_CONFIRM_BUDGET_SECONDS = 1.0
_BUDGET_SECONDS = 0.5  # per timing loop, after the warm-up call
#: The check's clock: this thread's CPU time (tests drive the decision with a fake one).
_clock: Callable[[], float] = time.thread_time


#: How kernels are chosen (see the module docstring).
KERNEL_CHOICES = ("stored", "fixed", "timed")


def _env_choice() -> str:
    check = os.environ.get("OPTIMUM_SUPERWEIGHT_SPEED_CHECK", "1").strip().lower()
    if check not in ("0", "1", "false", "true"):
        raise ValueError(f"OPTIMUM_SUPERWEIGHT_SPEED_CHECK={check!r} is invalid: use 1 (default) or 0.")
    choice = os.environ.get("OPTIMUM_SUPERWEIGHT_KERNEL_CHOICE", "").strip().lower()
    if choice and choice not in KERNEL_CHOICES:
        raise ValueError(
            f"OPTIMUM_SUPERWEIGHT_KERNEL_CHOICE={choice!r} is invalid: use one of {', '.join(KERNEL_CHOICES)}."
        )
    if check in ("0", "false"):
        return "fixed"
    return choice or "stored"


def _env_enabled() -> bool:
    return _env_choice() != "fixed"


_settings = {"choice": _env_choice()}
# signature -> {kernel name: why it stepped aside}; a signature present here has been checked.
_verdicts: dict[tuple, dict[str, str]] = {}
_events = {"checked": 0, "stepped_aside": 0, "slow": 0, "recalled": 0, "warned": 0}


def set_kernel_choice(choice: str) -> None:
    """``"stored"`` (default: timed once per machine, then reused), ``"fixed"`` (never timed: registry order) or
    ``"timed"`` (timed in every process)."""
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"kernel choice {choice!r} is invalid: use one of {', '.join(KERNEL_CHOICES)}.")
    _settings["choice"] = choice


def kernel_choice() -> str:
    return _settings["choice"]


def set_speed_check(enabled: bool) -> None:
    """Time kernels against dense (``True``: the ``"stored"`` choice) or never (``False``: ``"fixed"``)."""
    _settings["choice"] = "stored" if enabled else "fixed"


def speed_check_enabled() -> bool:
    return _settings["choice"] != "fixed"


def clear_speed_verdicts(stored: bool = False) -> None:
    """Forget this process's verdicts (and, with ``stored=True``, this machine's stored ones): the next call of
    each shape is checked again."""
    _verdicts.clear()
    if stored:
        store.forget()


def speed_verdicts() -> dict[tuple, dict[str, str]]:
    """A copy of the verdicts so far: ``{signature: {kernel name: why it stepped aside}}``."""
    return {key: dict(value) for key, value in _verdicts.items()}


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


def recall(module: nn.Module, dtype: torch.dtype, many: bool, select: Callable[[], Any]) -> Any | None:
    """The stored verdict's selection for layers like ``module`` (``"stored"`` choice), or ``None`` when there is
    none or it no longer holds (the registry now picks another kernel: a kernel was added, or failed to build)."""
    if _settings["choice"] != "stored":
        return None
    key = signature(module, dtype, many)
    stored = store.recall(key)
    if stored is None:
        return None
    _verdicts[key] = stored["stepped_aside"]
    selection = select()
    if selection.label != stored["chosen"]:
        del _verdicts[key]
        return None
    _events["recalled"] += 1
    return selection


def speed_summary() -> str | None:
    """One line on this process's speed checks so far (``None`` before any): how many layer signatures were timed
    or taken from the stored verdicts, and how many kernels stepped aside."""
    if not (_events["checked"] or _events["recalled"]):
        return None
    return (
        f"optimum-superweight kernel speed check on {cpu_name()}: {_events['checked']} layer signature(s) timed, "
        f"{_events['recalled']} taken from stored verdicts ({store.verdicts_path()}); {_events['stepped_aside']} "
        f"kernel(s) stepped aside, {_events['slow']} signature(s) with no kernel within x{STEP_ASIDE_RATIO} of dense."
    )


def _decided(module: nn.Module, dtype: torch.dtype, many: bool, chosen: Any, verdict: dict[str, str]) -> Any:
    _events["checked"] += 1
    _events["stepped_aside"] += len(verdict)
    if _settings["choice"] == "stored":
        store.remember(signature(module, dtype, many), chosen.label, verdict)
    return chosen


def _best_time(function: Callable[[], Any], repeats: int = _REPEATS, warm_up: bool = True) -> float:
    if warm_up:
        function()  # caches, lazy layouts, a one-off compilation
    best, spent = float("inf"), 0.0
    for _ in range(repeats):
        start = _clock()
        function()
        elapsed = _clock() - start
        best, spent = min(best, elapsed), spent + elapsed
        if spent > _BUDGET_SECONDS:  # a pathological kernel is timed once, not many times
            break
    return best


def _too_slow(seconds: float, dense: float) -> bool:
    return seconds > STEP_ASIDE_RATIO * dense and seconds - dense > NOISE_FLOOR_SECONDS


def _confirmed_times(kernel: Callable[[], Any], dense: Callable[[], Any], first: tuple[float, float]) -> tuple[float, float]:
    """Time both again, interleaved, before a verdict of "slow": on a loaded machine one descheduled thread
    of a parallel kernel can stall a call for a whole time slice, and other processes sharing the caches slow
    one call more than the next: such stalls must not pass for the CPU. The minimum of each over every round
    decides (all rounds, or as many as the CPU-time budget allows)."""
    seconds, reference = first
    spent = 0.0
    for _ in range(_CONFIRM_ROUNDS):
        if spent > _CONFIRM_BUDGET_SECONDS:
            break
        kernel_time, dense_time = _best_time(kernel, 1, warm_up=False), _best_time(dense, 1, warm_up=False)
        seconds, reference, spent = min(seconds, kernel_time), min(reference, dense_time), spent + kernel_time + dense_time
    return seconds, reference


def _dense(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What a kernel is measured against: the dense ``F.linear`` the user would run without this package."""
    return nn.functional.linear(rows, weight, bias)


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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _check_speed(module, x, many, select, run, is_last_resort)
    finally:
        torch.set_num_threads(threads)


def _check_speed(module, x, many, select, run, is_last_resort) -> Any:
    """:func:`check_speed` on one torch thread, timed in this thread's CPU time: the ratio of a kernel to dense
    then counts only their work, not the time other processes take the cores (on a loaded machine a 2-thread call
    can wait a whole time slice for a descheduled thread, and such waits made verdicts differ between runs)."""
    verdict = _verdicts.setdefault(signature(module, x.dtype, many), {})
    rows = x.reshape(-1, x.shape[-1])[:_PROBE_ROWS]
    shape = _describe(module, rows.shape[0], x.dtype)
    with torch.no_grad():
        weight = module.dequantize_weight(x.dtype)
        bias = None if module.bias is None else module.bias.to(x.dtype)
        run_dense = lambda: _dense(rows, weight, bias)  # noqa: E731
        dense = _best_time(run_dense)
        measured: list[tuple[float, Any]] = []
        while True:
            selection = select()
            run_kernel = lambda: run(selection, rows)  # noqa: E731
            if is_last_resort(selection.kernel):
                if not measured:
                    return _decided(module, x.dtype, many, selection, verdict)
                measured.append((_best_time(run_kernel), selection))
                break
            seconds = _best_time(run_kernel)
            if _too_slow(seconds, dense):
                seconds, dense = _confirmed_times(run_kernel, run_dense, (seconds, dense))
            if not _too_slow(seconds, dense):
                if measured:
                    logger.info(
                        "optimum-superweight: %s on %s: %s; running %s instead (x%.2f of dense).",
                        shape, cpu_name(), "; ".join(verdict.values()), selection.label, seconds / dense,
                    )
                return _decided(module, x.dtype, many, selection, verdict)
            verdict[selection.label] = (
                f"{selection.label} stepped aside, x{seconds / dense:.1f} of dense F.linear "
                f"({seconds * 1e3:.3f} vs {dense * 1e3:.3f} ms)"
            )
            measured.append((seconds, selection))
    seconds, chosen = min(measured, key=lambda item: item[0])
    verdict.pop(chosen.label, None)
    _events["slow"] += 1
    message = (
        f"optimum-superweight: no kernel within x{STEP_ASIDE_RATIO:.1f} of dense F.linear for {shape} on {cpu_name()} "
        f"({dense * 1e3:.3f} ms): running the fastest, {chosen.label} (x{seconds / dense:.2f}). Measured: "
        + ", ".join(f"{s.label} x{t / dense:.2f}" for t, s in measured) + "."
    )
    if _events["warned"]:
        logger.info("%s", message)
    else:
        _events["warned"] += 1
        logger.warning(
            "%s Further shapes like this are logged at INFO level (kernels.speed_summary() counts them). bfloat16 "
            "inputs run the fastest kernels: load the model with dtype=torch.bfloat16, or let float32 layers compute "
            "in bfloat16 where needed (float32 policy 'auto', the default, or 'bfloat16': kernels.set_float32_policy).",
            message,
        )
    return _decided(module, x.dtype, many, chosen, verdict)
