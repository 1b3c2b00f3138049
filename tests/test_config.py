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


# -- fuzz: every field, many hostile values, constructor and config.json alike ----------------------------------------
from optimum_superweight.config import FIELDS


class _Opaque:
    def __repr__(self):
        return "<opaque>"


#: Values no field accepts (each field has a type these are not).
_NEVER = [_Opaque(), b"bytes", {1, 2}, 1 + 2j, float("nan")]
#: Hostile values per field: each must be refused with the field named.
_HOSTILE = {
    "quant_method": ["gptq", "", None, 1],
    "format_version": [0, 3, 99, "1", 1.0, True, None, -1],
    "bits": [True, False, 4.0, "4", 1, 5, 16, 0, -4, None, [4]],
    "group_size": [True, 10**12, 2**20 + 1, 4, 0, -2, 64.0, "64", None, [64]],
    "symmetric": [1, 0, "true", "yes", [True]],  # None: follows the method
    "zero_point": ["int4", "UINT8", "float16", 8, ["float"]],  # None: follows the method
    "scale_dtype": ["float64", "fp16", "torch.float16", 16, ["float16"]],  # None: follows weight_format
    "weight_format": ["nf4", "bnb_nf4", "BNB-NF4", "", None, 4, ["bnb-nf4"]],
    "modules_to_not_convert": ["lm_head", "", 1, {"lm_head": 1}, [1], [""], [None], ["lm_head", 2], True, [" lm_head"]],
    "super_weights": ["model.layers.1.mlp.down_proj", 1, {"module": "m", "row": 1, "col": 2}, [1], ["m"], [None],
                      [{"module": "m", "row": True, "col": 1}], [{"module": "m", "row": 1.0, "col": 1}],
                      [{"module": "m", "row": -1, "col": 1}], [{"module": "m", "row": 1}],
                      [{"module": "m", "row": 1, "col": 1, "value": "big"}], [{"module": "", "row": 1, "col": 1}]],
    "detect": [1, "false", None],
    "detection_prompts": ["Apple", [], [""], ["  "], [1], "", 1, {"a": 1}],
    "detection_threshold": [0, -1, True, "50", None, float("inf")],
    "detection_min_ratio": [0, -5.0, False, "100", float("inf")],
    "detection_layers": ["0,1", 3, [-1], [1.0], [True], [2**31], {"0": 1}],
    "max_super_weights": [-1, True, 2.0, "16", None, 10**9],
    "method": ["RTN", "awq", "", 1],  # None: the default, "hqq"
    "importance": ["Activations", "imatrix", "", 1, True],  # None: the default, resolved from method/low_memory
    "clip_search": [1, "yes"],  # None: follows weight_format (on for "bnb-nf4")
    "clip_objective": ["mse", None, 1],
    "calibration_tokens": [0, 63, 10**9, True, 8192.0, "8192"],  # None: the default, resolved from the method
    "damp": [0, 1, -0.1, True, "0.01", None, float("inf")],
    "act_order": [1, "no", None],
    "low_memory": [1, "true", None],
    "activation_bits": [4, 16, True, 8.0, "8"],
    "activation_scale": ["per_channel", None, 1],
    "hold_out_super_activation": [1, None, "yes"],
    "super_activation_channels": [507, "507", [-1], [True], [1.5]],
    "massive_activation_ratio": [1, 0.5, True, "20", float("inf")],
    "max_holdout_channels": [-1, 257, True, 8.0, None],
    "activation_holdout": [[1, 2], {"m": 5}, {"m": [-1]}, {1: [1]}, {"m": ["1"]}, "m"],
    "smoothquant_alpha": [0, 1, -0.5, True, "0.5", float("inf")],
    "embedding_bits": [4, 16, 0, True, 8.0, "8", [8]],

    "target_bits_per_weight": [0, 1.99, 9.5, -4.0, True, "4.0", float("inf"), float("nan"), [4.0]],
    "module_widths": ["m", {"m": 4}, {"m": {"bits": 5, "group_size": 64}}, {"m": {"bits": 4}},
                      {"m": {"bits": 4, "group_size": 64, "symmetric": True}}, {"": {"bits": 4, "group_size": 64}},
                      {"m": {"bits": 4.0, "group_size": 64}}, {"m": {"bits": 4, "group_size": 4}},
                      {"m": {"bits": True, "group_size": 64}}, [["m", {"bits": 4, "group_size": 64}]]],
    "digests": ["crc32:0", {"m": 5}, {"m": "md5:00"}, {"m": None}, [["m", "crc32:0"]], {"": "crc32:0"}],
}


