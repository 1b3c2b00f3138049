"""Model cards: build, read back, hand-written paper notation, merging, and hostile input."""

from __future__ import annotations

import time

import pytest
from huggingface_hub import ModelCard

from optimum_superweight import SuperWeight, SuperWeightConfig, build_model_card, read_super_weights
from optimum_superweight.cards import (
    CARD_KEY,
    GENERATED_BEGIN,
    MAX_CARD_BYTES,
    MAX_YAML_NODES,
    merge_cards,
    normalize_perplexity,
    parse_card,
    super_weights_from_text,
)

SMOL = SuperWeight(
    module="model.layers.11.mlp.down_proj", row=507, col=1229, value=5.875732421875, input_spike=2996.0,
    output_spike=24021.9, classification="super", impact=4.8226, source="detected",
)
WEAK = SuperWeight(module="model.layers.2.mlp.down_proj", row=507, col=90, value=-0.8125, classification="weak",
                   impact=1.05, source="detected")


def _config(**kwargs):
    return SuperWeightConfig(bits=4, group_size=64, super_weights=[SMOL, WEAK], **kwargs)


def _card(**kwargs):
    defaults = dict(base_model="HuggingFaceTB/SmolLM2-135M-Instruct", repo_id="user/SmolLM2-135M-Instruct-sw4",
                    perplexity={"before": 14.99, "after": 16.2, "text": "pydoc_data.topics", "tokens": 4096},
                    checkpoint_bytes=95_000_000, dense_bytes=269_000_000)
    defaults.update(kwargs)
    return build_model_card(_config(), **defaults)


# -- building -------------------------------------------------------------------------------------------------
def test_card_metadata_follows_hub_conventions():
    card = _card(license="apache-2.0", tags=["smollm2"])
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data["base_model_relation"] == "quantized"
    assert data["license"] == "apache-2.0"
    assert {"superweight", "4-bit", "quantized", "smollm2"} <= set(data["tags"])
    block = data[CARD_KEY]
    assert block["super_weights"][0] == {k: v for k, v in SMOL.to_dict().items() if k != "source"}
    quantization = block["quantization"]
    assert "super_weights" not in quantization
    assert quantization["bits"] == 4 and quantization["group_size"] == 64 and quantization["quant_method"] == "superweight"
    assert block["perplexity"] == {"before": 14.99, "after": 16.2, "text": "pydoc_data.topics", "tokens": 4096}


def test_card_human_section():
    text = _card().text
    assert "Super weights are" in text and "arxiv.org/abs/2411.07191" in text
    assert "`layers[11].mlp.down_proj.weight[507, 1229]`" in text and "| 5.87573 | super | ×4.82 |" in text
    assert text.index("import optimum_superweight") < text.index('from_pretrained("user/SmolLM2-135M-Instruct-sw4")')
    assert "| this checkpoint | 16.2 (×1.081) |" in text and "| original (HuggingFaceTB/SmolLM2-135M-Instruct) | 14.99 |" in text
    assert "| this checkpoint (weight files) | 95.0 MB |" in text and "| same weights in 16-bit | 269.0 MB |" in text
    bare = build_model_card(_config()).text
    assert "## Perplexity" not in bare and "## Size" not in bare and "REPO_ID" in bare


def test_card_round_trip_through_text_file_and_folder(tmp_path):
    card = _card()
    expected = [sw.with_updates(source="card") for sw in (SMOL, WEAK)]
    assert read_super_weights(card) == expected
    assert [sw.value for sw in read_super_weights(ModelCard(str(card)))] == [5.875732421875, -0.8125]  # exact floats
    card.save(tmp_path / "README.md")
    assert read_super_weights(tmp_path / "README.md") == expected
    assert read_super_weights(str(tmp_path)) == expected


def test_card_without_super_weights_states_it():
    card = build_model_card(SuperWeightConfig(bits=8, group_size=-1))
    assert read_super_weights(card) == []
    assert "No super weight was found" in card.text and "8-bit" in card.data.tags


def test_build_model_card_rejects_bad_input():
    with pytest.raises(ValueError, match="quant_method='bitsandbytes'"):
        build_model_card({"quant_method": "bitsandbytes", "load_in_4bit": True})
    with pytest.raises(ValueError, match="base_model='not a repo'"):
        build_model_card(_config(), base_model="not a repo")
    with pytest.raises(ValueError, match="checkpoint_bytes=-1"):
        build_model_card(_config(), checkpoint_bytes=-1)
    with pytest.raises(ValueError, match="not quantized with optimum-superweight"):
        build_model_card(object())


