"""The speed check's decision, driven by a fake clock (no timing of this machine): a burst of load does not
pass for a slow kernel, a float32 kernel that loses routes the layer to bfloat16 with one INFO line, and real
slowness is still reported."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import pytest
import torch
from torch import nn

from optimum_superweight import SuperWeightLinear, kernels
from optimum_superweight.kernels import guard, verdicts

DENSE = 0.010  # seconds per dense call on the fake clock


class FakeClock:
    """The check's clock: advances only when a fake-cost call runs."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ScriptedKernel:
    """Exact results (dense on the dequantized weight); each call costs the next of ``costs`` on the fake clock
    (the last one repeats), for the dtypes it accepts."""

    def __init__(self, name: str, clock: FakeClock, costs: Iterable[float], dtypes=(torch.float32,)) -> None:
        self.name, self.clock, self.costs, self.dtypes, self.calls = name, clock, list(costs), dtypes, 0

    def unsupported(self, module, dtype, device, tokens):
        return None if dtype in self.dtypes and device.type == "cpu" else f"{dtype} input"

    def prepare(self, module, device, dtype):
        return module.dequantize_weight(dtype)

    def run(self, module, state, x):
        self.clock.now += self.costs[min(self.calls, len(self.costs) - 1)]
        self.calls += 1
        return nn.functional.linear(x, state, None if module.bias is None else module.bias.to(x.dtype))