def test_the_fuzz_covers_every_field():
    assert set(_HOSTILE) == set(FIELDS)


@pytest.mark.parametrize("field", list(FIELDS))
def test_every_hostile_value_is_refused_naming_the_field(field):
    for value in _HOSTILE[field] + _NEVER:
        for build in (lambda v=value: SuperWeightConfig(**{field: v}),
                      lambda v=value: SuperWeightConfig.from_dict({"quant_method": "superweight", field: v})):
            with pytest.raises((ValueError, TypeError)) as info:
                build()
            assert field in str(info.value), (field, value, str(info.value))


def test_string_where_a_list_is_expected_is_never_split_into_characters():
    with pytest.raises(ValueError, match=r"SuperWeightConfig.modules_to_not_convert='lm_head' is invalid: .*list"):
        SuperWeightConfig(modules_to_not_convert="lm_head")
    assert SuperWeightConfig(modules_to_not_convert=("lm_head",)).modules_to_not_convert == ["lm_head"]


def test_unknown_keyword_is_a_type_error_with_a_hint_and_unknown_json_key_a_warning(caplog):
    with pytest.raises(TypeError, match=r"'grop_size'.*did you mean 'group_size'"):
        SuperWeightConfig(grop_size=32)
    config = SuperWeightConfig.from_dict({"quant_method": "superweight", "future_option": 1, "dequantize": False})
    assert config.bits == 4 and "future_option" in caplog.text and "dequantize" not in caplog.text


def test_fields_assigned_after_construction_are_validated_when_the_quantizer_starts():
    from optimum_superweight.models.quantizer import SuperWeightQuantizer

    config = SuperWeightConfig()
    config.group_size = 10**12
    with pytest.raises(ValueError, match="SuperWeightConfig.group_size=1000000000000"):
        SuperWeightQuantizer(config)


def test_valid_values_round_trip_through_json():
    config = SuperWeightConfig(
        bits=3, group_size=2**20, symmetric=False, scale_dtype="bfloat16", modules_to_not_convert=("lm_head",),
        detection_layers=(0, 1), detection_prompts=("a",), digests={"m": "crc32:00000000"},
    )
    data = json.loads(json.dumps(config.to_dict()))
    assert data["format_version"] == 2 and data["detection_layers"] == [0, 1]  # hqq float offsets: format 2
    assert SuperWeightConfig.from_dict(data).to_dict() == data


def test_option_groups_are_read_only_views_of_the_flat_fields():
    """config.detection / .algorithm / .activations read the flat fields (which stay the keywords and the keys on disk)."""
    import dataclasses

    from optimum_superweight.config import ActivationSettings, AlgorithmSettings
    from optimum_superweight.detection import DetectionSettings

    config = SuperWeightConfig(bits=4, method="gptq", damp=0.05, act_order=False, calibration_tokens=1024,
                               detection_threshold=30.0, detection_layers=[1, 2], max_super_weights=3)
    assert config.algorithm == AlgorithmSettings("gptq", "none", False, "weight", 1024, 0.05, False)
    assert config.algorithm.needs_hessians and config.needs_calibration
    assert isinstance(config.detection, DetectionSettings)
    assert (config.detection.threshold, config.detection.layers, config.detection.max_super_weights) == (30.0, [1, 2], 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.algorithm.damp = 0.5
    config.damp = 0.02  # the flat field is the one source: the view follows it
    assert config.algorithm.damp == 0.02
    assert not config.activations.enabled
    w8a8 = SuperWeightConfig(bits=8, group_size=-1, activation_bits=8, activation_scale="per_tensor",
                             activation_holdout={"model.layers.0.mlp.down_proj": [3, 9]})
    assert isinstance(w8a8.activations, ActivationSettings) and w8a8.activations.enabled
    assert w8a8.activations.scale == "per_tensor" and w8a8.activations.holdout == {"model.layers.0.mlp.down_proj": (3, 9)}
    w8a8.activations.holdout["model.layers.0.mlp.down_proj"] = (1,)  # a copy: the config is not changed
    assert w8a8.activation_holdout == {"model.layers.0.mlp.down_proj": [3, 9]}
    # The file format stays flat: no group appears in config.json.
    assert not {"detection", "algorithm", "activations"} & set(w8a8.to_dict())
    assert SuperWeightConfig.from_dict(w8a8.to_dict()).activations == w8a8.activations
