"""Build the package's C++ CPU kernels (``kernels/csrc/``) at first use, once per machine.

``torch.utils.cpp_extension.load`` compiles a source with the machine's C++ compiler and ninja into torch's
extensions cache (``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``); later processes load
the cached library in well under a second. The code is compiled for the CPU at hand (``-march=native``), so
the cache entry's name carries a digest of the source, the torch version and the CPU's model and flags: a
cache shared between different CPUs never hands one of them a library with instructions it lacks.
``-ffp-contract=off`` keeps every float operation as written (no fused multiply-add), so decoded weights
round exactly as the reference dequantization's.

A build that fails (no compiler, no ninja, a compiler error) is not an error for the user: :func:`load`
returns ``None``, the reason is logged once, and the kernels that need the library report themselves
unsupported with that reason, so the dispatcher falls back to the pure-PyTorch kernels.
``OPTIMUM_SUPERWEIGHT_NATIVE=0`` (or ``set_native_kernels(False)``) skips the build.

>>> enabled = native_kernels_enabled()
>>> set_native_kernels(False); load("tiled_linear") is None, native_failure("tiled_linear")
(True, 'native kernels disabled (OPTIMUM_SUPERWEIGHT_NATIVE=0 or set_native_kernels(False))')
>>> set_native_kernels(enabled)
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from types import ModuleType

import torch

from .guard import cpu_name

__all__ = ["load", "native_failure", "set_native_kernels", "native_kernels_enabled", "CSRC"]

logger = logging.getLogger(__name__)

#: Where the C++ sources live (shipped as package data).
CSRC = Path(__file__).resolve().parent / "csrc"
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off"]


def _env_enabled() -> bool:
    value = os.environ.get("OPTIMUM_SUPERWEIGHT_NATIVE", "1").strip().lower()
    if value not in ("0", "1", "false", "true"):
        raise ValueError(f"OPTIMUM_SUPERWEIGHT_NATIVE={value!r} is invalid: use 1 (default) or 0.")
    return value in ("1", "true")


_settings = {"enabled": _env_enabled()}
_loaded: dict[str, ModuleType | None] = {}
_failures: dict[str, str] = {}
_DISABLED = "native kernels disabled (OPTIMUM_SUPERWEIGHT_NATIVE=0 or set_native_kernels(False))"


def set_native_kernels(enabled: bool) -> None:
    """Use the compiled CPU kernels when they build (default) or never; re-enabling retries a failed build."""
    _settings["enabled"] = bool(enabled)
    if enabled:
        for name in [n for n, module in _loaded.items() if module is None]:
            del _loaded[name]
            _failures.pop(name, None)


def native_kernels_enabled() -> bool:
    return _settings["enabled"]


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return ""
    return next((line for line in text.splitlines() if line.startswith("flags")), "")


def _extension_name(name: str, source: str) -> str:
    digest = hashlib.sha256()
    for part in (source, torch.__version__, cpu_name(), _cpu_flags(), " ".join(_FLAGS)):
        digest.update(part.encode())
        digest.update(b"\0")
    return f"optimum_superweight_{name}_{digest.hexdigest()[:16]}"


def _compile(name: str) -> ModuleType:
    """Compile (or load from the cache) ``csrc/<name>.cpp``; raises on any failure."""
    from torch.utils import cpp_extension

    path = CSRC / f"{name}.cpp"
    source = path.read_text(encoding="utf-8")
    extension = _extension_name(name, source)
    try:  # a private helper: if it moves, say "building" every time rather than fail
        directory = Path(cpp_extension._get_build_directory(extension, verbose=False))
        cached = any(directory.glob(f"{extension}.*"))
    except Exception:  # noqa: BLE001
        directory, cached = "torch's extensions cache", False
    if not cached:
        logger.warning(
            "optimum-superweight: building the native CPU kernel %r for this machine (once; about a minute) in %s.",
            name, directory,
        )
    start = time.perf_counter()
    module = cpp_extension.load(name=extension, sources=[str(path)], extra_cflags=_FLAGS, verbose=False)
    logger.info("optimum-superweight: native CPU kernel %r ready (%.1f s).", name, time.perf_counter() - start)
    return module


def load(name: str) -> ModuleType | None:
    """The compiled ``csrc/<name>.cpp`` (built on the first call), or ``None`` if disabled or the build failed
    (:func:`native_failure` says why; logged once)."""
    if not _settings["enabled"]:
        return None
    if name not in _loaded:
        try:
            _loaded[name] = _compile(name)
        except Exception as error:  # noqa: BLE001 - any build failure: fall back, never fail the user's call
            first_line = (str(error).strip().splitlines() or [""])[0][:300]
            _failures[name] = f"native build failed ({type(error).__name__}: {first_line})"
            _loaded[name] = None
            logger.warning(
                "optimum-superweight: could not build the native CPU kernel %r (%s); the PyTorch kernels run "
                "instead (same results, slower prefill). A C++ compiler (g++) and ninja are needed; "
                "OPTIMUM_SUPERWEIGHT_NATIVE=0 skips the attempt.",
                name, _failures[name],
            )
    return _loaded[name]


def native_failure(name: str) -> str | None:
    """Why :func:`load` gives ``None`` for ``name`` (``None`` if it was not tried or succeeded)."""
    if not _settings["enabled"]:
        return _DISABLED
    return _failures.get(name)
