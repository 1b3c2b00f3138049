"""The first-use speed check: a kernel far slower than dense on this CPU steps aside, with a log line."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from optimum_superweight import kernels
from optimum_superweight.kernels import guard, verdicts
from optimum_superweight.nn.linear import SuperWeightLinear


def _busy(seconds: float) -> None:
    """Work (not sleep) for ``seconds`` of this thread's CPU time: the speed check times CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


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
            _busy(self.delay)
        return nn.functional.linear(x, state, None if module.bias is None else module.bias.to(x.dtype))


@pytest.fixture()
def checked_registry(monkeypatch, tmp_path):
    """The speed check on, a clean verdict table stored in tmp_path, and a registry the test can prepend kernels
    to."""
    monkeypatch.setenv("OPTIMUM_SUPERWEIGHT_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(verdicts, "_loaded", {})
    monkeypatch.setattr(guard, "_events", dict.fromkeys(guard._events, 0))
    guard.set_speed_check(True)
    guard.clear_speed_verdicts()
    registry = list(kernels._KERNELS)
    monkeypatch.setattr(kernels, "_KERNELS", registry)
    # Only the tests' sleepy kernels (40 ms and more a call) may count as slow: the real kernels on this tiny
    # layer take about 0.1 ms, which a loaded machine has pushed past the usual 0.1 ms floor (a flaky warning).
    monkeypatch.setattr(guard, "NOISE_FLOOR_SECONDS", 0.01)
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
    with caplog.at_level("INFO", logger=guard.__name__):
        y = layer(x)
    assert layer.kernel == "cpu-int4"  # the next candidate took over
    assert "test-slow stepped aside" in caplog.text and guard.cpu_name() in caplog.text
    assert "running cpu-int4 instead" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # handled: nothing for the user to do
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
        _busy(0.25)
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


class NoisyKernel(SleepyKernel):
    """Dense results plus a tiny offset (another summation order, say): outputs tell which kernel ran."""

    def run(self, module, state, x):
        return super().run(module, state, x) + 1e-3


def _new_run() -> None:
    """What a new process starts from: no verdicts in memory (the stored file stays)."""
    guard.clear_speed_verdicts()
    verdicts._loaded.clear()


def test_the_kernel_choice_is_the_same_in_the_next_run_on_this_machine(checked_registry, tmp_path):
    """Run 1 times a kernel as slow (a loaded machine) and steps it aside; in run 2 it would time as fast, yet the
    layer runs the kernel of run 1 and gives the same outputs."""
    noisy = NoisyKernel("test-noisy", delay=0.04)
    checked_registry.insert(0, noisy)
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    first = _layer()(x)
    chosen = kernels.select_kernel(_layer(), torch.bfloat16, "cpu", 2).label
    stored = (tmp_path / "cache" / verdicts.VERDICTS_FILE)
    assert stored.is_file() and "test-noisy stepped aside" in stored.read_text()
    _new_run()
    noisy.delay, calls = 0.0, noisy.calls  # now it would win the timing
    layer = _layer()
    second = layer(x)
    assert layer.kernel == chosen != "test-noisy" and noisy.calls == calls  # not even timed again
    assert torch.equal(first, second)
    guard.set_kernel_choice("timed")  # opting out of the stored verdicts times again
    _new_run()
    layer = _layer()
    layer(x)
    assert layer.kernel == "test-noisy"


def test_the_fixed_choice_never_times_and_follows_the_registry(checked_registry, monkeypatch):
    monkeypatch.setenv("OPTIMUM_SUPERWEIGHT_KERNEL_CHOICE", "fixed")
    guard._settings["choice"] = guard._env_choice()
    slow = SleepyKernel("test-slow", delay=0.01)
    checked_registry.insert(0, slow)
    layer = _layer()
    layer(torch.randn(2, 256, dtype=torch.bfloat16))
    assert layer.kernel == "test-slow" and slow.calls == 1 and not guard.speed_verdicts()
    assert not guard.speed_check_enabled() and kernels.kernel_choice() == "fixed"


def test_one_warning_however_many_slow_shapes(checked_registry, monkeypatch, caplog):
    """Every kernel slow on four layer shapes: one WARNING (the first), the others at INFO; the summary counts them."""
    checked_registry[:0] = [SleepyKernel("test-slower", delay=0.06), SleepyKernel("test-slow", delay=0.03)]
    for name in ("cpu-tiled", "cpu-int4", "cpu-int8", "cpu-dense"):
        checked_registry[:] = [k for k in checked_registry if k.name != name]
    reference_run = kernels.REFERENCE.run

    def slow_reference(module, state, x):
        _busy(0.1)
        return reference_run(module, state, x)

    monkeypatch.setattr(kernels.REFERENCE, "run", slow_reference)
    with caplog.at_level("INFO", logger=guard.__name__):
        for width in (64, 128, 192, 256):
            torch.manual_seed(width)
            SuperWeightLinear.from_linear(nn.Linear(width, 32), bits=4, group_size=32)(
                torch.randn(2, width, dtype=torch.bfloat16)
            )
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "no kernel within x1.5" in warnings[0].getMessage()
    assert len([r for r in caplog.records if "no kernel within x1.5" in r.getMessage()]) == 4
    assert "4 layer signature(s) timed" in guard.speed_summary() and "4 signature(s) with no kernel" in guard.speed_summary()


def test_a_damaged_verdict_file_is_ignored_with_one_line(checked_registry, tmp_path, caplog):
    path = tmp_path / "cache" / verdicts.VERDICTS_FILE
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    checked_registry.insert(0, SleepyKernel("test-fast", delay=0.0))
    with caplog.at_level("INFO", logger=verdicts.__name__):
        for seed in (0, 1):
            layer = _layer(seed)
            layer(torch.randn(2, 256, dtype=torch.bfloat16))
    assert layer.kernel == "test-fast"
    assert len([r for r in caplog.records if "ignoring the kernel speed verdicts" in r.getMessage()]) == 1
    assert '"chosen": "test-fast"' in path.read_text()  # replaced by a valid file


def test_invalid_kernel_choice_names_the_variable(monkeypatch):
    monkeypatch.setenv("OPTIMUM_SUPERWEIGHT_KERNEL_CHOICE", "fastest")
    with pytest.raises(ValueError, match="OPTIMUM_SUPERWEIGHT_KERNEL_CHOICE='fastest' is invalid: use one of stored, fixed, timed"):
        guard._env_choice()
