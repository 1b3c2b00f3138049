"""Build the package's C++ CPU kernels (``kernels/csrc/``) at first use, once per machine.

``torch.utils.cpp_extension.load`` compiles a source with the machine's C++ compiler and ninja into the kernel
cache (:func:`cache_root`: ``OPTIMUM_SUPERWEIGHT_KERNEL_CACHE``, else torch's ``TORCH_EXTENSIONS_DIR``, else
``~/.cache/torch_extensions/py3X_cpu``); later processes import the cached library directly, in well under a
second. The code is compiled for the CPU at hand (``-march=native``), so the cache entry's name carries a digest
of the source, the torch version and the CPU's model and flags: a cache shared between different CPUs never
hands one of them a library with instructions it lacks. ``-ffp-contract=off`` keeps every float operation as
written (no fused multiply-add), so decoded weights round exactly as the reference dequantization's.

A build never hangs nor fails the user's call:

- The CPU's features are checked first: a source that needs AVX-512 is not compiled on a CPU without it.
- One process builds at a time, under an OS file lock (``fcntl.flock`` on ``<entry>/optimum_superweight.lock``)
  that dies with its owner; the others wait (at most :data:`STALE_LOCK_SECONDS`), then import what it built.
- torch's own lock file (``<entry>/lock``), left behind when a build is killed (SIGKILL, an OOM kill, a CI
  timeout) and on which ``torch.utils.cpp_extension`` would wait forever, is removed when no process holds it
  open or it is older than :data:`STALE_LOCK_SECONDS`, with one log line.
- A cached library that fails to import (a truncated or corrupt file) is rebuilt once, with one log line.
- No compiler or ninja, a read-only cache, a compiler error: :func:`load` returns ``None``, the reason is logged
  once, and the kernels that need the library report themselves unsupported with that reason, so the
  dispatcher falls back to the pure-PyTorch kernels.

``OPTIMUM_SUPERWEIGHT_NATIVE=0`` (or ``set_native_kernels(False)``) skips the build.

>>> enabled = native_kernels_enabled()
>>> set_native_kernels(False); load("tiled_linear") is None, native_failure("tiled_linear")
(True, 'native kernels disabled (OPTIMUM_SUPERWEIGHT_NATIVE=0 or set_native_kernels(False))')
>>> set_native_kernels(enabled)
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch

from . import machine
from .machine import cache_root, cpu_features, cpu_name

try:  # POSIX: a lock that the OS releases when its owner dies
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "load",
    "native_failure",
    "set_native_kernels",
    "native_kernels_enabled",
    "cache_root",
    "cpu_features",
    "CSRC",
    "STALE_LOCK_SECONDS",
]

logger = logging.getLogger(__name__)

#: Where the C++ sources live (shipped as package data).
CSRC = Path(__file__).resolve().parent / "csrc"
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off"]
#: A build lock this old is stale whoever holds it: a build takes about a minute, even on a loaded machine
#: rarely ten; a process waiting for another's build gives up (and falls back) after as long.
STALE_LOCK_SECONDS = 15 * 60
_LOCK_NAME = "optimum_superweight.lock"
_TORCH_LOCK = "lock"  # torch.utils.file_baton.FileBaton's file in the build directory
_POLL_SECONDS = 0.2
_LIBRARY_SUFFIX = ".pyd" if sys.platform == "win32" else ".so"


def _env_enabled() -> bool:
    value = os.environ.get("OPTIMUM_SUPERWEIGHT_NATIVE", "1").strip().lower()
    if value not in ("0", "1", "false", "true"):
        raise ValueError(f"OPTIMUM_SUPERWEIGHT_NATIVE={value!r} is invalid: use 1 (default) or 0.")
    return value in ("1", "true")


_settings = {"enabled": _env_enabled()}
_loaded: dict[str, ModuleType | None] = {}
_failures: dict[str, str] = {}
_DISABLED = "native kernels disabled (OPTIMUM_SUPERWEIGHT_NATIVE=0 or set_native_kernels(False))"


class _Unavailable(Exception):
    """A reason not to build (CPU features, compiler, cache): logged as is, without a traceback's type."""


