"""Exported folders read right by transformers 4.x config readers (what vLLM pins), without installing 4.x.

``read_like_transformers4`` applies 4.x's reading rules: RoPE from the top-level keys with 4.x's defaults when a key
is absent (``rope_theta`` 10000, Gemma 3 ``rope_theta`` 1e6 and ``rope_local_base_freq`` 10000, no scaling), the
dtype from ``torch_dtype``, and the tokenizer class looked up in 4.x's list.
"""

from __future__ import annotations

import json

import pytest
from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

from optimum_superweight.export.compat import (
    TRANSFORMERS4_TOKENIZERS,
    add_transformers4_keys,
    comparable_rope,
    legacy_config,
    legacy_tokenizer_class,
)

from .conftest import quantize_tiny

# transformers 4.57's defaults where a key is absent.
_DEFAULT_THETA = {"llama": 10000.0, "qwen2": 10000.0, "gemma3_text": 1_000_000.0}


def read_like_transformers4(config: dict) -> dict:
    """The RoPE settings and dtype a transformers 4.x config class would hold for ``config``."""
    read = {
        "rope_theta": config.get("rope_theta", _DEFAULT_THETA[config["model_type"]]),
        "rope_scaling": config.get("rope_scaling"),
        "torch_dtype": config.get("torch_dtype"),
    }
    if config["model_type"] == "gemma3_text":
        read["rope_local_base_freq"] = config.get("rope_local_base_freq", 10000.0)
    return read


def rope_as_transformers5_holds_it(config) -> dict:
    """The same settings, read from a transformers 5 config object's ``rope_parameters``."""
    params = config.rope_parameters
    if "full_attention" in params:
        full, local = params["full_attention"], params["sliding_attention"]
        scaling = {k: v for k, v in full.items() if k != "rope_theta"} if full["rope_type"] != "default" else None
        return {"rope_theta": full["rope_theta"], "rope_scaling": scaling, "rope_local_base_freq": local["rope_theta"]}
    scaling = {k: v for k, v in params.items() if k != "rope_theta"} if params["rope_type"] != "default" else None
    return {"rope_theta": params["rope_theta"], "rope_scaling": scaling}


CONFIGS = [
    LlamaConfig(rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}),  # SmolLM2's base
    LlamaConfig(rope_parameters={"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    Qwen2Config(rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"}),
    Gemma3TextConfig(rope_parameters={"full_attention": {"rope_theta": 1000000.0, "rope_type": "linear", "factor": 8.0},
                                      "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}}),
    Gemma3TextConfig(rope_parameters={"full_attention": {"rope_theta": 500000.0, "rope_type": "default"},
                                      "sliding_attention": {"rope_theta": 20000.0, "rope_type": "default"}}),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.model_type}")
def test_transformers4_reading_matches_transformers5(config):
    saved = {**config.to_dict(), "dtype": "bfloat16"}
    assert "rope_theta" not in saved  # transformers 5 writes rope_parameters only: the reason for this module
    expected = rope_as_transformers5_holds_it(config)
    read = read_like_transformers4(legacy_config(saved))
    for key, value in expected.items():
        if key == "rope_scaling" and value is not None:
            assert read[key]["rope_type"] == value["rope_type"] and read[key]["type"] == value["rope_type"]
            assert {k: v for k, v in read[key].items() if k != "type"} == value
        else:
            assert read[key] == value, key
    assert legacy_config(saved)["torch_dtype"] == saved["dtype"]
    # Every 5.x key stays as it was, except a per-attention-type rope_parameters, which the top-level keys replace.
    kept = {k: v for k, v in saved.items() if not (k == "rope_parameters" and "full_attention" in v)}
    assert all(legacy_config(saved)[k] == v for k, v in kept.items())


def read_like_vllm_on_transformers4(config: dict) -> dict:
    """vLLM 0.16's ``patch_rope_parameters`` on transformers 4.x: the top-level ``rope_theta`` (4.x's default when
    absent) is written into ``rope_parameters`` (a new ``{"rope_type": "default"}`` when there is none); the dict, or each
    of its per-attention-type dicts when all its keys are attention types, must then hold a ``rope_type``."""
    parameters = dict(config.get("rope_parameters") or {"rope_type": "default"})
    parameters["rope_theta"] = config.get("rope_theta", _DEFAULT_THETA[config["model_type"]])
    nested = set(parameters) <= {"full_attention", "sliding_attention"}
    for layer in (parameters.values() if nested else [parameters]):
        if "rope_type" not in layer:
            raise ValueError("rope_parameters should have a 'rope_type' key")
    return parameters


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.model_type}")
def test_vllm_on_transformers4_accepts_and_transformers5_reads_back(config):
    from transformers import AutoConfig

    saved = config.to_dict()
    legacy = legacy_config(saved)
    read_like_vllm_on_transformers4(legacy)
    if "full_attention" in saved["rope_parameters"]:  # the control: the nested dict beside rope_theta is refused
        with pytest.raises(ValueError, match="rope_type"):
            read_like_vllm_on_transformers4({**legacy, "rope_parameters": saved["rope_parameters"]})
    again = AutoConfig.for_model(legacy["model_type"], **{k: v for k, v in legacy.items() if k != "model_type"})
    assert comparable_rope(again.rope_parameters) == comparable_rope(config.rope_parameters)


def test_negative_control_plain_transformers5_config_misread():
    saved = CONFIGS[0].to_dict()
    assert read_like_transformers4(saved)["rope_theta"] == 10000.0 != 100000.0


def test_tokenizer_class():
    assert legacy_tokenizer_class("TokenizersBackend") == "PreTrainedTokenizerFast"
    assert legacy_tokenizer_class("Qwen2Tokenizer") == "Qwen2Tokenizer"
    assert "TokenizersBackend" not in TRANSFORMERS4_TOKENIZERS


@pytest.mark.parametrize("fmt", ["awq", "compressed-tensors"])
def test_every_exported_folder_reads_right_in_transformers4(tiny_llama_dir, tmp_path, fmt):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoConfig

    from optimum_superweight.export import export

    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_theta": 100000.0, "rope_type": "default"}  # a base that 4.x's default is not
    (tiny_llama_dir / "config.json").write_text(json.dumps(config))
    checkpoint = quantize_tiny(tiny_llama_dir, tmp_path / "q", group_size=32, symmetric=False)
    out = tmp_path / fmt
    result = export(checkpoint, out, format=fmt)
    written = json.loads((out / "config.json").read_text())
    read = read_like_transformers4(written)
    assert read["rope_theta"] == AutoConfig.from_pretrained(out).rope_parameters["rope_theta"] == 100000.0
    assert read["torch_dtype"] == written["dtype"]
    tokenizer = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer["tokenizer_class"] in TRANSFORMERS4_TOKENIZERS and (out / "tokenizer.json").is_file()
    assert written["rope_theta"] == 100000.0 and "transformers4" in result


def test_add_keys_never_overwrites_rope_and_dtype_follows(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "rope_theta": 5.0, "dtype": "float16",
                                                      "torch_dtype": "float32",
                                                      "rope_parameters": {"rope_theta": 7.0, "rope_type": "default"}}))
    added = add_transformers4_keys(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_theta"] == 5.0 and written["torch_dtype"] == "float16" and added["config"] == {"torch_dtype": "float16"}
