"""The Python API when the Hub is unreachable, offline or failing: a SuperWeightHubError naming the repo, the cause
and what to do (the client's exception chained), and an all-or-nothing push."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # hub_server.py sits next to this file
from hub_server import hub_env, local_hub, no_retry_wait, unreachable_hub  # noqa: E402,F401  (fixtures)
from optimum_superweight import (  # noqa: E402
    SuperWeightConfig,
    SuperWeightError,
    SuperWeightHubError,
    SuperWeightRepoNotFoundError,
    push_to_hub,
    read_super_weights,
)
from optimum_superweight.errors import is_hub_client_error  # noqa: E402

PLANTED = {"module": "model.layers.1.mlp.down_proj", "row": 5, "col": 7}


@pytest.fixture()
def quantized(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=SuperWeightConfig(bits=4, group_size=32, super_weights=[PLANTED])
    )


def test_reader_unreachable(unreachable_hub):
    for call in (lambda: read_super_weights("user/model"), lambda: SuperWeightConfig.from_model_card("user/model")):
        with pytest.raises(SuperWeightHubError) as caught:
            call()
        error = caught.value
        assert isinstance(error, SuperWeightError) and isinstance(error, OSError)
        assert error.repo_id == "user/model" and error.cause == "unreachable"
        assert "user/model" in str(error) and unreachable_hub in str(error) and "local folder" in str(error)
        assert is_hub_client_error(error.__cause__)


def test_reader_offline_mode_reads_the_cache_or_says_it_is_offline(hub_env, monkeypatch):
    from huggingface_hub import constants

    hub_env.hub.add_repo_files("test-user/card", {"README.md": b"layers[1].mlp.down_proj.weight[5, 7]\n"})
    assert [(sw.row, sw.col) for sw in read_super_weights("test-user/card")] == [(5, 7)]  # now cached
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert [(sw.row, sw.col) for sw in read_super_weights("test-user/card")] == [(5, 7)]
    with pytest.raises(SuperWeightHubError, match="user/model: offline mode is on") as caught:
        read_super_weights("user/model")
    assert caught.value.cause == "offline" and caught.value.repo_id == "user/model"


def test_reader_missing_repo_revision_and_server_faults(hub_env, no_retry_wait, monkeypatch):
    from huggingface_hub import constants

    hub = hub_env.hub
    hub.add_repo_files("test-user/card", {"README.md": b"layers[1].mlp.down_proj.weight[5, 7]\n"})
    with pytest.raises(SuperWeightRepoNotFoundError, match="test-user/missing was not found") as caught:
        read_super_weights("test-user/missing")
    assert isinstance(caught.value, ValueError) and caught.value.cause == "not found"
    with pytest.raises(SuperWeightRepoNotFoundError, match="no such revision"):
        read_super_weights("test-user/card", revision="0" * 40)
    fault = hub.inject("resolve", status=503)
    with pytest.raises(SuperWeightHubError, match="HTTP 503.*test-user/card") as caught:
        read_super_weights("test-user/card")
    assert caught.value.cause == "http 503" and fault.hits >= 1
    hub.faults.remove(fault)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 0.5)
    hub.inject("resolve", "timeout", delay=3.0, times=1)
    with pytest.raises(SuperWeightHubError) as caught:
        read_super_weights("test-user/card")
    assert caught.value.cause == "timeout"
    assert [(sw.row, sw.col) for sw in read_super_weights("test-user/card")] == [(5, 7)]  # the Hub is back


@pytest.mark.parametrize("kind", ["status", "drop"])
def test_push_failing_mid_upload_leaves_the_repo_as_it_was(hub_env, no_retry_wait, quantized, kind):
    hub = hub_env.hub
    hub.add_repo_files("test-user/target", {"a.txt": b"old"})
    before = hub.files("test-user/target")
    hub.inject("commit", kind)
    with pytest.raises(SuperWeightHubError, match="test-user/target.*push again: nothing was committed") as caught:
        push_to_hub(quantized, "test-user/target")
    assert caught.value.repo_id == "test-user/target"
    assert hub.files("test-user/target") == before and hub.commits("test-user/target") == ["initial commit", "seed"]
    # transformers' own model.push_to_hub goes through the card hook: the same error.
    with pytest.raises(SuperWeightHubError, match="test-user/target"):
        quantized.push_to_hub("test-user/target")
    assert hub.files("test-user/target") == before


def test_push_unreachable(unreachable_hub, quantized):
    with pytest.raises(SuperWeightHubError, match="Cannot reach the Hub.*user/target.*HF_ENDPOINT"):
        push_to_hub(quantized, "user/target")
