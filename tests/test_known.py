"""The shipped index of known super weights (model_cards/)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from optimum_superweight import SuperWeightConfig, known_super_weights, read_super_weights
from optimum_superweight.known import card_filename, find_known_model, known_models, model_cards_dir

REPO = Path(__file__).resolve().parent.parent

# The paper's directory (Table 2) and the authors' code, as in REFERENCE.md section 1: (layer, row, col).
EXPECTED = {
    "huggyllama/llama-7b": [(2, 3968, 7003)],
    "huggyllama/llama-13b": [(2, 2231, 2278), (2, 2231, 6939)],
    "huggyllama/llama-30b": [(3, 5633, 12817), (3, 5633, 17439), (10, 5633, 14386)],
    "meta-llama/Llama-2-7b-hf": [(1, 2533, 7890)],
    "meta-llama/Llama-2-13b-hf": [(3, 4743, 7678)],
    "mistralai/Mistral-7B-v0.1": [(1, 2070, 7310)],
    "allenai/OLMo-1B-0724-hf": [(1, 1764, 1710), (2, 1764, 8041)],
    "allenai/OLMo-7B-0724-hf": [(1, 269, 7467), (2, 269, 8275), (7, 269, 453), (24, 269, 2300)],
    "microsoft/Phi-3-mini-4k-instruct": [(2, 525, 808), (2, 1693, 808), (2, 1113, 808), (4, 525, 2723), (4, 1113, 2723),
                                         (4, 1693, 2723)],
    "meta-llama/Meta-Llama-3-8B": [(1, 788, 2427), (1, 1384, 2427), (1, 4062, 2427)],
    "HuggingFaceTB/SmolLM2-135M-Instruct": [(11, 507, 1229)],
}


def _coords(records):
    return [(sw.layer, sw.row, sw.col) for sw in records]


def test_index_holds_exactly_the_expected_models_and_coordinates():
    models = {m.model_id: m for m in known_models()}
    assert set(models) == set(EXPECTED)
    for model_id, coordinates in EXPECTED.items():
        entry = models[model_id]
        assert _coords(entry.super_weights) == coordinates, model_id
        assert all(sw.module == f"model.layers.{sw.layer}.mlp.down_proj" and sw.source == "index" for sw in entry.super_weights)
        assert entry.card.name == card_filename(model_id) and entry.source
        assert "https://arxiv.org/abs/2411.07191" in entry.references


def test_sources_are_recorded():
    assert "authors' code" in find_known_model("meta-llama/Meta-Llama-3-8B").source
    assert "not in the paper" in find_known_model("meta-llama/Meta-Llama-3-8B").source
    assert "paper" in find_known_model("huggyllama/llama-7b").source
    assert find_known_model("HuggingFaceTB/SmolLM2-135M-Instruct").source == "measured by optimum-superweight"


@pytest.mark.parametrize(
    "query, base",
    [
        ("HUGGYLLAMA/LLAMA-7B", "huggyllama/llama-7b"),
        ("mistralai/Mistral-7B-Instruct-v0.1", "mistralai/Mistral-7B-v0.1"),
        ("meta-llama/llama-2-7b-chat-hf", "meta-llama/Llama-2-7b-hf"),
        ("meta-llama/Meta-Llama-3-8B-Instruct", "meta-llama/Meta-Llama-3-8B"),
        ("https://huggingface.co/allenai/OLMo-7B-0724-hf/", "allenai/OLMo-7B-0724-hf"),
        ("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ],
)
def test_lookup_is_case_insensitive_and_resolves_variants(query, base):
    assert _coords(known_super_weights(query)) == EXPECTED[base]


def test_unknown_model_lists_the_index():
    with pytest.raises(ValueError, match=r"No known super weights for model_id='gpt2'.*huggyllama/llama-7b"):
        known_super_weights("gpt2")
    with pytest.raises(ValueError, match="Llama-2-13b-chat-hf"):  # not claimed to share the base coordinates
        SuperWeightConfig.from_known("meta-llama/Llama-2-13b-chat-hf")
    with pytest.raises(ValueError, match="model_id=''"):
        known_super_weights("")


def test_from_known_sets_super_weights_so_detection_is_skipped():
    config = SuperWeightConfig.from_known("allenai/OLMo-1B-0724-hf", bits=4, group_size=128)
    assert config.group_size == 128
    assert config.super_weights == [
        {"module": "model.layers.1.mlp.down_proj", "row": 1764, "col": 1710, "layer": 1, "source": "index"},
        {"module": "model.layers.2.mlp.down_proj", "row": 1764, "col": 8041, "layer": 2, "source": "index"},
    ]


def test_index_cards_are_ordinary_cards():
    for entry in known_models():
        assert [(sw.module, sw.row, sw.col) for sw in read_super_weights(entry.card)] == [
            (sw.module, sw.row, sw.col) for sw in entry.super_weights
        ]


def test_cards_folder_is_the_repo_folder_in_a_source_checkout():
    assert model_cards_dir().resolve() == (REPO / "model_cards").resolve()
    assert sorted(p.name for p in (REPO / "model_cards").glob("*.md")) == sorted(card_filename(m) for m in EXPECTED)


def test_smollm2_entry_records_the_measured_value():
    (sw,) = known_super_weights("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert sw.value == pytest.approx(5.876, abs=1e-3) and sw.classification == "super" and sw.impact > 3  # ppl ratio when zeroed (~4.8)


@pytest.mark.slow
def test_smollm2_card_value_is_the_checkpoint_weight(smollm2_path):
    from safetensors import safe_open

    (sw,) = known_super_weights("HuggingFaceTB/SmolLM2-135M-Instruct")
    with safe_open(str(smollm2_path / "model.safetensors"), framework="pt") as handle:
        weight = handle.get_tensor(f"{sw.module}.weight")
    assert float(weight[sw.row, sw.col]) == sw.value  # bit-exact


@pytest.mark.slow
def test_non_editable_install_ships_the_cards(tmp_path):
    target = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet", "--target", str(target),
         str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    shipped = target / "optimum_superweight" / "model_cards"
    assert shipped.is_dir() and not shipped.is_symlink()
    assert sorted(p.name for p in shipped.glob("*.md")) == sorted(card_filename(m) for m in EXPECTED)
    assert (target / "optimum" / "commands" / "register" / "superweight.py").is_file()
    assert not (target / "optimum" / "__init__.py").exists()  # must not shadow the real optimum package
    probe = subprocess.run(
        [sys.executable, "-c", "from optimum_superweight.known import model_cards_dir; print(model_cards_dir())"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert Path(probe.stdout.strip()).resolve() == shipped.resolve()
    shutil.rmtree(target)
