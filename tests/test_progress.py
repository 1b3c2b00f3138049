"""Progress bars of the long steps: shown by default, off with transformers' and tqdm's switches."""

from __future__ import annotations

import pytest
from transformers.utils import logging as hf_logging

from optimum_superweight import SuperWeightConfig, detect_super_weights, quantize_model
from optimum_superweight import progress
from optimum_superweight.testing import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def shown_at_once(monkeypatch):
    monkeypatch.setattr(progress, "DELAY_S", 0.0)  # the steps of tiny models are quicker than the real delay
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    yield
    if not was_enabled:
        hf_logging.disable_progress_bar()


def _quantize_and_detect() -> None:
    model = build_tiny_model("llama", super_weights=[(1, 5, 7)])
    detect_super_weights(model, confirm=False)
    quantize_model(model, SuperWeightConfig(bits=4, super_weights=[{"module": "model.layers.1.mlp.down_proj", "row": 5,
                                                                    "col": 7}]))


def test_the_long_steps_show_bars_on_stderr(capsys):
    _quantize_and_detect()
    captured = capsys.readouterr()
    assert "super-weight detection" in captured.err
    assert "calibration" in captured.err
    assert "choosing codes" in captured.err and "28/28" in captured.err  # 4 layers x 7 projections
    assert "choosing codes" not in captured.out


@pytest.mark.parametrize("switch", ["HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE", "transformers"])
def test_every_usual_switch_turns_them_off(switch, monkeypatch, capsys):
    if switch == "transformers":
        hf_logging.disable_progress_bar()
    else:
        monkeypatch.setenv(switch, "1")
    assert not progress.progress_enabled()
    _quantize_and_detect()
    captured = capsys.readouterr()
    assert "choosing codes" not in captured.err and "super-weight detection" not in captured.err
    assert "calibration" not in captured.err


def test_forward_progress_counts_calls_and_leaves_no_hook(capsys):
    import torch

    layers = [torch.nn.Linear(2, 2) for _ in range(3)]
    with progress.forward_progress(layers, desc="counting", total=6):
        for _ in range(2):
            for layer in layers:
                out = layer(torch.ones(1, 2))
                assert out.shape == (1, 2)  # the hook does not replace the output
    assert "6/6" in capsys.readouterr().err
    assert all(not layer._forward_hooks for layer in layers)


def test_progress_bar_off_is_a_plain_iterable(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    bar = progress.progress_bar([1, 2, 3], desc="x")
    assert list(bar) == [1, 2, 3]
    bar.update()
    bar.close()
