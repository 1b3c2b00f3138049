import pytest

from optimum_superweight import SuperWeight


def test_layer_and_paper_notation_are_derived():
    sw = SuperWeight(module="model.layers.2.mlp.down_proj", row=3968, col=7003, value=-1.5)
    assert sw.layer == 2
    assert sw.paper_notation() == "layers[2].mlp.down_proj.weight[3968, 7003]"


def test_dict_round_trip_keeps_unknown_keys():
    data = {"module": "transformer.h.3.mlp.c_proj", "row": 1, "col": 2, "value": 0.25, "note": "x"}
    sw = SuperWeight.from_dict(data)
    assert sw.layer == 3 and sw.extra == {"note": "x"}
    assert SuperWeight.from_dict(sw.to_dict()) == sw
    assert sw.to_dict()["note"] == "x"


@pytest.mark.parametrize(
    "data, field",
    [
        ({"module": "m", "row": -1, "col": 0}, "row"),
        ({"module": "m", "row": 0, "col": 1.5}, "col"),
        ({"module": "", "row": 0, "col": 0}, "module"),
        ({"module": "m", "row": 0, "col": 0, "value": float("nan")}, "value"),
        ({"module": "m", "row": 0, "col": 0, "classification": "huge"}, "classification"),
    ],
)
def test_invalid_fields_are_named(data, field):
    with pytest.raises(ValueError, match=f"SuperWeight.{field}="):
        SuperWeight.from_dict(data)


def test_missing_keys_are_named():
    with pytest.raises(ValueError, match="lacks col"):
        SuperWeight.from_dict({"module": "m", "row": 1})