def set_native_kernels(enabled: bool) -> None:
    """Use the compiled CPU kernels when they build (default) or never; re-enabling retries a failed build."""
    _settings["enabled"] = bool(enabled)
    if enabled:
        for name in [n for n, module in _loaded.items() if module is None]:
            del _loaded[name]
            _failures.pop(name, None)


def native_kernels_enabled() -> bool:
    return _settings["enabled"]


def _missing_features(requires: tuple[str, ...]) -> list[str]:
    features = cpu_features()
    if features is None:  # unknown (no /proc/cpuinfo): compile, and let the library say what it has
        return []
    return [flag for flag in requires if flag not in features]


def _extension_name(name: str, source: str) -> str:
    digest = hashlib.sha256()
    for part in (source, torch.__version__, cpu_name(), machine.cpu_flags_line(), " ".join(_FLAGS)):
        digest.update(part.encode())
        digest.update(b"\0")
    return f"optimum_superweight_{name}_{digest.hexdigest()[:16]}"


def _import_library(extension: str, path: Path) -> ModuleType:
    """Import a built library directly (no ninja run): the name carries the source digest, so the file at that
    name was built from this source (or is damaged, which the import reports)."""
    spec = importlib.util.spec_from_file_location(extension, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_toolchain() -> None:
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise _Unavailable(f"no C++ compiler ({compiler!r} not found; set CXX or install g++)")
    if not cpp_extension.is_ninja_available():
        raise _Unavailable("ninja not found (pip install ninja)")


def _writable_directory(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise _Unavailable(f"kernel cache {directory} is not writable ({type(error).__name__}: {error.strerror})") from None


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """Hold the entry's build lock (wait for another process's build, at most :data:`STALE_LOCK_SECONDS`)."""
    if fcntl is None:
        yield
        return
    handle = open(directory / _LOCK_NAME, "a+")  # noqa: SIM115 - closed below; never deleted (others may hold it)
    try:
        deadline, announced = time.monotonic() + STALE_LOCK_SECONDS, False
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise _Unavailable(
                        f"another process has been building in {directory} for over {STALE_LOCK_SECONDS} s"
                    ) from None
                if not announced:
                    logger.info("optimum-superweight: waiting for another process's kernel build in %s.", directory)
                    announced = True
                time.sleep(_POLL_SECONDS)
            except OSError:  # a filesystem without locks: torch's lock file still orders the builds
                break
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {time.time():.0f}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


def _lock_holders(path: Path) -> list[int] | None:
    """Processes with ``path`` open (Linux ``/proc``), or ``None`` where that cannot be told."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    target, holders = str(path.resolve()), []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) == target for fd in (entry / "fd").iterdir()):
                holders.append(int(entry.name))
        except OSError:  # the process ended, or is not ours to look at
            continue
    return holders


def _clear_stale_torch_lock(directory: Path) -> None:
    """Remove torch's lock file when its owner is gone or it is too old (we hold our own lock: no process of
    this package is building here)."""
    path = directory / _TORCH_LOCK
    deadline = time.monotonic() + STALE_LOCK_SECONDS
    while path.exists():
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return
        holders = _lock_holders(path)
        if age > STALE_LOCK_SECONDS or not holders or time.monotonic() > deadline:
            owner = "no process holds it" if not holders else f"{age:.0f} s old"
            logger.warning(
                "optimum-superweight: removed a stale kernel build lock %s (%s: a build was killed); building again.",
                path, owner,
            )
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        time.sleep(_POLL_SECONDS)  # an older copy of the package (without our lock) is building: let it finish


def _wipe(directory: Path) -> None:
    """Everything of a build entry but our lock file (a damaged library is rebuilt from its source)."""
    for child in directory.iterdir():
        if child.name == _LOCK_NAME:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                child.unlink()


def _forget_torch_version(extension: str) -> None:
    """torch remembers, per process, that it built ``extension`` and would skip the rebuild of a wiped entry."""
    from torch.utils import cpp_extension

    entries = getattr(getattr(cpp_extension, "JIT_EXTENSION_VERSIONER", None), "entries", None)
    if isinstance(entries, dict):
        entries.pop(extension, None)


def _compile(name: str, requires: tuple[str, ...] = ()) -> ModuleType:
    """Import ``csrc/<name>.cpp``'s cached library, or build it; raises on any failure."""
    missing = _missing_features(requires)
    if missing:
        raise _Unavailable(f"this CPU lacks {', '.join(missing)} (the kernel needs {', '.join(requires)}); not built")
    path = CSRC / f"{name}.cpp"
    extension = _extension_name(name, path.read_text(encoding="utf-8"))
    directory = cache_root() / extension
    library = directory / f"{extension}{_LIBRARY_SUFFIX}"
    if library.is_file():
        with contextlib.suppress(ImportError):  # damaged, or still being linked by another process: see below
            return _import_library(extension, library)
    _check_toolchain()
    _writable_directory(directory)
    with _build_lock(directory):
        damaged = None
        if library.is_file():  # built by another process while we waited, or damaged (truncated by a killed link)
            try:
                return _import_library(extension, library)
            except ImportError as error:
                damaged = error
        _clear_stale_torch_lock(directory)
        return _build(name, path, extension, directory, damaged)


def _build(name: str, path: Path, extension: str, directory: Path, damaged: ImportError | None) -> ModuleType:
    from torch.utils import cpp_extension

    if damaged is not None:
        logger.warning(
            "optimum-superweight: the cached native CPU kernel %r failed to import (%s); rebuilding it once in %s.",
            name, (str(damaged).strip().splitlines() or [""])[0][:200], directory,
        )
        _wipe(directory)
        _forget_torch_version(extension)
    else:
        logger.warning(
            "optimum-superweight: building the native CPU kernel %r for this machine (once; about a minute) in %s.",
            name, directory,
        )
    start = time.perf_counter()
    module = cpp_extension.load(
        name=extension, sources=[str(path)], extra_cflags=_FLAGS, build_directory=str(directory), verbose=False
    )
    logger.info("optimum-superweight: native CPU kernel %r ready (%.1f s).", name, time.perf_counter() - start)
    return module


def load(name: str, requires: tuple[str, ...] = ()) -> ModuleType | None:
    """The compiled ``csrc/<name>.cpp`` (built on the first call), or ``None`` if disabled, the CPU lacks one of
    the instruction-set flags ``requires`` (``/proc/cpuinfo`` names), or the build failed (:func:`native_failure`
    says why; logged once)."""
    if not _settings["enabled"]:
        return None
    if name not in _loaded:
        try:
            _loaded[name] = _compile(name, requires)
        except _Unavailable as reason:
            _fail(name, str(reason), hint=not str(reason).startswith("this CPU lacks"))
        except Exception as error:  # noqa: BLE001 - any build failure: fall back, never fail the user's call
            first_line = (str(error).strip().splitlines() or [""])[0][:300]
            _fail(name, f"native build failed ({type(error).__name__}: {first_line})")
    return _loaded[name]


def _fail(name: str, reason: str, hint: bool = True) -> None:
    _failures[name] = reason
    _loaded[name] = None
    logger.warning(
        "optimum-superweight: no native CPU kernel %r (%s); the PyTorch kernels run instead (same results, slower "
        "prefill).%s",
        name, reason,
        " A C++ compiler (g++), ninja and a writable kernel cache are needed; OPTIMUM_SUPERWEIGHT_NATIVE=0 skips the "
        "attempt." if hint else "",
    )


def native_failure(name: str) -> str | None:
    """Why :func:`load` gives ``None`` for ``name`` (``None`` if it was not tried or succeeded)."""
    if not _settings["enabled"]:
        return _DISABLED
    return _failures.get(name)
