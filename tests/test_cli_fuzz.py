"""Every CLI command x misuse: one line on stderr saying what and what to do, a non-zero exit, no traceback
unless ``--debug``; and commands that do what they print (outputs written, refused, or replaced on request).

In-process through ``main(argv)`` (fast); a few subprocesses check the real entry points. Hub faults come from
the local server of ``hub_server.py`` (HTTP 500, timeouts, a connection dropped mid-upload) and from an
unreachable endpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # hub_server.py sits next to this file
from hub_server import hub_env, local_hub, no_retry_wait, unreachable_hub  # noqa: E402,F401  (fixtures)
from optimum_superweight.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PLANTED = {"module": "model.layers.1.mlp.down_proj", "row": 5, "col": 7}
MISSING = "/no/such/model-folder"


# -- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """A full-precision tiny model (with tokenizer), a quantized checkpoint, and folders that are not models."""
    import optimum_superweight  # noqa: F401
    from transformers import AutoModelForCausalLM

    from optimum_superweight import SuperWeightConfig
    from optimum_superweight.testing import build_tiny_model, tiny_tokenizer

    root = tmp_path_factory.mktemp("cli-fuzz")
    model = root / "tiny-llama"
    build_tiny_model("llama", super_weights=[(1, 5, 7)]).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    quantized = root / "tiny-sw4"
    config = SuperWeightConfig(bits=4, group_size=32, method="rtn", super_weights=[PLANTED])
    AutoModelForCausalLM.from_pretrained(model, quantization_config=config).save_pretrained(quantized)
    config_only = root / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_bytes((model / "config.json").read_bytes())
    not_model = root / "not-a-model"
    not_model.mkdir()
    (not_model / "notes.txt").write_text("hello\n")
    a_file = root / "a-file.bin"
    a_file.write_bytes(b"\x00\xff not a model")
    existing = root / "existing.json"
    existing.write_text("{}\n")
    return types.SimpleNamespace(root=root, model=model, quantized=quantized, config_only=config_only,
                                 not_model=not_model, file=a_file, existing=existing)


def run(capsys, *argv, expect_error=True):
    """``main(argv)`` -> (code, stdout, stderr), checking the error contract when an error is expected."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    if expect_error:
        assert code != 0, (argv, out, err)
        assert "Traceback" not in err, err
        lines = [line for line in err.splitlines() if line.strip()]
        error_lines = [line for line in lines if "error:" in line]
        assert len(error_lines) == 1 and lines[-1] == error_lines[0], err
        assert len(error_lines[0]) < 900
        if os.environ.get("SHOW_CLI_ERRORS"):
            sys.__stdout__.write(error_lines[0] + "\n")
    return code, out, err


# -- paths: missing, a file, a config-only folder, a folder that is not a model ----------------------------------------
def _commands(p, model):
    out = p.root / "never-written"
    return {
        "quantize": ["quantize", model, out],
        "detect": ["detect", model, "--quiet"],
        "detect-streaming": ["detect", model, "--streaming", "--quiet"],
        "perplexity": ["perplexity", model],
        "ablate": ["ablate", model, "--quiet"],
        "demo": ["demo", "--model", model, "--output", out],
    }


@pytest.mark.parametrize(
    "kind, match",
    [("missing", "does not exist"), ("file", "is a file"), ("config_only", "no weights"), ("not_model", "no config.json")],
)
def test_model_commands_refuse_bad_model_paths(paths, capsys, kind, match):
    model = MISSING if kind == "missing" else getattr(paths, kind)
    for name, argv in _commands(paths, model).items():
        code, _, err = run(capsys, *argv)
        assert code == 2 and match in err and "expected a folder written by save_pretrained" in err, (name, err)
    assert not (paths.root / "never-written").exists()


@pytest.mark.parametrize(
    "kind, match",
    [("missing", "is not a folder"), ("file", "is not a folder"), ("config_only", "not an optimum-superweight checkpoint"),
     ("not_model", "has no config.json")],
)
def test_push_refuses_bad_folders(paths, capsys, kind, match):
    folder = MISSING if kind == "missing" else getattr(paths, kind)
    for extra in ([], ["--dry-run"]):
        code, _, err = run(capsys, "push", folder, "user/repo", *extra)
        assert code == 2 and match in err, err
    code, _, err = run(capsys, "card", folder, "--generate")
    assert code == 2 and match in err, err


@pytest.mark.parametrize(
    "kind, match",
    [("missing", "not an existing file or folder"), ("file", "not UTF-8"), ("config_only", "no super weights found"),
     ("not_model", "neither README.md nor config.json")],
)
def test_card_refuses_bad_sources(paths, capsys, kind, match):
    source = MISSING if kind == "missing" else getattr(paths, kind)
    code, _, err = run(capsys, "card", source)
    assert code == 2 and match in err, err


