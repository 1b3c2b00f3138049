"""One rule for what detection runs on, in memory and streaming (quantizer paths included)."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

import optimum_superweight  # noqa: F401  (registers the quantizer)
from optimum_superweight import SuperWeightConfig
from optimum_superweight.detection import inputs as detection  # where every path encodes its prompts
from optimum_superweight.ablation import PROBE_PROMPT
from optimum_superweight.config import DEFAULT_DETECTION_PROMPT
from optimum_superweight.detection import detect_super_weights
from optimum_superweight.prompts import DEFAULT_PROMPTS, PAPER_PROMPT, detection_inputs, fallback_token_ids
from optimum_superweight.streaming import detect_super_weights_streaming
from optimum_superweight.testing import build_tiny_model, tiny_tokenizer

PLANTED = [(1, 5, 7)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    model = build_tiny_model("llama", super_weights=PLANTED)
    with_tokenizer = tmp_path_factory.mktemp("with-tokenizer")
    model.save_pretrained(with_tokenizer)
    tiny_tokenizer().save_pretrained(with_tokenizer)
    without = tmp_path_factory.mktemp("without-tokenizer")
    model.save_pretrained(without)
    return with_tokenizer, without


@pytest.fixture()
def seen(monkeypatch):
    """The prompt labels every detection run used, in order."""
    calls: list[list[str]] = []

    def spy(tokenizer, prompts, vocab_size):
        labels, ids = detection_inputs(tokenizer, prompts, vocab_size)
        calls.append(labels)
        return labels, ids

    monkeypatch.setattr(detection, "detection_inputs", spy)
    return calls


def test_the_paper_prompt_is_defined_once():
    assert DEFAULT_PROMPTS[0] is PAPER_PROMPT and PROBE_PROMPT is PAPER_PROMPT and DEFAULT_DETECTION_PROMPT is PAPER_PROMPT


def test_quantizer_detects_on_the_same_prompts_in_memory_and_low_memory(folders, seen):
    with_tokenizer, _ = folders
    in_memory = AutoModelForCausalLM.from_pretrained(with_tokenizer, quantization_config=SuperWeightConfig())
    low_memory = AutoModelForCausalLM.from_pretrained(with_tokenizer, quantization_config=SuperWeightConfig(low_memory=True))
    assert seen == [list(DEFAULT_PROMPTS), list(DEFAULT_PROMPTS)]  # text prompts via the tokenizer, both paths
    coords = lambda m: [(s["module"], s["row"], s["col"]) for s in m.config.quantization_config.super_weights]  # noqa: E731
    assert coords(in_memory) == coords(low_memory) == [("model.layers.1.mlp.down_proj", 5, 7)]


def test_without_a_tokenizer_both_paths_use_the_same_fixed_ids_and_say_so(folders, seen, caplog):
    _, without = folders
    with caplog.at_level(logging.WARNING, logger="optimum_superweight.prompts"):
        AutoModelForCausalLM.from_pretrained(without, quantization_config=SuperWeightConfig())
        AutoModelForCausalLM.from_pretrained(without, quantization_config=SuperWeightConfig(low_memory=True))
    fixed = [f"<token ids {p[:4]}...>" for p in fallback_token_ids(256)]
    assert len(seen) == 2 and seen[0] == seen[1] and len(seen[0]) == len(fixed)
    assert sum("no tokenizer" in r.getMessage() for r in caplog.records) == 2


def test_streaming_api_reads_the_folder_tokenizer_like_the_in_memory_api(folders):
    with_tokenizer, _ = folders
    model = AutoModelForCausalLM.from_pretrained(with_tokenizer)
    streamed = detect_super_weights_streaming(with_tokenizer)
    loaded = detect_super_weights(model, tiny_tokenizer(), confirm=False)
    assert streamed.prompts == loaded.prompts == list(DEFAULT_PROMPTS)
    assert [(c.module, c.row, c.col, c.value) for c in streamed.candidates] == [
        (c.module, c.row, c.col, c.value) for c in loaded.candidates
    ]


def test_detection_inputs_validate():
    with pytest.raises(ValueError, match="tokenizer is None"):
        detection_inputs(None, ["text"], 100)
    with pytest.raises(ValueError, match=r"token ids in \[0, 100\)"):
        detection_inputs(None, [[1, 200]], 100)
    assert detection_inputs(None, [[1, 2]], 100) == (["<token ids [1, 2]...>"], [[1, 2]])
