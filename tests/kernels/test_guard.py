"""The first-use speed check: a kernel far slower than dense on this CPU steps aside, with a log line."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from optimum_superweight import kernels
from optimum_superweight.kernels import guard
from optimum_superweight.nn.linear import SuperWeightLinear


class SleepyKernel:
    """Exact results (dense F.linear on the dequantized weight) after sleeping ``delay`` seconds per call."""

    def __init__(self, name: str, delay: float) -> None:
        self.name, self.delay, self.calls = name, delay, 0

    def unsupported(self, module, dtype, device, tokens):
        return None if device.type == "cpu" else f"device {device.type}"

    def prepare(self, module, device, dtype):
        return module.dequantize_weight(dtype)

    def run(self, module, state, x):
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        return nn.functional.linear(x, state, None if module.bias is None else module.bias.to(x.dtype))


@pytest.fixture()
def checked_registry(monkeypatch):
    """The speed check on, a clean verdict table, and a registry the test can prepend kernels to."""
    guard.set_speed_check(True)
    guard.clear_speed_verdicts()
    registry = list(kernels._KERNELS)
    monkeypatch.setattr(kernels, "_KERNELS", registry)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a loaded machine, a 2-thread GEMM can stall on a descheduled thread
    yield registry
    torch.set_num_threads(threads)
    guard.set_speed_check(False)
    guard.clear_speed_verdicts()


def _layer(seed: int = 0) -> SuperWeightLinear:
    torch.manual_seed(seed)
    return SuperWeightLinear.from_linear(nn.Linear(256, 128), bits=4, group_size=64)


def test_a_slow_kernel_steps_aside_with_a_log_line(checked_registry, caplog):
    slow = SleepyKernel("test-slow", delay=0.04)
    checked_registry.insert(0, slow)
    layer = _layer()
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    with caplog.at_level("WARNING", logger=guard.__name__):
        y = layer(x)
    assert layer.kernel == "cpu-int4"  # the next candidate took over
    assert "test-slow stepped aside" in caplog.text and guard.cpu_name() in caplog.text
    assert "running cpu-int4 instead" in caplog.text
    torch.testing.assert_close(y.float(), kernels.REFERENCE.run(layer, None, x).float(), rtol=2e-2, atol=2e-2)
    timed = slow.calls
    # The verdict holds for the shape: another layer of the same shape never runs the slow kernel, nor is re-timed.
    other = _layer(seed=1)
    other(x)
    assert slow.calls == timed and other.kernel == "cpu-int4"
    assert "test-slow" in kernels.select_kernel(other, torch.bfloat16, "cpu", 2).reason
    assert any("test-slow" in verdict for verdict in guard.speed_verdicts().values())


def test_a_fast_kernel_keeps_the_call(checked_registry, caplog):
    checked_registry.insert(0, SleepyKernel("test-fast", delay=0.0))
    layer = _layer()
    with caplog.at_level("WARNING", logger=guard.__name__):
        layer(torch.randn(2, 256, dtype=torch.bfloat16))
    assert layer.kernel == "test-fast" and "stepped aside" not in caplog.text


def test_when_every_kernel_is_slow_the_fastest_stays(checked_registry, monkeypatch, caplog):
    checked_registry[:0] = [SleepyKernel("test-slower", delay=0.12), SleepyKernel("test-slow", delay=0.04)]
    for name in ("cpu-tiled", "cpu-int4", "cpu-int8", "cpu-dense"):  # leave the two sleepy kernels and the reference
        checked_registry[:] = [k for k in checked_registry if k.name != name]
    reference_run = kernels.REFERENCE.run

    def slow_reference(module, state, x):
        time.sleep(0.25)
        return reference_run(module, state, x)

    monkeypatch.setattr(kernels.REFERENCE, "run", slow_reference)
    layer = _layer()
    with caplog.at_level("WARNING", logger=guard.__name__):
        layer(torch.randn(2, 256, dtype=torch.bfloat16))
    assert layer.kernel == "test-slow"
    assert "running the fastest, test-slow" in caplog.text and "test-slower x" in caplog.text


def test_the_check_can_be_turned_off(checked_registry):
    guard.set_speed_check(False)
    slow = SleepyKernel("test-slow", delay=0.01)
    checked_registry.insert(0, slow)
    layer = _layer()
    layer(torch.randn(2, 256, dtype=torch.bfloat16))
    assert layer.kernel == "test-slow" and slow.calls == 1  # no timing runs


def test_invalid_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("OPTIMUM_SUPERWEIGHT_SPEED_CHECK", "maybe")
    with pytest.raises(ValueError, match="OPTIMUM_SUPERWEIGHT_SPEED_CHECK='maybe'"):
        guard._env_enabled()


def test_cpu_name_is_reported():
    assert isinstance(guard.cpu_name(), str) and guard.cpu_name()
