"""Row blocks fitted in a thread pool: the same codes as one block after the other and as the whole matrix."""

from __future__ import annotations

import threading

import pytest
import torch

from optimum_superweight import SuperWeightConfig
from optimum_superweight.tensor import rows
from optimum_superweight.tensor.methods import code_chooser, code_settings

CONFIGS = {
    "default (weighted HQQ)": SuperWeightConfig(),
    "data-free HQQ": SuperWeightConfig(importance="none"),
    "rtn": SuperWeightConfig(method="rtn"),
    "3-bit uint8 zero-points": SuperWeightConfig(bits=3, zero_point="uint8"),
    "symmetric clip search": SuperWeightConfig(method="rtn", clip_search=True, symmetric=True),
}


def _layers(seed: int = 0) -> dict[str, rows.LayerWeight]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {"q": (96, 256), "down": (130, 384), "k": (40, 256), "up": (200, 128)}
    layers = {}
    for name, (out_features, in_features) in shapes.items():
        weight = torch.randn(out_features, in_features, generator=generator) * 0.02
        weight[7, 11] = 3.0  # a super weight, held out
        energy = torch.rand(in_features, generator=generator) ** 4
        layers[name] = rows.LayerWeight(weight, [(7, 11), (out_features - 1, 3)], energy)
    return layers


def _fields(q) -> list:
    return [q.packed, q.scale, q.zero_point, q.offset]


def _assert_same(a, b) -> None:
    for x, y in zip(_fields(a), _fields(b)):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y)


@pytest.mark.parametrize("label", list(CONFIGS))
def test_pool_gives_the_serial_and_the_whole_matrix_codes(monkeypatch, label):
    config = CONFIGS[label]
    monkeypatch.setattr(rows, "BLOCK_BYTES", 4 * 256 * 24)  # several blocks per layer, some short
    layers = _layers()
    serial = rows.quantize_layers(layers, config, workers=1)
    pooled = rows.quantize_layers(layers, config, workers=2)
    three = rows.quantize_layers(layers, config, workers=3)
    choose, settings = code_chooser(config), code_settings(config)
    for name, layer in layers.items():
        whole = choose(layer.weight, settings, torch.tensor(layer.coordinates), layer.hessian)
        _assert_same(serial[name], whole)
        _assert_same(pooled[name], whole)
        _assert_same(three[name], whole)
        one = rows.quantize_by_rows(layer.weight, layer.coordinates, config, layer.hessian, workers=2)
        _assert_same(one, whole)


def test_blocks_run_on_one_intra_op_thread_in_several_threads_and_the_count_is_restored(monkeypatch):
    seen: list[tuple[str, int]] = []
    chooser = code_chooser(SuperWeightConfig(method="rtn"))

    def recording(weight, settings, holdout, hessian=None):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return chooser(weight, settings, holdout, hessian)

    monkeypatch.setattr(rows, "code_chooser", lambda config: recording)
    monkeypatch.setattr(rows, "BLOCK_BYTES", 4 * 256 * 16)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rows.quantize_layers(_layers(), SuperWeightConfig(method="rtn"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert {threads for _, threads in seen} == {1}
    assert all(name.startswith("superweight-fit") for name, _ in seen)


def test_one_layer_is_split_so_that_every_worker_has_a_block(monkeypatch):
    calls: list[int] = []
    chooser = code_chooser(SuperWeightConfig(method="rtn"))

    def recording(weight, settings, holdout, hessian=None):
        calls.append(weight.shape[0])
        return chooser(weight, settings, holdout, hessian)

    monkeypatch.setattr(rows, "code_chooser", lambda config: recording)
    layer = _layers()["down"]
    rows.quantize_by_rows(layer.weight, layer.coordinates, SuperWeightConfig(method="rtn"), workers=2)
    assert sorted(calls) == [65, 65]


def test_on_layer_reports_every_layer_once_and_errors_propagate():
    layers = _layers()
    finished: list[str] = []
    rows.quantize_layers(layers, SuperWeightConfig(), workers=2, on_layer=finished.append)
    assert sorted(finished) == sorted(layers)
    broken = dict(layers, k=rows.LayerWeight(layers["k"].weight, [], torch.rand(5)))  # wrong importance length
    before = torch.get_num_threads()
    with pytest.raises(ValueError, match="importance has shape"):
        rows.quantize_layers(broken, SuperWeightConfig(), workers=2)
    assert torch.get_num_threads() == before


def test_single_intra_op_thread_restores_the_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with rows.single_intra_op_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_pool_keeps_the_callers_cores_inside_one_intra_op_thread():
    # The quantizer runs detection, calibration and building on one intra-op thread; the fitting pool inside
    # must still use the cores the caller allowed, and nesting keeps the outermost count.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with rows.single_intra_op_thread():
            assert torch.get_num_threads() == 1
            assert rows.allowed_threads() == 2 and rows.fitting_workers(8) == 2
            with rows.single_intra_op_thread():
                assert rows.allowed_threads() == 2
            assert rows.allowed_threads() == 2
        assert rows.allowed_threads() == 2 and torch.get_num_threads() == 2
        torch.set_num_threads(1)
        assert rows.allowed_threads() == 1 and rows.fitting_workers(8) == 1
    finally:
        torch.set_num_threads(before)


def test_allowed_intra_op_threads_gives_the_callers_count_back_inside():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with rows.single_intra_op_thread():
            with rows.allowed_intra_op_threads():
                assert torch.get_num_threads() == 2
            assert torch.get_num_threads() == 1
        with rows.allowed_intra_op_threads():
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
