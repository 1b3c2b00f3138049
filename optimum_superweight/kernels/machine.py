"""What the kernels know of the machine they run on: the CPU's model and instruction-set flags, and the kernel
cache (compiled libraries, speed verdicts).

>>> isinstance(cpu_name(), str) and cache_root().is_absolute()
True
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from pathlib import Path

__all__ = ["cpu_name", "cpu_flags_line", "cpu_features", "cache_root"]


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


def cpu_flags_line() -> str:
    """The ``flags`` line of ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return ""
    return next((line for line in text.splitlines() if line.startswith("flags")), "")


def cpu_features() -> frozenset[str] | None:
    """The CPU's instruction-set flags (``/proc/cpuinfo``), or ``None`` where they cannot be read.

    >>> features = cpu_features(); features is None or "sse2" in features
    True
    """
    line = cpu_flags_line()
    return frozenset(line.split(":", 1)[1].split()) if ":" in line else None


def cache_root() -> Path:
    """The folder holding the compiled libraries (one entry per source, torch version and CPU) and the kernel
    speed verdicts: ``OPTIMUM_SUPERWEIGHT_KERNEL_CACHE``, else torch's ``TORCH_EXTENSIONS_DIR``, else
    ``~/.cache/torch_extensions/py3X_cpu`` (torch's default for CPU builds)."""
    configured = os.environ.get("OPTIMUM_SUPERWEIGHT_KERNEL_CACHE") or os.environ.get("TORCH_EXTENSIONS_DIR")
    if configured:
        return Path(configured).expanduser().absolute()
    from torch.utils.cpp_extension import get_default_build_root

    folder = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_cpu"
    return Path(get_default_build_root()).absolute() / folder
