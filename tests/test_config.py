import json

import pytest

from optimum_superweight import SuperWeight, SuperWeightConfig


def test_defaults_are_json_and_round_trip():
    config = SuperWeightConfig(super_weights=[SuperWeight("model.layers.1.mlp.down_proj", 5, 7, value=2.5)])
    data = json.loads(json.dumps(config.to_dict()))
    assert data["quant_method"] == "superweight"
    again = SuperWeightConfig.from_dict(data)
    assert again.to_dict() == config.to_dict()
    assert again.get_super_weights()[0] == SuperWeight("model.layers.1.mlp.down_proj", 5, 7, value=2.5)


def test_unknown_keys_are_accepted():
    config = SuperWeightConfig.from_dict({"quant_method": "superweight", "bits": 8, "future_option": 1})
    assert config.bits == 8


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"bits": 5}, "bits"),
        ({"bits": True}, "bits"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": 4}, "group_size"),
        ({"group_size": "64"}, "group_size"),
        ({"symmetric": "yes"}, "symmetric"),
        ({"scale_dtype": "float8"}, "scale_dtype"),
        ({"detection_threshold": -1}, "detection_threshold"),
        ({"detection_prompts": []}, "detection_prompts"),
        ({"detection_layers": [-1]}, "detection_layers"),
        ({"max_super_weights": -2}, "max_super_weights"),
        ({"quant_method": "gptq"}, "quant_method"),
    ],
)
def test_invalid_values_name_field_value_and_accepted(kwargs, field):
    with pytest.raises(ValueError, match=f"SuperWeightConfig.{field}=") as info:
        SuperWeightConfig(**kwargs)
    assert "accepted values are" in str(info.value)


def test_bad_super_weight_entry_is_located():
    with pytest.raises(ValueError, match=r"super_weights\[1\]"):
        SuperWeightConfig(super_weights=[{"module": "a", "row": 0, "col": 0}, {"module": "b", "row": -3, "col": 0}])


def test_duplicate_super_weights_rejected():
    entry = {"module": "a", "row": 0, "col": 0}
    with pytest.raises(ValueError, match="repeated"):
        SuperWeightConfig(super_weights=[entry, entry])


def test_newer_format_asks_for_upgrade():
    with pytest.raises(ValueError, match="pip install -U optimum-superweight"):
        SuperWeightConfig(format_version=99)


def test_bits_per_weight_counts_scales_and_zero_points():
    assert SuperWeightConfig(bits=4, group_size=64).bits_per_weight == 4.5  # default: float16 scale + offset
    assert SuperWeightConfig(bits=4, group_size=128).bits_per_weight == 4.25
    assert SuperWeightConfig(bits=4, group_size=64, symmetric=True).bits_per_weight == 4.25
    assert SuperWeightConfig(bits=4, group_size=64, symmetric=False, zero_point="uint8").bits_per_weight == 4.375
    assert SuperWeightConfig(bits=4, group_size=64, method="rtn", symmetric=False).bits_per_weight == 4.375


def test_unset_choices_follow_the_method():
    default = SuperWeightConfig()
    assert (default.method, default.symmetric, default.zero_point) == ("hqq", False, "float")
    assert default.to_dict()["format_version"] == 2
    rtn = SuperWeightConfig(method="rtn")
    assert (rtn.symmetric, rtn.zero_point) == (True, "uint8") and rtn.to_dict()["format_version"] == 1
    assert SuperWeightConfig(method="gptq", symmetric=False).zero_point == "uint8"
    assert SuperWeightConfig(method="rtn", symmetric=False, zero_point="float").to_dict()["format_version"] == 2
    w8a8 = SuperWeightConfig(bits=8, group_size=-1, activation_bits=8)
    assert (w8a8.method, w8a8.symmetric) == ("rtn", True)
    clip = SuperWeightConfig(group_size=-1, clip_search=True, clip_objective="output")
    assert (clip.method, clip.symmetric) == ("rtn", True)


def test_checkpoints_written_before_float_offsets_load_as_written():
    """A format-1 config.json has no zero_point key: its asymmetric layers hold uint8 zero-points."""
    old = SuperWeightConfig(method="rtn", symmetric=False).to_dict()
    del old["zero_point"]
    again = SuperWeightConfig.from_dict(old)
    assert (again.method, again.symmetric, again.zero_point) == ("rtn", False, "uint8")
    new = SuperWeightConfig.from_dict(SuperWeightConfig().to_dict())
    assert (new.method, new.symmetric, new.zero_point) == ("hqq", False, "float")


@pytest.mark.parametrize(
    "options, field",
    [
        ({"zero_point": "int4"}, "zero_point"),
        ({"zero_point": "float", "symmetric": True}, "zero_point"),
        ({"zero_point": "float", "method": "gptq", "symmetric": False}, "zero_point"),
        ({"method": "hqq", "clip_search": True}, "clip_search"),
        ({"method": "rtn", "symmetric": False, "zero_point": "float", "clip_search": True}, "zero_point"),
        ({"method": "awq"}, "method"),
    ],
)
def test_new_fields_are_validated(options, field):
    with pytest.raises(ValueError, match=f"SuperWeightConfig.{field}="):
        SuperWeightConfig(**options)
