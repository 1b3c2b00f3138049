"""Kernel dispatch for :class:`~optimum_superweight.nn.linear.SuperWeightLinear`.

One operation — ``y = x @ W^T + b`` with ``W`` group-quantized and its super weights exact — and several
implementations registered in order of preference (bitsandbytes-backends style). For each call the first
kernel that supports the module (bits, group size, shape), the input (dtype, device) and the token count
runs; the reference kernel (dequantize + ``F.linear``) supports everything and closes the list.

================  ===========================================================================================
kernel            when
================  ===========================================================================================
``cpu-tiled``     CPU, 2- to 8-bit codes (any group size), bfloat16 input from ``tiled.INT4_TOKENS`` + 1 (5)
                  tokens per call or where ``cpu-int4`` does not take the layer, float32/float16 input at any token count:
                  compiled at first use (C++, AVX-512); decodes tiles of output rows in cache and multiplies
                  each, or below ``tiled.MIN_TOKENS`` tokens decodes rows in registers and multiplies every
                  token there (:mod:`~optimum_superweight.kernels.tiled`)
``cpu-int4``      CPU, bfloat16 input, bits <= 4, group size a multiple of 32, out_features % 16 == 0,
                  fewer than ``dense_threshold`` tokens (decode; up to ``tiled.INT4_TOKENS`` when ``cpu-tiled`` runs)
``cpu-int8``      CPU, bfloat16 input, bits 5-8, one scale per row, fewer than ``dense_threshold`` tokens
                  (when ``cpu-tiled`` is unavailable)
``cpu-dense``     CPU, bfloat16/float16 input otherwise (prefill of other bit widths, or when the compiled
                  kernel is unavailable; shapes the int kernels refuse; inputs that need a gradient):
                  dequantize in the input dtype per call, dense GEMM
``reference``     everything else: float32 input (unless cast, below), CUDA and other devices
================  ===========================================================================================

CUDA stays on the reference path for now: torch's CUDA int4 kernel was not wired because no GPU was
available to test its (different) packing.

**Float32 inputs.** A float32 model runs ``cpu-tiled`` for 2- to 8-bit layers (exact float32 arithmetic; on AMD
EPYC within x1.1 of float32 dense ``F.linear`` from 1 to 512 tokens: "Kernels by CPU" in benchmarks/RESULTS.md)
wherever the speed check finds it within x1.5 of float32 dense on the CPU at hand. What float32 inputs may do
(``set_float32_policy`` or the environment variable ``OPTIMUM_SUPERWEIGHT_FLOAT32``):

- ``"auto"`` (default): float32 kernels where the speed check finds one within x1.5 of float32 dense on this CPU
  (or, with the check off, where one supports the layer), else the activations of that layer shape are cast to
  bfloat16 for the bfloat16 kernels (outputs cast back), said once in the log at INFO level (a choice made for
  the user, not a fault; ``kernel_summary(model, torch.float32)`` lists the layers); the choice is stored with
  the other verdicts, so it is the same in every run;
- ``"reference"``: float32 arithmetic only, whatever the speed (the reference kernel where no float32 kernel is
  within x1.5 of dense: the speed check then warns once, naming the other policies);
- ``"bfloat16"``: every quantized layer computes in bfloat16 (the rest of the model stays float32);

or load the model with ``dtype=torch.bfloat16``. ``OPTIMUM_SUPERWEIGHT_KERNELS=reference`` forces the reference everywhere;
``OPTIMUM_SUPERWEIGHT_DENSE_THRESHOLD`` (default 64) sets the token count from which ``cpu-dense`` wins.
``OPTIMUM_SUPERWEIGHT_NATIVE=0`` (or ``set_native_kernels(False)``) never builds nor runs ``cpu-tiled``; if its
build fails (no C++ compiler or ninja) it says why once in the log and the other kernels run.

Kernel layouts are built on first use and cached on the module as plain attributes — never in the
``state_dict``, so the on-disk format stays the plain packed one — and rebuilt whenever the packed weight,
its scales, zero-points or super weights are replaced or modified in place, or the device changes.
They cost about as much memory as the packed weight again; no dense copy is kept.

>>> import torch
>>> from optimum_superweight.nn.linear import SuperWeightLinear
>>> layer = SuperWeightLinear.from_linear(torch.nn.Linear(128, 64), bits=4, group_size=64)
>>> _ = layer(torch.randn(1, 128, dtype=torch.bfloat16)); layer.kernel
'cpu-int4'
>>> select_kernel(layer, torch.bfloat16, torch.device("meta"), tokens=1).label
'reference'
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from . import build, guard, ops
from .cpu import DenseCpuKernel, Int4CpuKernel, Int8CpuKernel
from .guard import cpu_name, kernel_choice, set_kernel_choice, set_speed_check, speed_check_enabled
from .reference import ReferenceKernel
from .tiled import INT4_TOKENS as TILED_INT4_TOKENS
from .tiled import MIN_TOKENS as TILED_MIN_TOKENS
from .tiled import TiledCpuKernel

__all__ = [
    "Kernel",
    "KernelSelection",
    "PackedLinear",
    "register_kernel",
    "registered_kernels",
    "select_kernel",
    "linear_forward",
    "kernel_summary",
    "prepare_kernels",
    "release_kernel_layouts",
    "set_float32_policy",
    "float32_policy",
    "set_dense_threshold",
    "dense_threshold",
    "force_reference",
    "set_native_kernels",
    "token_band",
    "set_speed_check",
    "speed_check_enabled",
    "set_kernel_choice",
    "kernel_choice",
    "cpu_name",
    "check_super_weight_indices",
]

logger = logging.getLogger(__name__)

_FLOAT32_POLICIES = ("reference", "auto", "bfloat16")
DEFAULT_FLOAT32_POLICY = "auto"
REFERENCE = ReferenceKernel()
_KERNELS: list["Kernel"] = [TiledCpuKernel(), Int4CpuKernel(), Int8CpuKernel(), DenseCpuKernel(), REFERENCE]
# Kernels worth running per token; the others are only chosen for many tokens at once or as fallbacks.
_DECODE_KERNELS = {"cpu-int4", "cpu-int8"}
# Kernels without a backward (native or int arithmetic): passed over when the input needs a gradient.
_NO_BACKWARD = _DECODE_KERNELS | {"cpu-tiled"}


def _env_policy() -> str:
    value = os.environ.get("OPTIMUM_SUPERWEIGHT_FLOAT32", DEFAULT_FLOAT32_POLICY).strip().lower()
    if value not in _FLOAT32_POLICIES:
        raise ValueError(f"OPTIMUM_SUPERWEIGHT_FLOAT32={value!r} is invalid: use one of {_FLOAT32_POLICIES}.")
    return value


def _env_threshold() -> int:
    value = os.environ.get("OPTIMUM_SUPERWEIGHT_DENSE_THRESHOLD", "64")
    try:
        threshold = int(value)
    except ValueError:
        threshold = -1
    if threshold < 1:
        raise ValueError(f"OPTIMUM_SUPERWEIGHT_DENSE_THRESHOLD={value!r} is invalid: use a positive integer.")
    return threshold


def _env_reference_only() -> bool:
    return os.environ.get("OPTIMUM_SUPERWEIGHT_KERNELS", "").strip().lower() == "reference"


_settings = {
    "float32": _env_policy(),
    "threshold": _env_threshold(),
    "reference_only": _env_reference_only(),
    "generation": 0,  # bumped on every settings change: invalidates cached selections
}
_announced: set[str] = set()


def set_float32_policy(policy: str) -> None:
    """What float32 inputs do: ``"auto"`` (default: bfloat16 where no float32 kernel is fast on this CPU, said once),
    ``"reference"`` (float32 arithmetic only) or ``"bfloat16"`` (always cast to bfloat16).

    >>> policy = float32_policy()
    >>> set_float32_policy("bfloat16"); float32_policy()
    'bfloat16'
    >>> set_float32_policy(policy)
    """
    if policy not in _FLOAT32_POLICIES:
        raise ValueError(f"float32 policy {policy!r} is invalid: use one of {_FLOAT32_POLICIES}.")
    _settings["float32"] = policy
    _settings["generation"] += 1


def float32_policy() -> str:
    return _settings["float32"]


def set_dense_threshold(tokens: int) -> None:
    """Token count per call from which the dequantize + dense GEMM path replaces the int kernels."""
    if not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"dense threshold {tokens!r} is invalid: use a positive integer.")
    _settings["threshold"] = tokens
    _settings["generation"] += 1


def dense_threshold() -> int:
    return _settings["threshold"]


def set_native_kernels(enabled: bool) -> None:
    """Use the compiled CPU kernel ``cpu-tiled`` (default; built at first use) or never (same as
    ``OPTIMUM_SUPERWEIGHT_NATIVE=0``); re-enabling retries a failed build."""
    build.set_native_kernels(enabled)
    _settings["generation"] += 1


def force_reference(enabled: bool = True) -> None:
    """Run every layer on the reference kernel (tests, benchmarks, debugging); same as
    ``OPTIMUM_SUPERWEIGHT_KERNELS=reference``."""
    _settings["reference_only"] = bool(enabled)
    _settings["generation"] += 1


@runtime_checkable
class Kernel(Protocol):
    """One way of running a packed layer's forward: the protocol of both registries (weight-only here, W8A8 in
    :mod:`.w8a8`), so a kernel of either kind is written, registered, speed-checked and selected the same way.

    ``unsupported`` returns ``None`` when the kernel can run this layer for this input, else a short reason
    (logged once); ``prepare`` builds the per-layer state it caches (repacked weights, …); ``run`` computes
    the layer's output from that state.

    >>> isinstance(REFERENCE, Kernel)
    True
    """

    name: str

    def unsupported(self, module: Any, dtype: torch.dtype, device: torch.device, tokens: int) -> str | None: ...

    def prepare(self, module: Any, device: torch.device, dtype: torch.dtype) -> Any: ...

    def run(self, module: Any, state: Any, x: torch.Tensor) -> torch.Tensor: ...


def insert_kernel(registry: list, kernel: Any, before: str, what: str = "kernel") -> None:
    """Insert ``kernel`` into ``registry`` before the kernel named ``before``, after checking it implements
    :class:`Kernel` (``name``, ``unsupported``, ``prepare``, ``run``) and that its name is new."""
    for attribute in ("name", "unsupported", "prepare", "run"):
        if not hasattr(kernel, attribute):
            raise TypeError(f"{what} {kernel!r} lacks {attribute!r}: kernels need name, unsupported, prepare and run.")
    names = [k.name for k in registry]
    if kernel.name in names:
        raise ValueError(f"a {what} named {kernel.name!r} is already registered ({names}).")
    if before not in names:
        raise ValueError(f"before={before!r} is not a registered {what}: choose one of {names}.")
    registry.insert(names.index(before), kernel)
    _settings["generation"] += 1


def register_kernel(kernel: Any, *, before: str = "reference") -> None:
    """Add a kernel (``name``, ``unsupported(module, dtype, device, tokens)``, ``prepare``, ``run``) before another."""
    insert_kernel(_KERNELS, kernel, before)


def registered_kernels() -> list[str]:
    return [k.name for k in _KERNELS]


@dataclass(frozen=True)
class KernelSelection:
    """The kernel a call runs, the dtype it computes in, and why faster kernels were passed over."""

    kernel: Any
    compute_dtype: torch.dtype
    cast: bool  # float32 input cast to bfloat16 (and the output back)
    reason: str

    @property
    def label(self) -> str:
        return self.kernel.name + ("+bf16-cast" if self.cast else "")


def token_band(module: nn.Module, tokens: int) -> int:
    """Which token counts share a kernel choice (cached per layer) and a speed verdict: ``1`` from
    ``dense_threshold()`` tokens per call, ``0`` below it; layers of the default kernels also get ``2`` for
    ``tiled.MIN_TOKENS`` up to the threshold (cpu-tiled's tiles) and ``3`` for ``tiled.INT4_TOKENS`` + 1 up to
    ``tiled.MIN_TOKENS`` - 1 (cpu-tiled's register path, where cpu-int4 keeps the fewer tokens).

    >>> from optimum_superweight.nn.linear import SuperWeightLinear
    >>> layer = SuperWeightLinear.from_linear(torch.nn.Linear(64, 32), bits=4, group_size=32)
    >>> [token_band(layer, tokens) for tokens in (1, 4, 5, 11, 12, 63, 64)]
    [0, 0, 3, 3, 2, 2, 1]
    """
    if tokens >= _settings["threshold"]:
        return 1
    if getattr(module, "select_own_kernel", None) is not None:
        return 0
    if tokens >= TILED_MIN_TOKENS:
        return 2
    return 3 if tokens > TILED_INT4_TOKENS else 0


def select_kernel(
    module: nn.Module, dtype: torch.dtype, device: torch.device | str, tokens: int = 1, requires_grad: bool = False
) -> KernelSelection:
    """The kernel ``module`` uses for ``tokens`` rows of ``dtype`` input on ``device`` (``requires_grad``: the
    input needs a gradient, which the int kernels cannot give)."""
    device = torch.device(device)
    own = getattr(module, "select_own_kernel", None)
    if own is not None:  # modules with other semantics (W8A8: kernels/w8a8.py) choose among their own kernels
        return own(dtype, device, tokens, requires_grad, _settings["reference_only"])
    if _settings["reference_only"]:
        return KernelSelection(REFERENCE, dtype, False, "OPTIMUM_SUPERWEIGHT_KERNELS=reference")
    modes = [(dtype, False)]  # (compute dtype, cast): the input's own dtype first
    if dtype == torch.float32 and device.type == "cpu" and _settings["float32"] != "reference":
        modes = [(torch.bfloat16, True)] if _settings["float32"] == "bfloat16" else [(dtype, False), (torch.bfloat16, True)]
    many = tokens >= _settings["threshold"]
    passed: list[str] = []
    for compute_dtype, cast in modes:
        for kernel in _KERNELS:
            if kernel is REFERENCE:
                continue
            label = kernel.name + ("+bf16-cast" if cast else "")
            if many and kernel.name in _DECODE_KERNELS:
                passed.append(f"{label}: {tokens} tokens >= dense threshold {_settings['threshold']}")
                continue
            if requires_grad and kernel.name in _NO_BACKWARD:
                passed.append(f"{label}: input requires grad (no backward)")
                continue
            why = kernel.unsupported(module, compute_dtype, device, tokens)
            if why is None:
                why = guard.stepped_aside(module, label, dtype, token_band(module, tokens))
            if why is None:
                return KernelSelection(kernel, compute_dtype, cast, "; ".join(passed))
            passed.append(f"{label}: {why}")
    return KernelSelection(REFERENCE, dtype, False, "; ".join(passed))


def _state_key(module: nn.Module, device: torch.device) -> tuple:
    key: list[Any] = [device]
    offset = getattr(module, "weight_offset", None)
    for tensor in (module.weight, module.weight_scale, module.weight_zero_point, offset, module.super_weight_indices, module.super_weight_values):
        key.append(None if tensor is None else (tensor.data_ptr(), tensor._version))
    return tuple(key)


def check_super_weight_indices(module: nn.Module) -> None:
    """Raise ``ValueError`` unless the layer's super-weight coordinates lie inside its matrix, one value each.

    Kernels index tiles, activations and outputs by these coordinates, and a state is rebuilt whenever they
    change (after the load-time checks), so every state build checks them.

    >>> from optimum_superweight.nn.linear import SuperWeightLinear
    >>> layer = SuperWeightLinear.from_linear(torch.nn.Linear(64, 32), bits=4, group_size=32, super_weights=[(5, 7)])
    >>> layer.super_weight_indices[0, 1] = 64
    >>> check_super_weight_indices(layer)
    Traceback (most recent call last):
    ...
    ValueError: SuperWeightLinear(32x64).super_weight_indices: entry #0 is (5, 64), outside the matrix; accepted are rows 0..31 and columns 0..63.
    """
    indices = getattr(module, "super_weight_indices", None)
    if indices is None or indices.numel() == 0:
        return
    where = f"{type(module).__name__}({module.out_features}x{module.in_features})"
    values = getattr(module, "super_weight_values", None)
    if indices.dim() != 2 or indices.shape[1] != 2 or values is None or tuple(values.shape) != (indices.shape[0],):
        raise ValueError(
            f"{where}.super_weight_indices: shape {tuple(indices.shape)} with super_weight_values of shape "
            f"{None if values is None else tuple(values.shape)}; accepted are [k, 2] coordinates and k values."
        )
    idx = indices.detach().to(torch.int64)
    bad = (idx[:, 0] < 0) | (idx[:, 0] >= module.out_features) | (idx[:, 1] < 0) | (idx[:, 1] >= module.in_features)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{where}.super_weight_indices: entry #{i} is ({int(idx[i, 0])}, {int(idx[i, 1])}), outside the matrix; "
            f"accepted are rows 0..{module.out_features - 1} and columns 0..{module.in_features - 1}."
        )


def _state(module: nn.Module, selection: KernelSelection, device: torch.device) -> Any:
    # Plain attributes, not buffers: never saved, never moved by .to() (a moved CPU layout is useless).
    cache = module.__dict__.setdefault("_kernel_states", {})
    slot = (selection.kernel.name, selection.compute_dtype)
    key = _state_key(module, device)
    entry = cache.get(slot)
    if entry is None or entry[0] != key:
        check_super_weight_indices(module)
        with torch.no_grad():
            entry = (key, selection.kernel.prepare(module, device, selection.compute_dtype))
        cache[slot] = entry
    return entry[1]


def _announce(selection: KernelSelection, dtype: torch.dtype) -> None:
    message = f"optimum-superweight: {dtype} input -> kernel {selection.label}"
    if selection.reason:
        message += f" (passed over: {selection.reason})"
    if message in _announced:
        return
    _announced.add(message)
    if selection.cast and _settings["float32"] == "auto":
        if "auto-cast" not in _announced:  # once per process, at INFO: chosen for speed, nothing for the user to fix
            _announced.add("auto-cast")
            logger.info(
                "optimum-superweight: float32 input computed in bfloat16 in quantized layers where no float32 kernel runs "
                "the layer within x%.1f of float32 dense F.linear on %s (float32 policy 'auto', the default; 'reference' keeps "
                "float32 arithmetic: kernels.set_float32_policy). kernels.kernel_summary(model, torch.float32, tokens) "
                "lists them. First: %s.",
                guard.STEP_ASIDE_RATIO, cpu_name(), message,
            )
        else:
            logger.debug("%s.", message)
    elif selection.kernel is REFERENCE and dtype == torch.float32 and "reference-float32" not in _announced:
        _announced.add("reference-float32")  # once per process; later shapes at INFO level
        logger.warning(
            "%s. The reference kernel dequantizes the whole weight on every call (slow). Load the model with "
            "dtype=torch.bfloat16, or let the quantized layers compute in bfloat16 where that is faster with the float32 "
            "policy 'auto' (the default) or always with 'bfloat16': optimum_superweight.kernels.set_float32_policy / "
            "OPTIMUM_SUPERWEIGHT_FLOAT32.",
            message,
        )
    else:
        logger.info("%s.", message)


def linear_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``SuperWeightLinear.forward``: pick the kernel for this call, build its layout if needed, run it.

    Under ``torch.compile`` the whole call is one custom op (:mod:`~optimum_superweight.kernels.ops`) that runs
    this same eager path when the compiled graph runs: no kernel state, ``data_ptr()`` or native call is traced."""
    if torch.compiler.is_compiling():
        return ops.compiled_forward(module, x)
    return _eager_forward(module, x)


def _eager_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    tokens = x.numel() // max(x.shape[-1], 1) if x.dim() else 1
    band = token_band(module, tokens)
    grad = x.requires_grad and torch.is_grad_enabled()
    selections = module.__dict__.setdefault("_kernel_selections", {})
    slot = (x.dtype, x.device, band, grad, _settings["generation"])
    selection = selections.get(slot)
    if selection is None:
        selection = _first_selection(module, x, tokens, band, grad)
        selections[slot] = selection
        _announce(selection, x.dtype)
    module.__dict__["_last_kernel"] = selection.label
    return _run(module, selection, x)


ops.set_eager_forward(_eager_forward)


def _is_reference(kernel: Any) -> bool:
    return kernel is REFERENCE or getattr(kernel, "is_reference", False)


def _run(module: nn.Module, selection: KernelSelection, x: torch.Tensor) -> torch.Tensor:
    if _is_reference(selection.kernel):
        return selection.kernel.run(module, None, x)
    state = _state(module, selection, x.device)
    if selection.cast:
        return selection.kernel.run(module, state, x.to(selection.compute_dtype)).to(x.dtype)
    return selection.kernel.run(module, state, x)


def _first_selection(module: nn.Module, x: torch.Tensor, tokens: int, band: int, grad: bool) -> KernelSelection:
    """The registry's choice, speed-checked against dense on this CPU the first time a layer shape meets it
    (:mod:`~optimum_superweight.kernels.guard`): CPU only, not while computing gradients."""
    select = lambda: select_kernel(module, x.dtype, x.device, tokens, grad)  # noqa: E731
    if (
        not guard.speed_check_enabled()
        or _settings["reference_only"]
        or grad
        or x.device.type != "cpu"
        or guard.checked(module, x.dtype, band)
    ):
        return select()
    stored = guard.recall(module, x.dtype, band, select)  # the same verdict in every run on this machine
    if stored is not None:
        return stored
    return guard.check_speed(module, x, band, select, lambda selection, rows: _run(module, selection, rows), _is_reference)


@runtime_checkable
class PackedLinear(Protocol):
    """What a kernel needs of a layer (``SuperWeightLinear`` and its subclasses): the packed codes with their
    layout, scales, zero-points and exact super weights, and the reference dequantization."""

    in_features: int
    out_features: int
    weight: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor | None
    super_weight_indices: torch.Tensor | None
    super_weight_values: torch.Tensor | None
    bias: torch.Tensor | None
    layout: Any  # tensor.quantize.GroupLayout

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor: ...


def _quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, PackedLinear)}