def test_normalize_perplexity():
    assert normalize_perplexity((15.0, 16.0)) == {"before": 15.0, "after": 16.0}
    assert normalize_perplexity({"after": 16}) == {"after": 16.0}
    for bad, match in (({"before": 15.0}, "at least 'after'"), ({"after": float("nan")}, "finite"),
                       ({"after": 1.0, "bogus": 1}, "unknown keys"), ("high", "invalid"), ({"after": -2.0}, "> 0")):
        with pytest.raises(ValueError, match=match):
            normalize_perplexity(bad)


# -- configs from cards -----------------------------------------------------------------------------------------
def test_from_model_card_skips_detection(tmp_path):
    _card().save(tmp_path / "README.md")
    config = SuperWeightConfig.from_model_card(tmp_path / "README.md", bits=3, group_size=128)
    assert (config.bits, config.group_size) == (3, 128)
    records = config.get_super_weights()
    assert [(sw.module, sw.row, sw.col, sw.value, sw.source) for sw in records] == [
        ("model.layers.11.mlp.down_proj", 507, 1229, 5.875732421875, "card"),
        ("model.layers.2.mlp.down_proj", 507, 90, -0.8125, "card"),
    ]
    with pytest.raises(ValueError, match="cannot be combined"):
        SuperWeightConfig.from_model_card(tmp_path / "README.md", super_weights=[])


# -- hand-written cards ---------------------------------------------------------------------------------------------
HAND_WRITTEN = """---
license: other
---
# Llama-7B notes

The paper finds one super weight: `layers[2].mlp.down_proj.weight[3968, 7003]`. Zeroing it is catastrophic.
Written fully, model.layers.2.mlp.down_proj.weight[3968, 7003] is the same weight (listed once).
A second candidate, model.layers[31].mlp.down_proj.weight[ 12 ,34 ], and a decoy in prose that is no
decoder layer: lm_head.weight[1, 2].
"""


