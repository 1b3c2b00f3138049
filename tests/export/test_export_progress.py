"""Every long step of an export shows a bar on stderr (ours, and the libraries' own routed through ours), none with
the usual switches off, and the command line's stdout stays what scripts read."""

from __future__ import annotations

import json

import pytest
from transformers.utils import logging as hf_logging

from optimum_superweight.cli import main
from optimum_superweight.export import export

from .conftest import quantize_tiny

pytestmark = pytest.mark.usefixtures("one_thread", "bars_shown_at_once")

#: The bars of each format's steps (the tiny model: 4 layers x 7 projections, one holding the super weight).
STEPS = {
    "awq": ["export: dequantizing layers: 100%", "28/28", "AWQ export: packing tensors", "AWQ export: checking layers",
            "export: calibration", "export: re-fitting layers: 100%", "27/27", "perplexity"],
    "compressed-tensors": ["export: dequantizing layers", "compressed-tensors export: setting layers",
                           "Compressing model", "compressed-tensors export: checking codes",
                           "compressed-tensors export: decoding layers"],
    "gguf": ["export: dequantizing layers", "GGUF export: converting tensors", "Writing:"],
}
OURS = {"export:", "AWQ export", "compressed-tensors export", "GGUF export", "Compressing model", "Writing:",
        "perplexity"}


@pytest.fixture()
def float_offsets(tiny_llama_dir, tmp_path):
    """Float offsets: AWQ re-fits every layer but the super weight's (calibration, re-fit, effect all run)."""
    return quantize_tiny(tiny_llama_dir, tmp_path / "f", group_size=32, symmetric=False, zero_point="float",
                         method="hqq")


def _checkpoint(fmt, request):
    if fmt == "compressed-tensors":
        pytest.importorskip("compressed_tensors")
    return request.getfixturevalue("float_offsets" if fmt == "awq" else "tiny_checkpoint")


def _export(fmt, checkpoint, tmp_path, request):
    if fmt == "awq":
        return export(checkpoint, tmp_path / "awq", format="awq", allow_requantize=True)
    if fmt == "compressed-tensors":
        return export(checkpoint, tmp_path / "ct", format="compressed-tensors")
    converter = request.getfixturevalue("converter")
    return export(checkpoint, tmp_path / "m.gguf", format="gguf", converter=converter, pre_tokenizer="default")


@pytest.mark.parametrize("fmt", list(STEPS))
def test_each_long_step_of_an_export_shows_a_bar(fmt, tmp_path, request, capsys):
    checkpoint = _checkpoint(fmt, request)
    capsys.readouterr()
    _export(fmt, checkpoint, tmp_path, request)
    captured = capsys.readouterr()
    missing = [step for step in STEPS[fmt] if step not in captured.err]
    assert not missing, captured.err[-3000:]
    assert not any(step in captured.out for step in OURS)


# Each switch once and each format once: all of them are read by one function (progress.progress_enabled).
@pytest.mark.parametrize(("fmt", "switch"), [
    ("awq", "HF_HUB_DISABLE_PROGRESS_BARS"), ("compressed-tensors", "TQDM_DISABLE"), ("gguf", "transformers"),
])
def test_no_export_bar_with_a_switch_off(fmt, switch, tmp_path, request, monkeypatch, capsys):
    checkpoint = _checkpoint(fmt, request)
    capsys.readouterr()
    if switch == "transformers":
        hf_logging.disable_progress_bar()
    else:
        monkeypatch.setenv(switch, "1")  # set after tqdm and transformers were imported: read at every bar
    _export(fmt, checkpoint, tmp_path, request)
    err = capsys.readouterr().err
    assert not [step for step in OURS if step in err], err[-3000:]
    if switch == "transformers":  # transformers' own bars (loading, saving) follow it too: no bar at all
        assert "%|" not in err, err[-3000:]


def test_cli_export_stdout_is_the_summary_and_bars_go_to_stderr(float_offsets, tmp_path, capsys):
    capsys.readouterr()
    assert main(["export", str(float_offsets), str(tmp_path / "awq"), "--format", "awq", "--requantize"]) == 0
    captured = capsys.readouterr()
    summary, _, last = captured.out.rstrip("\n").rpartition("\n")
    assert json.loads(summary)["format"] == "awq" and last.startswith("written ")
    assert "export: re-fitting layers" in captured.err and "%|" not in captured.out
