"""Hostile model cards: each ends in an error naming the line, or in exactly the coordinates written.

Malformed coordinates mixed with good ones, repeated YAML keys, YAML 1.1 number forms (1:30, 1_0, 0x1F, ...),
huge numbers, wrong types, anchors and aliases, non-UTF-8 bytes, and random corruptions of a generated card.
"""

from __future__ import annotations

import random
import re

import pytest

from optimum_superweight import SuperWeight, SuperWeightConfig, build_model_card, read_super_weights
from optimum_superweight.cards import MAX_COORDINATE, super_weights_from_text

GOOD = "layers[2].mlp.down_proj.weight[3968, 7003]"
MODULE = "model.layers.2.mlp.down_proj"


def _read(tmp_path, content: str | bytes):
    path = tmp_path / "README.md"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return read_super_weights(path)


def _coords(records):
    return [(sw.module, sw.row, sw.col) for sw in records]


# -- coordinates in the card text --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [
        "layers[3].mlp.down_proj.weight[12, abc]",
        "layers[3].mlp.down_proj.weight[1:30, 5]",
        "layers[3].mlp.down_proj.weight[3968]",
        "layers[3].mlp.down_proj.weight[1.5, 2]",
        "layers[3].mlp.down_proj.weight[-1, 2]",
        "layers[3].mlp.down_proj.weight[1e3, 2]",
        "layers[3].mlp.down_proj.weight[0x10, 2]",
        "layers[3].mlp.down_proj.weight[1_0, 2]",
        "layers[3].mlp.down_proj.weight[99999999999, 1]",
        f"layers[3].mlp.down_proj.weight[{MAX_COORDINATE + 1}, 1]",
        "layers[3].mlp.down_proj.weight[12, 34",
        "layers[3].mlp.down_proj.weight[12,\n34]",
        "layers[3].mlp.down_proj.weight[:, 7003]",
    ],
)
def test_a_malformed_text_coordinate_next_to_a_good_one_is_an_error_naming_its_line(tmp_path, bad):
    content = f"---\nlicense: mit\n---\n# Notes\n\nGood: {GOOD}\n\nBad: {bad}\n"
    with pytest.raises(ValueError, match=r"README\.md: line 8: `layers\[3\]"):
        _read(tmp_path, content)
    with pytest.raises(ValueError, match="line 3:"):
        super_weights_from_text(f"{GOOD}\n\n{bad}")


def test_prose_that_names_no_decoder_layer_is_not_a_coordinate(tmp_path):
    content = f"{GOOD}\nThe head lm_head.weight[1, 2] and embed_tokens.weight[a, b] and weight[x] are prose.\n"
    assert _coords(_read(tmp_path, content)) == [(MODULE, 3968, 7003)]


def test_huge_text_with_many_anchors_stays_linear():
    text = ("x.weight[ " * 20000) + GOOD
    assert _coords(super_weights_from_text(text)) == [(MODULE, 3968, 7003)]


# -- the YAML block --------------------------------------------------------------------------------------------
def _block(entries: str) -> str:
    return "---\nlicense: mit\nsuperweight:\n  super_weights:\n" + entries + "---\n# card\n"


GOOD_ENTRY = f"  - {{module: {MODULE}, row: 3968, col: 7003, value: -1.5}}\n"


@pytest.mark.parametrize("row", ["1:30", "1_0", "0x1F", "0o7", "017", "+1", "0b101", "'12'", "true", "[1]", "~", "1.0",
                                 "!!int 0x1F", "!!float 1_0.5", str(MAX_COORDINATE + 1), "-3"])
def test_a_malformed_entry_next_to_a_good_one_is_an_error_naming_its_line(tmp_path, row):
    content = _block(GOOD_ENTRY + f"  - module: {MODULE}\n    row: {row}\n    col: 5\n")
    with pytest.raises(ValueError, match=r"line (6|7)\b"):
        _read(tmp_path, content)


@pytest.mark.parametrize("value", ["1_000.5", "1:30.5", ".nan", ".inf", "'5'"])
def test_malformed_values_are_errors(tmp_path, value):
    with pytest.raises(ValueError, match="line"):
        _read(tmp_path, _block(f"  - {{module: {MODULE}, row: 1, col: 2, value: {value}}}\n"))


def test_plain_decimal_notation_is_read_exactly(tmp_path):
    content = _block(GOOD_ENTRY + f"  - {{module: {MODULE}, row: 0, col: {MAX_COORDINATE}, value: 1.0e-05}}\n")
    records = _read(tmp_path, content)
    assert [(sw.row, sw.col, sw.value) for sw in records] == [(3968, 7003, -1.5), (0, MAX_COORDINATE, 1e-05)]


