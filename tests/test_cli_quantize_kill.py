"""25.2: ``optimum-superweight quantize`` SIGKILLed mid-write leaves no output or the old one, never a folder that
loads as another model; the next run cleans what the killed one left and writes the new checkpoint.

The command runs in a child process through the real CLI entry (``optimum_superweight.cli.main``), killed with a
real SIGKILL at a chosen point of the shared save path (inside ``save_pretrained``, while the tokenizer is written,
around the renames that put the output in place), and once from outside at whatever point the writing has reached.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from optimum_superweight import SuperWeightLinear

ROOT = Path(__file__).resolve().parents[1]
PLANTED = "model.layers.1.mlp.down_proj:5,7"

pytestmark = pytest.mark.usefixtures("one_thread")

_CHILD = textwrap.dedent("""
    import os, signal, sys
    import transformers.modeling_utils as modeling_utils
    from transformers import PreTrainedTokenizerBase
    from optimum_superweight.cli import main

    point, output, argv = sys.argv[1], os.path.abspath(sys.argv[2]), sys.argv[3:]

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "mid-weights":
        real_save_file = modeling_utils.safe_save_file

        def half_written(tensors, filename, metadata=None):
            real_save_file(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as handle:
                handle.truncate(os.path.getsize(filename) // 2)
            die()

        modeling_utils.safe_save_file = half_written
    elif point == "tokenizer":
        PreTrainedTokenizerBase.save_pretrained = die
    elif point in ("old-aside", "new-in"):
        real_replace = os.replace

        def replace(src, dst):
            if os.path.abspath(src if point == "old-aside" else dst) == output:
                die()
            return real_replace(src, dst)

        os.replace = replace
    sys.exit(main(argv))
""")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1",
            "OPTIMUM_SUPERWEIGHT_NATIVE": "0"}


def _argv(model: Path, output: Path, bits: int) -> list[str]:
    return ["quantize", str(model), str(output), "--bits", str(bits), "--group-size", "32", "--method", "rtn",
            "--super-weight", PLANTED, "--overwrite"]


def _quantize(model: Path, output: Path, bits: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "optimum_superweight.cli", *_argv(model, output, bits)], env=_env(),
                          capture_output=True, text=True, timeout=900)


def _fingerprint(folder: Path) -> str:
    layer = AutoModelForCausalLM.from_pretrained(folder).get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer, SuperWeightLinear)
    return f"{layer.bits}:{hashlib.sha256(layer.weight.detach().numpy().tobytes()).hexdigest()}"


def _hidden_siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(".") and folder.name in p.name)


def _holds_weights(folder: Path) -> bool:
    """Whether a staging folder holds a weight file yet; False if the writer renamed or removed it meanwhile (a
    folder listed a moment ago may be gone when it is scanned)."""
    try:
        return next(folder.rglob("*.safetensors"), None) is not None
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from optimum_superweight.testing import build_tiny_model, tiny_tokenizer

    root = tmp_path_factory.mktemp("cli-kill")
    model = root / "tiny-llama"
    build_tiny_model("llama", super_weights=[(1, 5, 7)]).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    references = {}
    for bits in (2, 4):
        done = _quantize(model, root / f"reference-{bits}", bits)
        assert done.returncode == 0, done.stderr[-2000:]
        references[bits] = _fingerprint(root / f"reference-{bits}")
    return model, references


def _state(output: Path, references: dict[int, str]) -> str:
    if not output.exists():
        return "absent"
    found = _fingerprint(output)  # anything else (a half checkpoint) raises here, naming what is wrong
    assert found in references.values(), "the output loads as a model that is neither the old nor the new one"
    return "old" if found == references[2] else "new"


def _rerun_cleans_up(model: Path, output: Path, references: dict[int, str]) -> None:
    done = _quantize(model, output, 4)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _fingerprint(output) == references[4]
    assert _hidden_siblings(output) == [], "the next run left a killed run's staging folders behind"


@pytest.mark.parametrize(("point", "existing"), [
    ("mid-weights", False), ("tokenizer", False), ("mid-weights", True), ("old-aside", True), ("new-in", True),
])
def test_quantize_killed_mid_write(source, tmp_path, point, existing):
    model, references = source
    output = tmp_path / "out"
    if existing:
        assert _quantize(model, output, 2).returncode == 0
    child = subprocess.run([sys.executable, "-c", _CHILD, point, str(output), *_argv(model, output, 4)], env=_env(),
                           capture_output=True, text=True, timeout=900)
    killed = child.returncode == -signal.SIGKILL
    # Without an old output there is nothing to set aside: that point is never reached and the run completes.
    assert killed or (point == "old-aside" and not existing), (child.returncode, child.stderr[-2000:])
    state = _state(output, references)
    expected = {"old-aside": "old", "new-in": "absent"}.get(point, "old" if existing else "absent")
    assert state == (expected if killed else "new")
    if killed:
        assert _hidden_siblings(output), "a SIGKILL cannot clean up: the staging folder must still be there"
    _rerun_cleans_up(model, output, references)


def test_quantize_killed_from_outside_while_writing(source, tmp_path):
    """A SIGKILL sent from outside as soon as the staging holds a weight file (wherever the writing then is)."""
    model, references = source
    output = tmp_path / "out"
    assert _quantize(model, output, 2).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "optimum_superweight.cli", *_argv(model, output, 4)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            if any(_holds_weights(tmp_path / name) for name in _hidden_siblings(output)):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert _state(output, references) in ("old", "new")  # one rename puts the new output in: never none here
    _rerun_cleans_up(model, output, references)