def test_hand_written_paper_notation_card(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(HAND_WRITTEN)
    records = read_super_weights(path)
    assert [(sw.module, sw.layer, sw.row, sw.col, sw.value, sw.source) for sw in records] == [
        ("model.layers.2.mlp.down_proj", 2, 3968, 7003, None, "card"),
        ("model.layers.31.mlp.down_proj", 31, 12, 34, None, "card"),
    ]
    config = SuperWeightConfig.from_model_card(path, bits=4)
    assert config.super_weights[0] == {"module": "model.layers.2.mlp.down_proj", "row": 3968, "col": 7003,
                                       "layer": 2, "source": "card"}


def test_text_notation_variants():
    found = super_weights_from_text(
        "transformer.h[3].mlp.c_proj.weight[5, 6] and (layers[1].mlp.down_proj.weight[2070,7310])"
    )
    assert [(sw.module, sw.row, sw.col) for sw in found] == [
        ("transformer.h.3.mlp.c_proj", 5, 6), ("model.layers.1.mlp.down_proj", 2070, 7310)
    ]
    assert super_weights_from_text("no coordinates; embed_tokens.weight[1, 2]; weight[3, 4]") == []


def test_metadata_block_wins_over_text():
    content = "---\nsuper_weights:\n- {module: model.layers.4.mlp.down_proj, row: 1, col: 2}\n---\nlayers[9].mlp.down_proj.weight[7, 8]\n"
    assert [(sw.layer, sw.row, sw.col) for sw in read_super_weights(ModelCard(content))] == [(4, 1, 2)]


def test_hostile_text_is_scanned_in_linear_time():
    text = "a." * (MAX_CARD_BYTES // 2 - 64) + "layers[0].mlp.down_proj.weight[1, 2]"
    start = time.perf_counter()
    assert len(super_weights_from_text(text)) == 1
    assert time.perf_counter() - start < 5.0


# -- bad input --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content, match",
    [
        ("---\nsuperweight: [unclosed\n---\ntext", "malformed"),
        ("---\nkey: value\n  bad indent: x\n---\n", "malformed"),
        ("---\nlicense: mit\nno closing line\n", "never closes"),
        ("---\n- a\n- b\n---\n", "not a mapping"),
        ("---\n!!python/object/apply:os.system ['echo pwned']\n---\n", "malformed"),
        ("---\nsuperweight: 5\n---\n", "accepted is a mapping"),
        ("---\nsuperweight: {card_version: 1}\n---\n", "no 'super_weights' list"),
        ("---\nsuperweight: {super_weights: {module: x}}\n---\n", "accepted is a list"),
        ("---\nsuperweight: {super_weights: [{module: model.layers.1.mlp.down_proj, row: 1}]}\n---\n", "lacks col"),
        ("---\nsuperweight: {super_weights: [{module: model.layers.1.mlp.down_proj, row: -1, col: 2}]}\n---\n", "row=-1"),
        ("---\nsuperweight: {super_weights: [{module: m.layers.1.x, row: 1, col: 2}, {module: m.layers.1.x, row: 1, col: 2}]}\n---\n", "repeats"),
        ("---\nsuperweight: {card_version: 99, super_weights: []}\n---\n", "Upgrade"),
        ("---\nlicense: mit\n---\n# A card without super weights\n", "no super weights found"),
        ("Plain text, no metadata and no coordinates.", "no super weights found"),
        ("---\nvalue: " + "9" * 5000 + "\n---\n", "cannot be read"),
    ],
)
def test_bad_cards_raise_clear_errors(tmp_path, content, match):
    path = tmp_path / "README.md"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        read_super_weights(path)


def _bomb(levels: int = 9) -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "---\n" + "\n".join(lines) + "\n---\nlayers[2].mlp.down_proj.weight[3968, 7003]\n"


def test_yaml_bomb_is_refused(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(_bomb())
    with pytest.raises(ValueError, match="alias"):
        read_super_weights(path)
    # A ModelCard built by huggingface_hub from the same text (safe_load shares the aliased lists) is refused too.
    card = ModelCard(_bomb())
    with pytest.raises(ValueError, match="more than"):
        read_super_weights(card)


def test_huge_and_oversized_cards_are_refused(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("layers[2].mlp.down_proj.weight[3968, 7003]\n" + "x" * MAX_CARD_BYTES)
    with pytest.raises(ValueError, match="at most 1048576 bytes"):
        read_super_weights(path)
    many = "---\ntags:\n" + "".join(f"- t{i}\n" for i in range(MAX_YAML_NODES + 1)) + "---\n"
    path.write_text(many)
    with pytest.raises(ValueError, match="(nodes|bytes)"):
        read_super_weights(path)
    deep = "---\nx: " + "[" * 40 + "]" * 40 + "\n---\n"
    path.write_text(deep)
    with pytest.raises(ValueError, match="nests deeper"):
        read_super_weights(path)


def test_bad_sources():
    with pytest.raises(ValueError, match="not an existing file or folder, nor a Hub repo id"):
        read_super_weights("/no/such/README.md")
    with pytest.raises(ValueError, match="source=42 is invalid"):
        read_super_weights(42)  # type: ignore[arg-type]


def test_folder_without_card_or_config(tmp_path):
    with pytest.raises(ValueError, match="neither README.md nor config.json"):
        read_super_weights(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="no super weights found"):
        read_super_weights(tmp_path)


def test_folder_config_json_is_read_when_the_readme_has_no_block(tmp_path):
    config = _config()
    (tmp_path / "config.json").write_text(
        __import__("json").dumps({"model_type": "llama", "quantization_config": config.to_dict()})
    )
    (tmp_path / "README.md").write_text("# My model\nNo metadata, but layers[5].mlp.down_proj.weight[1, 1] in prose.\n")
    assert [sw.module for sw in read_super_weights(tmp_path)] == [SMOL.module, WEAK.module]


# -- merging ----------------------------------------------------------------------------------------------------
def test_merge_replaces_transformers_default_card():
    from huggingface_hub import ModelCardData

    default = ModelCard.from_template(
        ModelCardData(tags=["custom"], library_name="transformers"),
        model_description="This is the model card of a 🤗 transformers model that has been pushed on the Hub. "
        "This model card has been automatically generated.",
    )
    merged = merge_cards(str(default), _card())
    assert "More Information Needed" not in merged.text and merged.text.startswith(GENERATED_BEGIN)
    assert "custom" in merged.data.tags and "superweight" in merged.data.tags
    assert len(read_super_weights(merged)) == 2


def test_merge_keeps_user_text_and_replaces_generated_section():
    user = "---\nlicense: mit\ntags: [mine]\n---\n# My model\n\nHand-written notes.\n"
    once = merge_cards(user, _card())
    assert "Hand-written notes." in once.text and once.data.license == "mit" and "mine" in once.data.tags
    twice = merge_cards(str(once), build_model_card(SuperWeightConfig(bits=8, super_weights=[SMOL])))
    assert twice.text.count(GENERATED_BEGIN) == 1 and "Hand-written notes." in twice.text
    assert [sw.module for sw in read_super_weights(twice)] == [SMOL.module] and "8-bit" in twice.text


def test_merge_replaces_unsafe_existing_card():
    merged = merge_cards(_bomb(), _card())
    assert merged.text.startswith(GENERATED_BEGIN) and "lol" not in str(merged)


def test_parse_card_returns_metadata_and_text():
    assert parse_card("---\na: 1\n---\nbody") == ({"a": 1}, "body")
    assert parse_card("no metadata") == ({}, "no metadata")


def test_merge_with_invalid_hub_metadata_starts_over():
    merged = merge_cards("---\nmodel-index: 5\n---\nuser text\n", _card())
    assert merged.text.startswith(GENERATED_BEGIN) and len(read_super_weights(merged)) == 2