@pytest.mark.parametrize(
    "name, corrupt, match",
    [
        ("bad-json", lambda d: (d / "config.json").write_text("{not json"), "not a valid JSON"),
        ("unknown-type", lambda d: (d / "config.json").write_text('{"model_type": "no-such-architecture"}'),
         "no-such-architecture"),
        ("garbage-weights", lambda d: (d / "model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"garbage!" * 2),
         "safetensors file is corrupt"),
        ("empty-weights", lambda d: (d / "model.safetensors").write_bytes(b""), "safetensors file is corrupt"),
    ],
)
def test_corrupt_model_folders_are_one_line_errors(paths, capsys, name, corrupt, match):
    import shutil

    folder = paths.root / f"corrupt-{name}"
    if not folder.exists():
        shutil.copytree(paths.model, folder)
        corrupt(folder)
    for argv in (["quantize", folder, paths.root / "never-written"], ["detect", folder, "--quiet"], ["perplexity", folder]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and match in err, (argv, err)
    assert not (paths.root / "never-written").exists()


# -- invalid values ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, match",
    [
        (["quantize", "{model}", "{out}", "--bits", "5"], "bits=5"),
        (["quantize", "{model}", "{out}", "--group-size", "0"], "group_size=0"),
        (["quantize", "{model}", "{out}", "--bits", "four"], "invalid int value"),
        (["quantize", "{model}", "{out}", "--max-shard-size=-1GB"], "--max-shard-size '-1GB' is invalid"),
        (["quantize", "{model}", "{out}", "--max-shard-size", "lots"], "--max-shard-size 'lots' is invalid"),
        (["quantize", "{model}", "{out}", "--super-weight", "model.layers.1.mlp.down_proj:5"], "expected MODULE:ROW,COL"),
        (["quantize", "{model}", "{out}", "--super-weight", "model.layers.1.mlp.down_proj:5,70000"], "70000"),
        (["detect", "{model}", "--quiet", "--threshold", "-1"], "threshold=-1"),
        (["detect", "{model}", "--quiet", "--layers", "99"], "layers=[99]"),
        (["detect", "{model}", "--quiet", "--projection", "mlp.nope"], "No module"),
        (["detect", "{model}", "--quiet", "--plot", "{out}.txt"], "accepted are files ending in .png"),
        (["perplexity", "{model}", "--window", "0"], "window"),
        (["perplexity", "{model}", "--text", "/no/such/text.txt"], "not a readable text file"),
        (["demo", "--model", "{model}", "--output", "{out}", "--bits", "7"], "bits=7"),
        (["card", "--known", "no-such/model"], "No known super weights"),
        (["card"], "needs a SOURCE"),
        (["card", "{model}", "-o", "{out}"], "add --generate"),
        (["push", "{quantized}", "bad repo id", "--dry-run"], "repo_id='bad repo id'"),
        (["push", "{quantized}", "user/x", "--ppl-after", "-3", "--dry-run"], "perplexity"),
        (["nope"], "invalid choice"),
    ],
)
def test_invalid_values_are_one_line_errors(paths, capsys, argv, match):
    values = {"model": paths.model, "quantized": paths.quantized, "out": paths.root / "never-written"}
    code, _, err = run(capsys, *[a.format(**values) for a in argv])
    assert code == 2 and match in err, err
    assert not (paths.root / "never-written").exists()


# -- outputs: do what is printed ------------------------------------------------------------------------------------
def test_quantize_refuses_existing_outputs_and_the_input(paths, capsys):
    code, _, err = run(capsys, "quantize", paths.model, paths.existing)
    assert code == 2 and "is an existing file" in err
    assert paths.existing.read_text() == "{}\n"
    code, _, err = run(capsys, "quantize", paths.model, paths.not_model)
    assert code == 2 and "not empty" in err and "--overwrite" in err
    code, _, err = run(capsys, "quantize", paths.model, paths.model, "--overwrite")
    assert code == 2 and "input model's folder" in err


def test_commands_that_need_full_precision_refuse_a_quantized_checkpoint(paths, capsys):
    code, _, err = run(capsys, "quantize", paths.quantized, paths.root / "again", "--bits", "2")
    assert code == 2 and "already quantized (superweight, 4-bit, group 32, symmetric, method rtn)" in err
    assert not (paths.root / "again").exists()
    for argv in (["detect", paths.quantized, "--quiet"], ["detect", paths.quantized, "--quiet", "--streaming"],
                 ["ablate", paths.quantized, "--quiet"], ["demo", "--model", paths.quantized, "--output", paths.root / "d"]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "already quantized" in err, (argv, err)
    assert "needs the full-precision weights" in err or "quantizing it again" in err


def test_quantize_writes_what_it_prints_and_overwrite_replaces(paths, capsys):
    out = paths.root / "quantized-out"
    out.mkdir()
    (out / "stale.safetensors").write_bytes(b"old")
    code, _, err = run(capsys, "quantize", paths.model, out, "--bits", "8", "--group-size", "32",
                       "--super-weight", "model.layers.1.mlp.down_proj:5,7")
    assert code == 2 and "--overwrite" in err
    code, printed, _ = run(capsys, "quantize", paths.model, out, "--bits", "8", "--group-size", "32",
                           "--super-weight", "model.layers.1.mlp.down_proj:5,7", "--overwrite", expect_error=False)
    assert code == 0 and f"saved to {out}" in printed and "8-bit" in printed
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (saved["bits"], saved["group_size"]) == (8, 32)
    assert not (out / "stale.safetensors").exists() and (out / "tokenizer.json").is_file()
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_existing_output_files_are_refused_before_any_work(paths, capsys):
    for argv in (
        ["detect", paths.model, "--quiet", "--json", paths.existing],
        ["detect", paths.model, "--quiet", "--plot", paths.existing],
        ["perplexity", paths.model, "--json", paths.existing],
        ["ablate", paths.model, "--quiet", "--json", paths.existing],
        ["demo", "--model", paths.model, "--output", paths.root / "demo-out", "--json", paths.existing],
        ["card", paths.quantized, "--generate", "-o", paths.existing],
    ):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "already exists" in err and "--overwrite" in err, (argv, err)
    code, _, err = run(capsys, "detect", paths.model, "--quiet", "--json", paths.root)
    assert code == 2 and "is a folder" in err
    code, _, err = run(capsys, "detect", paths.model, "--quiet", "--json", paths.existing / "sub.json")
    assert code == 2 and "is a file" in err
    assert paths.existing.read_text() == "{}\n" and not (paths.root / "demo-out").exists()


def test_demo_replaces_only_its_own_previous_checkpoint(paths, capsys, tmp_path, monkeypatch):
    import shutil

    code, _, err = run(capsys, "demo", "--model", paths.model, "--output", paths.quantized)
    assert code == 2 and "not empty" in err  # someone's checkpoint elsewhere: not replaced without --overwrite
    monkeypatch.chdir(tmp_path)
    shutil.copytree(paths.quantized, tmp_path / "out" / "superweight-demo")
    code, _, err = run(capsys, "demo", "--model", paths.model, "--json", paths.existing)  # past the folder check
    assert code == 2 and "--json" in err and "already exists" in err
    assert (tmp_path / "out" / "superweight-demo" / "config.json").is_file()


def test_detect_json_overwrite_writes_the_report(paths, capsys):
    target = paths.root / "report.json"
    target.write_text("old")
    code, _, _ = run(capsys, "detect", paths.model, "--quiet", "--no-confirm", "--json", target, "--overwrite",
                     expect_error=False)
    assert code == 0 and json.loads(target.read_text())["super_weights"]


# -- the Hub: unreachable, failing, missing ----------------------------------------------------------------------------
def test_every_command_unreachable_hub(paths, capsys, unreachable_hub):
    for argv in (
        ["card", "user/model"],
        ["push", paths.quantized, "user/model"],
        ["quantize", "user/model", paths.root / "never-written"],
        ["detect", "user/model", "--quiet"],
        ["perplexity", "user/model"],
    ):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "Cannot reach the Hub" in err and "HF_ENDPOINT" in err, (argv, err)
    assert not (paths.root / "never-written").exists()


def test_hub_faults_on_read(paths, capsys, hub_env, no_retry_wait, monkeypatch):
    from huggingface_hub import constants

    hub = hub_env.hub
    hub.add_repo_files("test-user/card", {"README.md": b"layers[1].mlp.down_proj.weight[5, 7]\n"})
    hub.add_repo_files("test-user/empty", {"notes.txt": b"x"})
    code, _, err = run(capsys, "card", "test-user/missing")
    assert code == 2 and "test-user/missing was not found" in err
    code, _, err = run(capsys, "card", "test-user/empty")
    assert code == 2 and "neither README.md nor config.json" in err
    fault = hub.inject("resolve", status=500)
    code, _, err = run(capsys, "card", "test-user/card")
    assert code == 2 and "HTTP 500" in err and "test-user/card" in err and "retry later" in err
    code, _, err = run(capsys, "quantize", "test-user/card", paths.root / "never-written")
    assert code == 2 and "500" in err
    hub.faults.remove(fault)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 0.5)
    hub.inject("resolve", "timeout", delay=3.0, times=1)
    code, _, err = run(capsys, "card", "test-user/card")
    assert code == 2 and "Cannot reach the Hub" in err and "Timeout" in err
    code, out, _ = run(capsys, "card", "test-user/card", expect_error=False)  # the fault is gone: it reads
    assert code == 0 and "weight[5, 7]" in out


def test_quantize_from_a_hub_repo_without_tokenizer_notes_it(paths, capsys, hub_env):
    files = {name: (paths.model / name).read_bytes() for name in ("config.json", "model.safetensors")}
    hub_env.hub.add_repo_files("test-user/no-tokenizer", files)
    out = paths.root / "from-hub"
    code, printed, _ = run(capsys, "quantize", "test-user/no-tokenizer", out, "--super-weight",
                           "model.layers.1.mlp.down_proj:5,7", expect_error=False)
    assert code == 0 and "no tokenizer found" in printed and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("route, kind", [("commit", "status"), ("commit", "drop"), ("create_repo", "status"),
                                         ("preupload", "status")])
def test_push_failing_mid_upload_is_one_line_and_writes_nothing(paths, capsys, hub_env, no_retry_wait, route, kind):
    hub = hub_env.hub
    hub.add_repo_files("test-user/target", {"a.txt": b"old"})
    hub.inject(route, kind, status=500 if route != "create_repo" else 503)
    code, _, err = run(capsys, "push", paths.quantized, "test-user/target")
    assert code == 2 and "test-user/target" in err, err
    assert ("HTTP 5" in err) if kind == "status" else ("Cannot reach the Hub" in err), err
    assert hub.commits("test-user/target") == ["initial commit", "seed"]
    assert hub.files("test-user/target") == {".gitattributes": hub.files("test-user/target")[".gitattributes"],
                                              "a.txt": b"old"}


# -- --debug and unexpected errors ---------------------------------------------------------------------------------
def test_debug_shows_the_traceback(paths, capsys):
    for argv in (["--debug", "quantize", MISSING, paths.root / "x"], ["detect", paths.file, "--debug"]):
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].count("error:") == 1


