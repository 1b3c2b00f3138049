"""Push to / pull from a local Hub-compatible server: one commit with the card, identical logits, nothing
half-written on bad input. The server and the ``hub_env`` fixture live in ``hub_server.py``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # hub_server.py sits next to this file
from hub_server import hub_env, local_hub  # noqa: E402,F401  (fixtures)
from optimum_superweight import SuperWeightConfig, attach_card_hook, push_to_hub, read_super_weights  # noqa: E402
from optimum_superweight.cards import GENERATED_BEGIN, parse_card  # noqa: E402
from optimum_superweight.hub import push_folder_to_hub  # noqa: E402

PLANTED = {"module": "model.layers.1.mlp.down_proj", "row": 5, "col": 7}
REPO = Path(__file__).resolve().parent.parent
IDS = torch.arange(2, 34).unsqueeze(0)


@pytest.fixture()
def quantized(tiny_llama_dir):
    import optimum_superweight  # noqa: F401  (registers the method)
    from transformers import AutoModelForCausalLM

    config = SuperWeightConfig(bits=4, group_size=32, super_weights=[PLANTED])
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _posts(hub):
    return [path for method, path in hub.requests if method == "POST" and "/validate-yaml" not in path]


def _readme(hub, repo_id):
    return hub.files(repo_id)["README.md"].decode("utf-8")


def test_push_then_pull_into_empty_cache_gives_identical_logits(hub_env, quantized):
    from transformers import AutoModelForCausalLM

    hub = hub_env.hub
    from optimum_superweight.testing import tiny_tokenizer

    info = push_to_hub(quantized, "test-user/tiny-sw4", base_model="test-org/tiny-llama", tokenizer=tiny_tokenizer(),
                       perplexity={"before": 10.0, "after": 10.5}, commit_message="Add 4-bit checkpoint")
    assert info.oid == hub.head_oid("test-user/tiny-sw4")
    assert hub.commits("test-user/tiny-sw4") == ["initial commit", "Add 4-bit checkpoint"]  # exactly one commit
    files = hub.files("test-user/tiny-sw4")
    assert {"README.md", "config.json", "model.safetensors"} <= set(files)
    metadata, text = parse_card(files["README.md"].decode())
    assert metadata["base_model"] == "test-org/tiny-llama" and metadata["base_model_relation"] == "quantized"
    assert "`layers[1].mlp.down_proj.weight[5, 7]`" in text and "| this checkpoint | 10.5 (×1.050) |" in text
    assert "## Size" in text and 'AutoTokenizer.from_pretrained("test-user/tiny-sw4")' in text

    assert not any(hub_env.cache_dir.iterdir())  # the pull starts from an empty cache
    reloaded = AutoModelForCausalLM.from_pretrained("test-user/tiny-sw4")
    assert torch.equal(_logits(reloaded), _logits(quantized))
    assert any(m == "GET" and p.endswith("/model.safetensors") for m, p in hub.requests)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained("test-user/tiny-sw4")("hi").input_ids == tiny_tokenizer()("hi").input_ids
    assert any(hub_env.cache_dir.iterdir())

    records = read_super_weights("test-user/tiny-sw4")  # from the Hub card
    stored = quantized.get_submodule(PLANTED["module"]).super_weight_values[0].item()
    assert [(sw.module, sw.row, sw.col, sw.value, sw.source) for sw in records] == [
        (PLANTED["module"], 5, 7, stored, "card")
    ]


def test_model_push_to_hub_ends_with_the_card(hub_env, quantized):
    """transformers' own push_to_hub writes its default template for a repo without README; the hook replaces it."""
    from transformers import AutoModelForCausalLM

    hub = hub_env.hub
    attach_card_hook(quantized, base_model="test-org/tiny-llama")
    quantized.push_to_hub("test-user/tiny-hook", commit_message="via transformers")
    assert hub.commits("test-user/tiny-hook") == ["initial commit", "via transformers"]
    readme = _readme(hub, "test-user/tiny-hook")
    assert readme.count(GENERATED_BEGIN) == 1 and "More Information Needed" not in readme
    assert 'AutoTokenizer.from_pretrained("test-org/tiny-llama")' in readme  # no tokenizer pushed: the base model's
    assert [(sw.row, sw.col) for sw in read_super_weights("test-user/tiny-hook")] == [(5, 7)]
    reloaded = AutoModelForCausalLM.from_pretrained("test-user/tiny-hook")
    assert torch.equal(_logits(reloaded), _logits(quantized))

    # A second push through save_pretrained(push_to_hub=True) keeps one generated section.
    attach_card_hook(quantized, perplexity=(10.0, 10.2))
    quantized.save_pretrained(hub_env.cache_dir.parent / "again", push_to_hub=True, repo_id="test-user/tiny-hook")
    readme = _readme(hub, "test-user/tiny-hook")
    assert readme.count(GENERATED_BEGIN) == 1 and "10.2 (×1.020)" in readme