def kernel_summary(model: nn.Module, dtype: torch.dtype | None = None, tokens: int = 1) -> dict[str, int]:
    """How many quantized layers of ``model`` run each kernel for ``tokens`` rows of ``dtype`` (default: the
    model's dtype) on their own device.

    >>> from optimum_superweight.nn.linear import SuperWeightLinear
    >>> model = torch.nn.Sequential(SuperWeightLinear.from_linear(torch.nn.Linear(64, 32), bits=4, group_size=32))
    >>> kernel_summary(model, torch.bfloat16)
    {'cpu-int4': 1}
    >>> kernel_summary(model, torch.bfloat16, tokens=512) in ({'cpu-tiled': 1}, {'cpu-dense': 1})  # cpu-dense without AVX-512 or a compiler
    True
    """
    modules = _quantized_modules(model)
    if dtype is None:
        dtype = _model_dtype(model)
    counts = Counter(select_kernel(m, dtype, m.weight.device, tokens).label for m in modules.values())
    return dict(counts)


def _model_dtype(model: nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    for parameter in model.parameters():
        if parameter.is_floating_point() and parameter.dim() >= 2:
            return parameter.dtype
    return torch.float32


def prepare_kernels(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, dict[str, int]]:
    """Build every quantized layer's kernel layouts now (instead of at the first call) and log which kernels
    run for single-token decode and for prefill; returns that summary.

    >>> from optimum_superweight.nn.linear import SuperWeightLinear
    >>> model = torch.nn.Sequential(SuperWeightLinear.from_linear(torch.nn.Linear(64, 32), bits=4, group_size=32))
    >>> kernels = prepare_kernels(model, torch.bfloat16)
    >>> kernels["decode"], kernels["prefill"] in ({'cpu-tiled': 1}, {'cpu-dense': 1})  # cpu-dense without AVX-512 or a compiler
    ({'cpu-int4': 1}, True)
    """
    if dtype is None:
        dtype = _model_dtype(model)
    prefill_tokens = max(_settings["threshold"], 1)
    for module in _quantized_modules(model).values():
        device = module.weight.device
        for tokens in (1, prefill_tokens):
            selection = select_kernel(module, dtype, device, tokens)
            if selection.kernel is not REFERENCE:
                _state(module, selection, device)
    summary = {"decode": kernel_summary(model, dtype, 1), "prefill": kernel_summary(model, dtype, prefill_tokens)}
    logger.info("optimum-superweight kernels for %s input: decode %s, prefill %s", dtype, summary["decode"], summary["prefill"])
    speed = guard.speed_summary()
    if speed is not None:
        logger.info("%s", speed)
    return summary


def release_kernel_layouts(model: nn.Module) -> int:
    """Drop the kernel layouts (repacked codes, float32 scales...) that ``model``'s quantized layers built at load or
    at earlier calls; each is rebuilt at the next call that needs it. Returns how many were dropped.

    Layouts live as long as their layer. Training uses the prefill layouts only, so the decode layouts that
    :func:`prepare_kernels` builds at load are memory a training run never uses (``nn/lora.py`` drops them when
    an adapter wraps a layer); the kernel choices and speed verdicts are kept.

    >>> from optimum_superweight.nn.linear import SuperWeightLinear
    >>> model = torch.nn.Sequential(SuperWeightLinear.from_linear(torch.nn.Linear(64, 32), bits=4, group_size=32))
    >>> _ = prepare_kernels(model, torch.bfloat16)
    >>> release_kernel_layouts(model) >= 1, release_kernel_layouts(model)
    (True, 0)
    """
    dropped = 0
    for module in model.modules():
        states = module.__dict__.get("_kernel_states")
        if states:
            dropped += len(states)
            states.clear()
    return dropped


def kernel_label(module: nn.Module) -> str:
    """The kernel of the module's latest call; before any call, the one a bfloat16 token would use."""
    last = module.__dict__.get("_last_kernel")
    if last is not None:
        return last
    return select_kernel(module, torch.bfloat16, module.weight.device, 1).label
