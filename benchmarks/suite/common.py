"""Shared helpers of the benchmark suite: timing, memory, model loading, the tiny model of ``--quick``."""

from __future__ import annotations

import gc
import os
import platform
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``. Not ``ru_maxrss``: a process started by ``subprocess`` inherits
    its parent's high-water mark through fork + exec, so a child of a large process would report the parent's
    peak. Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value / (1024 * 1024) if sys.platform == "darwin" else value / 1024


@contextmanager
def timed(results: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        results[key] = time.perf_counter() - start


def folder_size(path: str | os.PathLike[str], suffixes: tuple[str, ...] = (".safetensors",)) -> int:
    """Bytes of the weight files in a checkpoint folder (config and tokenizer files excluded)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and p.name.endswith(suffixes))


def machine_info() -> dict[str, Any]:
    import transformers

    try:
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except Exception:  # pragma: no cover - bitsandbytes is a dependency
        bnb_version = None
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": bnb_version,
        "load_average_at_start": list(load) if load else None,
    }


def free_memory() -> None:
    gc.collect()


def build_quick_model(folder: Path) -> Path:
    """Save the tiny Llama of :mod:`optimum_superweight.testing` (planted super weight) as a checkpoint folder."""
    from optimum_superweight.testing import build_tiny_model, tiny_tokenizer

    model = build_tiny_model("llama", super_weights=[(1, 5, 7)], num_hidden_layers=4)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


def load_model(source: str, dtype: torch.dtype = torch.float32, **kwargs: Any):
    from transformers import AutoModelForCausalLM

    import optimum_superweight  # noqa: F401  (registers the quantizer)

    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    model.eval()
    return model
