"""Float32 inputs: a float32 kernel at every token count by default; bfloat16 arithmetic only where the user
allowed it (the float32 policy "auto", the default) and no float32 kernel is fast on this CPU, said once."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from torch import nn

from optimum_superweight import SuperWeightLinear, kernels
from optimum_superweight.kernels import guard, tiled, verdicts

CPU = torch.device("cpu")


def _busy(seconds: float) -> None:
    """Work (not sleep) for ``seconds`` of this thread's CPU time: the speed check times CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


class Float32OnlyKernel:
    """Exact float32 results after sleeping ``delay`` seconds per call (a float32 kernel slow on this CPU)."""

    def __init__(self, delay: float) -> None:
        self.name, self.delay = "test-float32", delay

    def unsupported(self, module, dtype, device, tokens):
        return None if dtype == torch.float32 and device.type == "cpu" else f"{dtype} input"

    def prepare(self, module, device, dtype):
        return module.dequantize_weight(dtype)

    def run(self, module, state, x):
        _busy(self.delay)
        return nn.functional.linear(x, state, None if module.bias is None else module.bias.to(x.dtype))


def _layer(in_features: int = 256, seed: int = 0) -> SuperWeightLinear:
    torch.manual_seed(seed)
    return SuperWeightLinear.from_linear(
        nn.Linear(in_features, 128), bits=4, group_size=64, symmetric=False, zero_point="float", super_weights=[(5, 7)]
    )


@pytest.fixture()
def float32_registry(monkeypatch, tmp_path):
    """The speed check on (verdicts stored in tmp_path), a registry whose float32 kernel the test controls (and no
    cpu-tiled, which would serve float32 too), one torch thread; the float32 policy restored afterwards."""
    monkeypatch.setenv("OPTIMUM_SUPERWEIGHT_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(verdicts, "_loaded", {})
    monkeypatch.setattr(kernels, "_announced", set())
    registry = [k for k in kernels._KERNELS if k.name != "cpu-tiled"]
    monkeypatch.setattr(kernels, "_KERNELS", registry)
    # Only the test's own float32 kernel (50 ms a call) may count as slow: the real kernels on these tiny layers
    # take about 0.1 ms, and on a loaded machine that was once x12 of dense (0.009 ms) and past the usual 0.1 ms
    # floor, which made the fallback warn. What this file checks is the policy, not this CPU's speed.
    monkeypatch.setattr(guard, "NOISE_FLOOR_SECONDS", 0.01)
    policy, threads = kernels.float32_policy(), torch.get_num_threads()
    torch.set_num_threads(1)
    guard.set_speed_check(True)
    guard.clear_speed_verdicts()
    yield registry
    guard.set_speed_check(False)
    guard.clear_speed_verdicts()
    kernels.set_float32_policy(policy)
    torch.set_num_threads(threads)


def test_auto_computes_in_bfloat16_where_the_float32_kernel_is_slow_and_says_so_once(float32_registry, caplog):
    float32_registry.insert(0, Float32OnlyKernel(delay=0.05))
    kernels.set_float32_policy("auto")
    with caplog.at_level(logging.INFO, logger=kernels.__name__), torch.no_grad():
        outputs = []
        for width in (256, 320):  # two layer shapes, each checked
            layer = _layer(width)
            x = torch.randn(2, width)
            outputs.append((layer, x, layer(x)))
    for layer, x, y in outputs:
        assert layer.kernel == "cpu-int4+bf16-cast" and y.dtype == torch.float32
        reference = kernels.REFERENCE.run(layer, None, x)
        torch.testing.assert_close(y, reference, rtol=2e-2, atol=2e-2)  # bfloat16 activations
    # Chosen for speed, not a fault: said once, at INFO level, and no warning.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    said = [r for r in caplog.records if "float32 input computed in bfloat16" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "INFO", caplog.text


def test_auto_keeps_float32_where_the_float32_kernel_is_fast(float32_registry, caplog):
    float32_registry.insert(0, Float32OnlyKernel(delay=0.0))
    kernels.set_float32_policy("auto")
    layer = _layer()
    with caplog.at_level(logging.WARNING), torch.no_grad():
        layer(torch.randn(2, 256))
    assert layer.kernel == "test-float32" and not caplog.records


def test_without_permission_float32_never_computes_in_bfloat16(float32_registry):
    float32_registry.insert(0, Float32OnlyKernel(delay=0.05))
    kernels.set_float32_policy("reference")
    layer = _layer()
    with torch.no_grad():
        layer(torch.randn(2, 256))
    assert "bf16" not in layer.kernel and layer.kernel in ("test-float32", "reference")


def test_invalid_policy_names_the_choices():
    with pytest.raises(ValueError, match="use one of \\('reference', 'auto', 'bfloat16'\\)"):
        kernels.set_float32_policy("fast")


@pytest.mark.parametrize("tokens", [1, 4, 16, 128, 512])
def test_the_default_format_runs_a_float32_kernel_at_every_token_count(tokens):
    if tiled.unavailable() is not None:
        pytest.skip(tiled.unavailable())
    layer = _layer()
    assert kernels.float32_policy() == kernels.DEFAULT_FLOAT32_POLICY == "auto"
    assert kernels.select_kernel(layer, torch.float32, CPU, tokens).label == "cpu-tiled"