@pytest.fixture()
def clock(monkeypatch, tmp_path):
    """Speed check on (verdicts stored in tmp_path), the default float32 policy, a fake clock for kernels and
    dense, and a registry holding only the reference kernel for the test to fill."""
    fake = FakeClock()
    monkeypatch.setenv("OPTIMUM_SUPERWEIGHT_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(verdicts, "_loaded", {})
    monkeypatch.setattr(kernels, "_announced", set())
    monkeypatch.setattr(guard, "_events", dict.fromkeys(guard._events, 0))
    monkeypatch.setattr(guard, "_clock", fake)
    real_dense = guard._dense

    def dense(rows, weight, bias):
        fake.now += DENSE
        return real_dense(rows, weight, bias)

    monkeypatch.setattr(guard, "_dense", dense)
    monkeypatch.setattr(kernels, "_KERNELS", [kernels.REFERENCE])
    policy = kernels.float32_policy()
    kernels.set_float32_policy(kernels.DEFAULT_FLOAT32_POLICY)
    guard.set_speed_check(True)
    guard.clear_speed_verdicts()
    yield fake
    guard.set_speed_check(False)
    guard.clear_speed_verdicts()
    kernels.set_float32_policy(policy)


def _register(*registered) -> None:
    kernels._KERNELS[:0] = list(registered)


def _layer(in_features: int = 256) -> SuperWeightLinear:
    torch.manual_seed(0)
    return SuperWeightLinear.from_linear(nn.Linear(in_features, 128), bits=4, group_size=64, super_weights=[(5, 7)])


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_default_float32_policy_is_auto():
    assert kernels.DEFAULT_FLOAT32_POLICY == "auto"


def test_a_burst_of_load_at_first_use_does_not_pass_for_a_slow_kernel(clock, caplog):
    # Warm-up and the three first timings x3.2 of dense (another job thrashing the caches), then x1.1.
    kernel = ScriptedKernel("test-f32", clock, [3.2 * DENSE] * 4 + [1.1 * DENSE])
    _register(kernel)
    layer = _layer()
    with caplog.at_level(logging.INFO), torch.no_grad():
        layer(torch.randn(2, 256))
    assert layer.kernel == "test-f32"
    assert not guard.speed_verdicts()[next(iter(guard.speed_verdicts()))]  # nothing stepped aside
    assert not _warnings(caplog) and "stepped aside" not in caplog.text


def test_a_kernel_slow_in_every_round_steps_aside(clock, caplog):
    slow = ScriptedKernel("test-slow", clock, [3.2 * DENSE], dtypes=(torch.bfloat16,))
    fast = ScriptedKernel("test-fast", clock, [0.9 * DENSE], dtypes=(torch.bfloat16,))
    _register(slow, fast)
    layer = _layer()
    with caplog.at_level(logging.INFO), torch.no_grad():
        layer(torch.randn(2, 256, dtype=torch.bfloat16))
    assert layer.kernel == "test-fast"
    assert slow.calls == 1 + guard._REPEATS + guard._CONFIRM_ROUNDS  # confirmed in every round before the verdict
    assert "test-slow stepped aside, x3.2 of dense" in caplog.text and not _warnings(caplog)


def test_a_losing_float32_kernel_routes_to_bfloat16_with_one_info_line(clock, caplog):
    float32_kernel = ScriptedKernel("test-f32", clock, [3.2 * DENSE])
    _register(float32_kernel, ScriptedKernel("test-bf16", clock, [0.6 * DENSE], dtypes=(torch.bfloat16,)))
    with caplog.at_level(logging.DEBUG), torch.no_grad():
        layers = [_layer(width) for width in (256, 320)]  # two layer shapes, each checked
        outputs = [(layer, x, layer(x)) for layer, x in ((layer, torch.randn(3, layer.in_features)) for layer in layers)]
    for layer, x, y in outputs:
        assert layer.kernel == "test-bf16+bf16-cast" and y.dtype == torch.float32
        torch.testing.assert_close(y, kernels.REFERENCE.run(layer, None, x), rtol=2e-2, atol=2e-2)
    assert not _warnings(caplog)
    said = [r for r in caplog.records if r.levelno == logging.INFO and "float32 input computed in bfloat16" in r.getMessage()]
    assert len(said) == 1, caplog.text
    # The choice is stored: the next process makes it again without timing.
    guard.clear_speed_verdicts()
    timed = float32_kernel.calls
    other = _layer(256)
    with torch.no_grad():
        other(torch.randn(3, 256))
    assert other.kernel == "test-bf16+bf16-cast" and float32_kernel.calls == timed


def test_real_slowness_is_still_a_warning(clock, caplog):
    # float32 and bfloat16 kernels both lose to float32 dense; the reference is slower still.
    _register(
        ScriptedKernel("test-f32", clock, [3.0 * DENSE]),
        ScriptedKernel("test-bf16", clock, [2.5 * DENSE], dtypes=(torch.bfloat16,)),
    )
    reference_run = kernels.REFERENCE.run

    def slow_reference(module, state, x):
        clock.now += 5 * DENSE
        return reference_run(module, state, x)

    kernels.REFERENCE.run = slow_reference
    try:
        layer = _layer()
        with caplog.at_level(logging.INFO), torch.no_grad():
            layer(torch.randn(2, 256))
    finally:
        del kernels.REFERENCE.run
    assert layer.kernel == "test-bf16+bf16-cast"  # the fastest measured
    warned = _warnings(caplog)
    assert len(warned) == 1 and "no kernel within x1.5 of dense" in warned[0] and "test-f32 x3.00" in warned[0]


def test_the_reference_policy_keeps_float32_and_warns(clock, caplog):
    kernels.set_float32_policy("reference")
    _register(
        ScriptedKernel("test-f32", clock, [3.2 * DENSE]),
        ScriptedKernel("test-bf16", clock, [0.6 * DENSE], dtypes=(torch.bfloat16,)),
    )
    layer = _layer()
    with caplog.at_level(logging.INFO), torch.no_grad():
        layer(torch.randn(2, 256))
    assert layer.kernel == "reference"  # exact float32, and the reference costs nothing on the fake clock
    assert any("no kernel within x1.5 of dense" in message for message in _warnings(caplog))


def test_confirmation_stops_at_its_cpu_time_budget(clock):
    slow = ScriptedKernel("test-slow", clock, [0.4], dtypes=(torch.bfloat16,))  # 0.4 s per call on the fake clock
    _register(slow, ScriptedKernel("test-fast", clock, [0.9 * DENSE], dtypes=(torch.bfloat16,)))
    layer = _layer()
    with torch.no_grad():
        layer(torch.randn(2, 256, dtype=torch.bfloat16))
    assert layer.kernel == "test-fast"
    # warm-up, timing loop cut by its 0.5 s budget after 2 calls, then 3 confirmation rounds until 1.0 s is spent
    assert slow.calls == 1 + 2 + 3
