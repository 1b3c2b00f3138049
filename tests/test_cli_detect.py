"""``optimum-superweight detect MODEL``: prints the table, writes JSON and the plot."""

from __future__ import annotations

import json

import pytest
import torch

from optimum_superweight.cli import build_parser, main
from optimum_superweight.testing import build_tiny_model, tiny_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def model_dir(tmp_path):
    path = tmp_path / "tiny-gpt2"
    build_tiny_model("gpt2", super_weights=[(1, 12, 34)]).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_detect_prints_table_and_writes_json_and_plot(model_dir, tmp_path, capsys):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    code = main(["detect", str(model_dir), "--json", str(out_json), "--plot", str(out_png), "--prompt", "Hi there!"])
    assert code == 0
    captured = capsys.readouterr()
    assert "transformer.h.1.mlp.c_proj" in captured.out and "super" in captured.out
    assert "search:" in captured.err  # progress
    data = json.loads(out_json.read_text())
    assert [(d["row"], d["col"]) for d in data["super_weights"]] == [(12, 34)]
    assert data["prompts"] == ["Hi there!"]
    assert out_png.stat().st_size > 5000


def test_detect_no_confirm_and_explicit_projection(model_dir, capsys):
    code = main(["detect", str(model_dir), "--no-confirm", "--projection", "mlp.c_proj", "--quiet"])
    assert code == 0
    captured = capsys.readouterr()
    assert "Not confirmed" in captured.out and "search:" not in captured.err


def test_detect_reports_errors_cleanly(model_dir, capsys):
    assert main(["detect", str(model_dir), "--quiet", "--projection", "mlp.nope"]) == 2
    assert "No module" in capsys.readouterr().err


def test_detect_is_registered():
    args = build_parser().parse_args(["detect", "some/model", "--layers", "1", "2"])
    assert args.command == "detect" and args.layers == [1, 2] and args.func.__module__.endswith("cli.detect")