def test_quantizer_attaches_the_card_hook(quantized, tmp_path):
    """Every model the quantizer loads (fresh quantization and reloaded checkpoint) gets the card hook."""
    from transformers import AutoModelForCausalLM

    def hooked(model):
        method = model.__dict__.get("_upload_modified_files")
        return getattr(method, "__self__", None) is model

    assert hooked(quantized)
    quantized.save_pretrained(tmp_path / "ckpt")
    assert hooked(AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt"))


def test_existing_card_text_is_kept(hub_env, quantized):
    hub = hub_env.hub
    user_card = "---\nlicense: mit\ntags: [mine]\n---\n# Tiny\n\nNotes written by a person.\n"
    hub.add_repo_files("test-user/tiny-kept", {"README.md": user_card.encode()})
    push_to_hub(quantized, "test-user/tiny-kept")
    push_to_hub(quantized, "test-user/tiny-kept", perplexity=(10.0, 10.1))
    readme = _readme(hub, "test-user/tiny-kept")
    metadata, text = parse_card(readme)
    assert "Notes written by a person." in text and text.count(GENERATED_BEGIN) == 1
    assert metadata["license"] == "mit" and {"mine", "superweight"} <= set(metadata["tags"])


def test_bad_input_writes_nothing(hub_env, quantized, tiny_llama, tmp_path):
    hub = hub_env.hub
    with pytest.raises(ValueError, match="repo_id='bad repo'"):
        push_to_hub(quantized, "bad repo")
    with pytest.raises(ValueError, match="perplexity"):
        push_to_hub(quantized, "test-user/x", perplexity={"after": -1.0})
    with pytest.raises(ValueError, match="not quantized with optimum-superweight"):
        push_to_hub(tiny_llama, "test-user/x")
    with pytest.raises(ValueError, match="commit_message"):
        push_to_hub(quantized, "test-user/x", commit_message="")
    # A folder whose config.json names a super weight its weights do not hold.
    folder = tmp_path / "tampered"
    quantized.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["super_weights"][0]["row"] = 6
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"weight\[6, 7\].*disagree"):
        push_folder_to_hub(folder, "test-user/x")
    # A folder that is not a superweight checkpoint.
    plain = tmp_path / "plain"
    tiny_llama.save_pretrained(plain)
    with pytest.raises(ValueError, match="not an optimum-superweight checkpoint"):
        push_folder_to_hub(plain, "test-user/x")
    assert _posts(hub) == [] and hub.repo_ids() == []


def test_server_refuses_a_malformed_card_atomically(hub_env, quantized, tmp_path):
    """If the Hub rejects the commit (here: README metadata), no file of it lands."""
    from huggingface_hub import CommitOperationAdd, HfApi

    hub = hub_env.hub
    hub.add_repo_files("test-user/atomic", {"a.txt": b"old"})
    api = HfApi()
    with pytest.raises(Exception):
        api.create_commit(
            repo_id="test-user/atomic", commit_message="bad",
            operations=[CommitOperationAdd(path_in_repo="a.txt", path_or_fileobj=b"new"),
                        CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=b"---\nx: [unclosed\n---\n")],
        )
    assert hub.files("test-user/atomic")["a.txt"] == b"old" and "README.md" not in hub.files("test-user/atomic")


def test_read_super_weights_from_hub_falls_back_to_config_json(hub_env, quantized, tmp_path):
    hub = hub_env.hub
    folder = tmp_path / "plain"
    quantized.save_pretrained(folder)
    hub.add_repo_files("test-user/no-card", {"config.json": (folder / "config.json").read_bytes()})
    assert [(sw.row, sw.col, sw.source) for sw in read_super_weights("test-user/no-card")] == [(5, 7, "card")]
    hub.add_repo_files("test-user/empty", {"README.md": b"# nothing here\n"})
    with pytest.raises(ValueError, match="no super weights found"):
        read_super_weights("test-user/empty")
    with pytest.raises(ValueError, match="was not found"):
        read_super_weights("test-user/missing")