@pytest.mark.parametrize(
    "content, line",
    [
        (_block(f"  - module: {MODULE}\n    row: 1\n    row: 2\n    col: 5\n"), 7),
        ("---\nsuperweight: {super_weights: []}\nsuperweight: {super_weights: [{module: m.layers.1.x, row: 1, col: 2}]}\n---\n", 3),
        ("---\nlicense: mit\nlicense: apache-2.0\nsuper_weights: [{module: m.layers.1.x, row: 1, col: 2}]\n---\n", 3),
        (_block(f"  - {{module: {MODULE}, row: 1, col: 2, col: 3}}\n"), 5),
    ],
)
def test_repeated_keys_are_errors_naming_the_line(tmp_path, content, line):
    with pytest.raises(ValueError, match=rf"duplicate key .* at line {line}\b"):
        _read(tmp_path, content)


@pytest.mark.parametrize(
    "content, match",
    [
        ("---\nsuperweight: [1, 2]\n---\n", "line 2: metadata key 'superweight' is a list"),
        ("---\nsuperweight: {super_weights: 'model.layers.1.mlp.down_proj:5,7'}\n---\n", "line 2: 'superweight.super_weights' is a str"),
        (_block("  - [model.layers.1.mlp.down_proj, 5, 7]\n"), "line 5: 'superweight.super_weights\\[0\\]' is invalid"),
        (_block("  - {module: 5, row: 1, col: 2}\n"), "line 5: .*module=5"),
        ("---\na: [1, 2]\nb: *x\n---\n" + GOOD, "line 3: the YAML metadata uses an alias"),
        ("---\na: &x [1, 2]\n---\n" + GOOD, "line 2: the YAML metadata defines an anchor"),
        ("---\nx: !!python/object/apply:os.system ['true']\n---\n", "malformed"),
        ("---\nrow: " + "9" * 5000 + "\n---\n", "cannot be read"),
    ],
)
def test_wrong_types_aliases_and_tags(tmp_path, content, match):
    with pytest.raises(ValueError, match=match):
        _read(tmp_path, content)


def test_non_utf8_bytes_name_the_line(tmp_path):
    with pytest.raises(ValueError, match="line 3 is not UTF-8"):
        _read(tmp_path, b"# card\n" + GOOD.encode() + b"\nbad \xff\xfe byte\n")


# -- random corruptions of a generated card ---------------------------------------------------------------------
_JUNK = ["1:30", "1_0", "0x1F", "-1", "abc", "1.5", "", "1e3", "99999999999999", "[1]", "{a: 1}", "&a 5", "*a", "'7'",
         "7\n    row: 8", ": :", "\xff", "0o7", "+3"]


def test_random_corruptions_end_in_a_clear_error_or_the_exact_coordinates(tmp_path):
    records = [SuperWeight(module=MODULE, row=3968, col=7003, value=-1.5),
               SuperWeight(module="model.layers.5.mlp.down_proj", row=12, col=34, value=2.25)]
    content = str(build_model_card(SuperWeightConfig(bits=4, super_weights=records)))
    expected = [(sw.module, sw.row, sw.col, sw.value) for sw in records]
    numbers = [m.span() for m in re.finditer(r"(?<=row: )\d+|(?<=col: )\d+|(?<=\[)\d+(?=, \d+\])|(?<=, )\d+(?=\])", content)]
    assert len(numbers) >= 8
    rng = random.Random(1234)
    outcomes = {"error": 0, "exact": 0}
    for _ in range(150):
        start, end = rng.choice(numbers)
        mutated = content[:start] + rng.choice(_JUNK) + content[end:]
        try:
            got = [(sw.module, sw.row, sw.col, sw.value) for sw in _read(tmp_path, mutated)]
        except ValueError as error:
            assert re.search(r"line \d+|malformed|not UTF-8|cannot be read", str(error)), str(error)
            outcomes["error"] += 1
            continue
        assert got == expected, (mutated, got)  # only corruptions of the text table (not read) may pass
        outcomes["exact"] += 1
    assert outcomes["error"] > 50 and outcomes["exact"] > 0


def test_a_model_card_object_is_held_to_the_same_reader(tmp_path):
    from huggingface_hub import ModelCard

    hostile = ModelCard(_block(f"  - module: {MODULE}\n    row: 1:30\n    col: 5\n"))
    assert hostile.data.to_dict()["superweight"]["super_weights"][0]["row"] == 90  # what yaml.safe_load made of it
    with pytest.raises(ValueError, match="line 5"):
        read_super_weights(hostile)
    with pytest.raises(ValueError, match="duplicate key"):
        read_super_weights(ModelCard("---\nsuper_weights: []\nsuper_weights: [{module: m.layers.1.x, row: 1, col: 2}]\n---\n"))
    edited = ModelCard(_block(GOOD_ENTRY))
    edited.data.superweight["super_weights"][0]["row"] = 12  # changed in Python after parsing: read as it is now
    assert [(sw.row, sw.col) for sw in read_super_weights(edited)] == [(12, 7003)]
