"""The console script answers ``--help``, argument errors and path errors without importing torch or transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Runs the console script's entry point in a fresh interpreter and reports what it imported.
_PROBE = """
import json, sys
import optimum_superweight_entry as entry
code = entry.main(sys.argv[1:])
package = sys.modules.get("optimum_superweight")
print(json.dumps({"code": code, "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules,
                  "initialised": hasattr(package, "SuperWeightConfig")}), file=sys.stderr)
"""


def _probe(*argv: str) -> tuple[dict, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    *messages, last = done.stderr.strip().splitlines()
    return json.loads(last), done.stdout + "\n".join(messages)


@pytest.mark.parametrize("argv", [["--help"], ["quantize", "--help"], ["detect", "--help"]])
def test_help_imports_neither_torch_nor_transformers(argv):
    result, output = _probe(*argv)
    assert result == {"code": 0, "torch": False, "transformers": False, "initialised": False}
    assert "usage:" in output


def test_an_argument_error_imports_neither(tmp_path):
    result, output = _probe("quantize", str(tmp_path), str(tmp_path / "out"), "--bits", "nine")
    assert result["code"] == 2 and not result["torch"] and not result["transformers"]
    assert "invalid int value: 'nine'" in output


@pytest.mark.parametrize("argv", [
    ["quantize", "/no/such/model", "out"],
    ["detect", "./no-such-model"],
    ["perplexity", "/no/such/model"],
    ["demo", "--model", "/no/such/model"],
])
def test_a_path_error_imports_neither(argv):
    result, output = _probe(*argv)
    assert result["code"] == 2 and not result["torch"] and not result["transformers"]
    assert "does not exist" in output


def test_an_existing_output_is_refused_before_the_imports(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "file").write_text("x")
    result, output = _probe("quantize", str(model), str(tmp_path / "out"))
    assert result["code"] == 2 and not result["torch"]
    assert "exists and is not empty" in output


def test_a_command_runs_with_the_package_initialised():
    result, output = _probe("card", "--known", "huggyllama/llama-7b")
    assert result["code"] == 0 and result["initialised"]
    assert "layers[2].mlp.down_proj" in output


def test_the_importance_choices_are_the_configs():
    from optimum_superweight.cli.options import IMPORTANCE_CHOICES
    from optimum_superweight.config import IMPORTANCES

    assert IMPORTANCE_CHOICES == IMPORTANCES
