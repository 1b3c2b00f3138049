"""Progress bars of the long steps: shown by default, off with transformers' and tqdm's switches."""

from __future__ import annotations

import pytest
from transformers.utils import logging as hf_logging

from optimum_superweight import SuperWeightConfig, detect_super_weights, quantize_model
from optimum_superweight import progress
from optimum_superweight.testing import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread", "bars_shown_at_once")


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


def test_routed_library_bars_follow_our_switches_and_are_restored(monkeypatch, capsys):
    import types

    made = []
    library = types.SimpleNamespace(tqdm=lambda *args, **kwargs: made.append(kwargs))
    with progress.routed_tqdm(library):
        assert list(library.tqdm([1, 2, 3], desc="Compressing model")) == [1, 2, 3]
        monkeypatch.setenv("TQDM_DISABLE", "1")
        assert list(library.tqdm([4], "Writing", unit="byte", unit_scale=True)) == [4]
    assert "Compressing model" in capsys.readouterr().err  # the first bar, shown; the second, off: nothing
    library.tqdm(desc="own")
    assert made == [{"desc": "own"}]  # the library's own tqdm is back
    with progress.routed_tqdm(types.SimpleNamespace()):  # a library version without the name: nothing to route
        pass


def _perplexity() -> float:
    from optimum_superweight import perplexity
    from optimum_superweight.testing import tiny_tokenizer

    model = build_tiny_model("llama", super_weights=[(1, 5, 7)])
    return perplexity(model, tiny_tokenizer(), max_tokens=256, window=64, batch_size=1).ppl


def test_perplexity_shows_a_bar_by_default(capsys):
    _perplexity()
    captured = capsys.readouterr()
    assert "perplexity" in captured.err and "4/4" in captured.err  # 256 tokens in windows of 64, one per batch
    assert "perplexity" not in captured.out


@pytest.mark.parametrize("switch", ["HF_HUB_DISABLE_PROGRESS_BARS", "transformers"])
def test_perplexity_bar_follows_the_switches(switch, monkeypatch, capsys):
    if switch == "transformers":
        hf_logging.disable_progress_bar()
    else:
        monkeypatch.setenv(switch, "1")
    _perplexity()
    assert "perplexity" not in capsys.readouterr().err


def test_saving_shows_transformers_bar_over_the_shards_and_none_when_off(tiny_llama_dir, tmp_path, capsys):
    """The time of a save is in writing the shards (a bar of transformers' own, following the same switches); the
    all-or-nothing staging around it only renames files and canonicalizes headers."""
    from transformers import AutoModelForCausalLM

    config = SuperWeightConfig(bits=4, method="rtn", super_weights=[{"module": "model.layers.1.mlp.down_proj", "row": 5,
                                                                     "col": 7}])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config)
    capsys.readouterr()
    model.save_pretrained(tmp_path / "on")
    assert "Writing model shards" in capsys.readouterr().err
    hf_logging.disable_progress_bar()
    model.save_pretrained(tmp_path / "off")
    assert "%|" not in capsys.readouterr().err


def test_cli_quantize_stdout_has_no_bar(tiny_llama_dir, tmp_path, capsys):
    from optimum_superweight.cli import main

    assert main(["quantize", str(tiny_llama_dir), str(tmp_path / "q"), "--method", "rtn",
                 "--super-weight", "model.layers.1.mlp.down_proj:5,7"]) == 0
    captured = capsys.readouterr()
    assert "choosing codes" in captured.err and "Writing model shards" in captured.err
    assert "%|" not in captured.out and captured.out.startswith("quantized ")
