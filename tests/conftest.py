"""Shared fixtures: tiny planted models (fast) and the embedded SmolLM2 (slow tests)."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Kernel choice must not depend on how loaded the test machine is: the first-use speed check (timing each
# kernel against dense) is off in tests, except in tests/kernels/test_guard.py, which drives it with kernels
# of known speed.
os.environ.setdefault("OPTIMUM_SUPERWEIGHT_SPEED_CHECK", "0")

PLANTED = ("model.layers.1.mlp.down_proj", 5, 7)


def pytest_report_header(config):
    """What decides which tests skip: the hardware (skips then print their reason with -rs) and the installs."""
    import importlib.util

    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        pass
    optional = {name: importlib.util.find_spec(name) is not None for name in ("llama_cpp", "lm_eval", "gguf", "compressed_tensors")}
    return [
        f"optimum-superweight: torch {torch.__version__}, CUDA {'yes' if torch.cuda.is_available() else 'no'}, "
        f"AVX-512 {'yes' if ' avx512f' in flags else 'no'}, {torch.get_num_threads()} threads",
        "optional installs (scripts/setup.sh): " + ", ".join(f"{k} {'yes' if v else 'MISSING'}" for k, v in optional.items()),
    ]


@pytest.fixture()
def one_thread():
    """One torch thread for the test (opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny
    matrices gain nothing from two, and on a shared machine a second thread only adds scheduling stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2_path():
    from optimum_superweight.default_model import default_model_path

    return default_model_path()


@pytest.fixture()
def tiny_llama():
    from optimum_superweight.testing import build_tiny_model

    return build_tiny_model("llama", super_weights=[(1, 5, 7)])


@pytest.fixture()
def tiny_llama_dir(tiny_llama, tmp_path):
    path = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(path)
    return path


@pytest.fixture()
def bars_shown_at_once(monkeypatch):
    """Progress bars on, with no delay (the steps of tiny models are quicker than the real one), and the switches
    that turn them off cleared; transformers' switch restored after."""
    from transformers.utils import logging as hf_logging

    from optimum_superweight import progress

    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    yield
    if not was_enabled:
        hf_logging.disable_progress_bar()