def test_from_model_card_values_are_checked_against_the_checkpoint(hub_env, quantized, tiny_llama_dir, tmp_path):
    """End to end: coordinates from a Hub card drive quantization; a wrong value or coordinate is refused."""
    from transformers import AutoModelForCausalLM

    push_to_hub(quantized, "test-user/card-source")
    config = SuperWeightConfig.from_model_card("test-user/card-source", bits=4, group_size=32)
    assert config.get_super_weights()[0].source == "card"
    again = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config)
    assert torch.equal(_logits(again), _logits(quantized))

    wrong_value = tmp_path / "wrong.md"
    wrong_value.write_text("---\nsuperweight:\n  super_weights:\n  - {module: model.layers.1.mlp.down_proj, row: 5, col: 7, value: 9.5}\n---\n")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj.*5.*7.*9\.5"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=SuperWeightConfig.from_model_card(wrong_value))
    outside = tmp_path / "outside.md"
    outside.write_text("The super weight is layers[1].mlp.down_proj.weight[5, 7003].\n")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj.*7003"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=SuperWeightConfig.from_model_card(outside))


def test_cli_push_and_card_in_a_subprocess_via_hf_endpoint(hub_env, quantized, tmp_path):
    """The CLI in a fresh process, configured only by HF_ENDPOINT (read when huggingface_hub is imported)."""
    folder = tmp_path / "ckpt"
    quantized.save_pretrained(folder)
    env = {**hub_env.env, "PYTHONPATH": os.pathsep.join([str(REPO), hub_env.env.get("PYTHONPATH", "")])}
    script = (
        "import sys\n"
        "from optimum_superweight.cli import main\n"
        f"code = main(['push', {str(folder)!r}, 'test-user/cli-sw4', '--base-model', 'test-org/tiny-llama',"
        " '--ppl-before', '10', '--ppl-after', '10.4', '--message', 'cli push'])\n"
        "code = code or main(['card', 'test-user/cli-sw4', '--json'])\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert hub_env.hub.commits("test-user/cli-sw4") == ["initial commit", "cli push"]
    printed = json.loads(result.stdout[result.stdout.index("["):])
    assert [(r["module"], r["row"], r["col"]) for r in printed] == [(PLANTED["module"], 5, 7)]
    assert "10.4 (×1.040)" in _readme(hub_env.hub, "test-user/cli-sw4")


def test_cli_push_dry_run_uploads_nothing(hub_env, quantized, tmp_path, capsys):
    from optimum_superweight.cli import main

    folder = tmp_path / "ckpt"
    quantized.save_pretrained(folder)
    assert main(["push", str(folder), "test-user/dry", "--dry-run", "--base-model", "test-org/tiny-llama",
                 "--ppl-after", "10.3", "--tag", "tiny"]) == 0
    out, err = capsys.readouterr()
    metadata, _ = parse_card(out)
    assert metadata["base_model"] == "test-org/tiny-llama" and "tiny" in metadata["tags"]
    assert "would upload config.json" in err and "model.safetensors" in err
    assert hub_env.hub.requests == []
    assert main(["push", str(folder), "test-user/dry", "--ppl-before", "10"]) == 2
    assert "need --ppl-after" in capsys.readouterr().err and hub_env.hub.requests == []


def test_cli_card_reads_files_and_index(tmp_path, capsys):
    from optimum_superweight.cli import main

    card = tmp_path / "README.md"
    card.write_text("Super weight: layers[2].mlp.down_proj.weight[3968, 7003]\n")
    assert main(["card", str(card)]) == 0
    assert "layers[2].mlp.down_proj.weight[3968, 7003]  module=model.layers.2.mlp.down_proj" in capsys.readouterr().out
    assert main(["card", "--known", "mistralai/Mistral-7B-Instruct-v0.1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["row"] == 2070
    assert main(["card", "--known", "gpt2"]) == 2
    assert "No known super weights" in capsys.readouterr().err
    card.write_text("---\nsuperweight: [unclosed\n---\n")
    assert main(["card", str(card)]) == 2
    assert "malformed" in capsys.readouterr().err


def _python(script: str, cwd, env: dict) -> subprocess.CompletedProcess:
    """``python -c script`` in a fresh interpreter (what optimum-cli's start sees), output captured."""
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def test_optimum_cli_exposes_the_commands():
    """optimum-cli discovers optimum/commands/register/superweight.py (namespace package, no __init__.py)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # Our registration module alone must not import torch or the package; other installed optimum plugins
    # (optimum-quanto's imports torch) may, so the whole CLI is only checked for not importing the package.
    light = (
        "import sys; import optimum.commands.register.superweight\n"
        "assert 'optimum_superweight' not in sys.modules and 'torch' not in sys.modules, 'registration must stay light'\n"
        "from optimum.commands.optimum_cli import main; sys.argv = ['optimum-cli', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "assert 'optimum_superweight' not in sys.modules, 'optimum-cli --help must not import the package'\n"
    )
    top = _python(light, REPO, env)
    assert top.returncode == 0, top.stderr[-2000:]
    assert "superweight" in top.stdout and "export" in top.stdout
    # One process, three invocations (the package import is the slow part).
    heavy = (
        "import sys\nfrom optimum.commands.optimum_cli import main\n"
        "def run(*argv):\n    sys.argv = ['optimum-cli', *argv]\n    try:\n        main()\n"
        "    except SystemExit as exit:\n        return exit.code or 0\n    return 0\n"
        "print('CODES', run('superweight', 'card', '--known', 'huggyllama/llama-7b'), run('superweight', '--help'),"
        " run('superweight', 'card', '--known', 'gpt2'))\n"
    )
    result = _python(heavy, REPO, env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "layers[2].mlp.down_proj.weight[3968, 7003]" in result.stdout
    assert all(f" {c} " in result.stdout for c in ("detect", "quantize", "push", "card"))  # the real sub-commands in the help
    assert "CODES 0 0 2" in result.stdout and "No known super weights" in result.stderr
    assert not (REPO / "optimum" / "__init__.py").exists() and not (REPO / "optimum" / "commands" / "__init__.py").exists()


def test_optimum_cli_registers_once_with_two_copies_on_the_path(tmp_path):
    """A clone on PYTHONPATH beside an editable install of another clone puts two folders holding superweight.py
    on the namespace path; optimum-cli must still start, with the command registered once."""
    copy = tmp_path / "optimum" / "commands" / "register"
    copy.mkdir(parents=True)
    shutil.copy(REPO / "optimum" / "commands" / "register" / "superweight.py", copy / "superweight.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])}
    script = (
        "import sys, importlib.util\n"
        "spec = importlib.util.find_spec('optimum.commands.register')\n"
        "assert sum(1 for p in set(spec.submodule_search_locations) if p.endswith('register')) >= 2, spec\n"
        "from optimum.commands.optimum_cli import main; sys.argv = ['optimum-cli', '--help']\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
    )
    result = _python(script, tmp_path, env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "superweight" in result.stdout


@pytest.mark.slow
def test_smollm2_from_index_push_and_pull(hub_env, smollm2_path):
    """The embedded SmolLM2, quantized with the index's coordinates (no detection), pushed and pulled back."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hub = hub_env.hub
    config = SuperWeightConfig.from_known("HuggingFaceTB/SmolLM2-135M-Instruct", bits=4, group_size=64)
    # bfloat16: the layout the fast CPU kernels take (float32 activations fall back to a slow reference path).
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, quantization_config=config, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    push_to_hub(model, "test-user/SmolLM2-135M-Instruct-sw4", tokenizer=tokenizer)
    metadata, text = parse_card(_readme(hub, "test-user/SmolLM2-135M-Instruct-sw4"))
    assert metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # inferred from the index
    (entry,) = metadata["superweight"]["super_weights"]
    assert (entry["module"], entry["row"], entry["col"]) == ("model.layers.11.mlp.down_proj", 507, 1229)
    assert entry["value"] == pytest.approx(5.875732421875, rel=1e-3)  # the bfloat16 weight, checked against the index
    assert "`layers[11].mlp.down_proj.weight[507, 1229]`" in text
    reloaded = AutoModelForCausalLM.from_pretrained("test-user/SmolLM2-135M-Instruct-sw4", dtype=torch.bfloat16)
    ids = AutoTokenizer.from_pretrained("test-user/SmolLM2-135M-Instruct-sw4")(
        "Apple Inc. is a worldwide tech company.", return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_sharded_checkpoint_pushes_and_reloads_from_the_repo_id(hub_env, quantized):
    """A compressed checkpoint cut into shards (with its index) goes up in one commit and reloads identically,
    through our push_to_hub and through transformers' model.push_to_hub."""
    from transformers import AutoModelForCausalLM

    hub = hub_env.hub
    push_to_hub(quantized, "test-user/tiny-sharded", max_shard_size="60KB", commit_message="sharded")
    attach_card_hook(quantized)
    quantized.push_to_hub("test-user/tiny-sharded-hook", max_shard_size="60KB", commit_message="sharded via transformers")
    for repo_id, message in (("test-user/tiny-sharded", "sharded"), ("test-user/tiny-sharded-hook", "sharded via transformers")):
        assert hub.commits(repo_id) == ["initial commit", message]
        files = hub.files(repo_id)
        shards = sorted(name for name in files if name.startswith("model-") and name.endswith(".safetensors"))
        assert len(shards) > 1 and "model.safetensors" not in files
        index = json.loads(files["model.safetensors.index.json"])
        assert sorted(set(index["weight_map"].values())) == shards
        assert f"{PLANTED['module']}.super_weight_values" in index["weight_map"]
        reloaded = AutoModelForCausalLM.from_pretrained(repo_id)
        assert torch.equal(_logits(reloaded), _logits(quantized))
        assert [(sw.row, sw.col) for sw in read_super_weights(repo_id)] == [(5, 7)]