def test_unexpected_errors_are_one_line_with_a_debug_hint(capsys, monkeypatch):
    from optimum_superweight.cli import hub as hub_cli

    def broken(args):
        raise TypeError("'NoneType' object is not subscriptable")

    monkeypatch.setattr(hub_cli, "run_card", broken)
    code, _, err = run(capsys, "card", "--list-known")
    assert code == 1 and "unexpected TypeError" in err and "--debug" in err

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(hub_cli, "run_card", interrupted)
    assert main(["card", "--list-known"]) == 130
    assert capsys.readouterr().err.strip() == "optimum-superweight card: interrupted."


# -- the real entry points ---------------------------------------------------------------------------------------------
def test_entry_points_in_subprocesses(paths, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("OPTIMUM_SUPERWEIGHT_DEBUG", None)
    # Only this checkout's optimum/commands/register: an editable install of another checkout (a git worktree's
    # main) would otherwise register the command a second time.
    optimum_cli = (
        "import importlib.util, sys\n"
        "find_spec = importlib.util.find_spec\n"
        "def only_here(name, *args, **kwargs):\n"
        "    spec = find_spec(name, *args, **kwargs)\n"
        "    if name == 'optimum.commands.register' and spec is not None:\n"
        f"        spec.submodule_search_locations = [p for p in spec.submodule_search_locations if p.startswith({str(REPO)!r})]\n"
        "    return spec\n"
        "importlib.util.find_spec = only_here\n"
        "from optimum.commands.optimum_cli import main\n"
        f"sys.argv = ['optimum-cli', 'superweight', 'quantize', {str(paths.config_only)!r}, 'out']\nmain()\n"
    )
    commands = {
        "plain": [sys.executable, "-m", "optimum_superweight.cli", "quantize", MISSING, str(tmp_path / "out")],
        "optimum-cli": [sys.executable, "-c", optimum_cli],
    }
    procs = {name: subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, cmd in commands.items()}
    results = {name: (proc.communicate(timeout=300), proc.returncode) for name, proc in procs.items()}
    (_, err), code = results["plain"]
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("optimum-superweight quantize: error: MODEL /no/such/model-folder does not exist")
    (_, err), code = results["optimum-cli"]
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("optimum-cli superweight quantize: error: MODEL") and "no weights" in err
