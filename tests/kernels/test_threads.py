"""Python threads and the compiled kernel: it computes without the GIL, and threads sharing one model get the
outputs one thread gets (``benchmarks/kernel_threads.py`` measures the overlap)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from optimum_superweight import SuperWeightLinear, kernels
from optimum_superweight.kernels import build, tiled
from optimum_superweight.kernels.tiled import TiledCpuKernel

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def library():
    module = build.load("tiled_linear", requires=tiled.CPU_FEATURES)
    if module is None or tiled.unavailable() is not None:
        pytest.skip(tiled.unavailable() or "native kernels unavailable")
    return module


def _layer(out_features: int, in_features: int, seed: int = 0) -> SuperWeightLinear:
    torch.manual_seed(seed)
    dense = nn.Linear(in_features, out_features)
    with torch.no_grad():
        dense.weight[5, 7] = 4.0
    return SuperWeightLinear.from_linear(
        dense, bits=4, group_size=64, symmetric=False, zero_point="float", super_weights=[(5, 7)]
    )


def test_the_compiled_kernel_computes_without_the_gil(library, one_thread):
    """While one thread is inside a long ``tiled_linear`` call, another runs Python code: it records the time of
    each of its loop turns, and one falls in the middle half of the call (with the GIL held for the whole call,
    none can: the other thread only runs just before or just after it)."""
    layer = _layer(4096, 4096)
    kernel = TiledCpuKernel()
    state = kernel.prepare(layer, CPU, torch.float32)
    weights = (state.codes, state.scale, state.zero, state.offset, state.rows, state.cols, state.values)
    x = torch.randn(384, 4096)
    library.tiled_linear(x[:16], *weights, None, state.group, state.bits, 256)  # warm: the tile buffer
    window: list[float] = []
    turns: list[float] = []
    stop = threading.Event()

    def call() -> None:
        try:
            start = time.perf_counter()
            library.tiled_linear(x, *weights, None, state.group, state.bits, 256)
            window.extend((start, time.perf_counter()))
        finally:
            stop.set()

    worker = threading.Thread(target=call)
    worker.start()
    while not stop.is_set():
        turns.append(time.perf_counter())
    worker.join()
    start, end = window
    quarter = (end - start) / 4
    inside = [t for t in turns if start + quarter < t < end - quarter]
    assert inside, f"no Python turn during the middle half of a {end - start:.3f} s call: the GIL was held"


def test_two_threads_serving_one_model_give_the_outputs_of_one(library):
    model = nn.Sequential(_layer(384, 256, 0), nn.ReLU(), _layer(256, 384, 1)).eval()
    torch.manual_seed(2)
    inputs = [
        torch.randn(tokens, 256, dtype=dtype)
        for tokens in (1, 3, 8, 40, 100)
        for dtype in (torch.float32, torch.bfloat16)
    ] * 4
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    assert kernels.kernel_summary(model, torch.float32, 100) == {"cpu-tiled": 2}
    results: dict[int, torch.Tensor] = {}

    def serve(indices: range) -> None:
        with torch.no_grad():
            for i in indices:
                results[i] = model(inputs[i])

    half = len(inputs) // 2
    threads = [threading.Thread(target=serve, args=(r,)) for r in (range(half), range(half, len(inputs)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == list(range(len(inputs)))
    for i, x in enumerate(inputs):
        assert torch.equal(results[i], expected[i]), (i, tuple(x.shape), x.dtype)
