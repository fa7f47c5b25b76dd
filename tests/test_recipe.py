import json

import pytest

from slimquant.config import Recipe, Strategy, WeightArgs
from slimquant.errors import RecipeError
from slimquant.plugins import plan_algorithms


def test_presets_resolve_to_schemes():
    assert Recipe(scheme="W8A16").base_scheme().activations is None
    w4 = Recipe(scheme="W4A16").base_scheme()
    assert (w4.weights.bits, w4.weights.group_size, w4.weights.strategy) == (4, 128, Strategy.GROUP)
    dyn = Recipe(scheme="W8A8_DYNAMIC").base_scheme()
    assert dyn.activations.dynamic and dyn.activations.strategy == Strategy.TOKEN
    assert dyn.type_name == "W8A8_DYNAMIC"
    assert Recipe(scheme="W8A8").base_scheme().type_name == "W8A8"


def test_explicit_weights_override_the_preset():
    r = Recipe.parse({"scheme": "W8A8", "weights": {"bits": 4, "group_size": 64, "symmetric": False}})
    s = r.base_scheme()
    assert s.weights.bits == 4 and s.weights.group_size == 64 and s.activations.bits == 8
    assert s.type_name == "W4A8"


@pytest.mark.parametrize("data,field", [
    ({"schem": "W8A16"}, "schem"),
    ({"scheme": "W9A16"}, "scheme"),
    ({"weights": {"bits": 9}}, "weights.bits"),
    ({"weights": {"bits": 0}}, "weights.bits"),
    ({"weights": {"bits": 1}}, "1-bit weights have two levels"),  # 1 bit: asymmetric only
    ({"weights": {"bits": 4, "group_size": 0.5}}, "group_size"),
    ({"weights": {"bits": 4, "group_size": -3}}, "group_size"),
    ({"weights": {"bits": 4, "group_size": "128"}}, "group_size"),
    ({"calibration": {"num_samples": 0}}, "calibration.num_samples"),
    ({"calibration": {"source": "text_file"}}, "path"),
    ({"calibration": {"source": "texts", "texts": ["  "]}}, "empty"),
    ({"model": {"device": "tpu"}}, "model.device"),
    ({"activations": {"strategy": "token"}}, "dynamic"),
    ({"algorithms": [{"name": "minmax"}, "minmax"]}, "named twice"),
    ({"algorithms": [{"act_method": 2}]}, "name"),
])
def test_mistakes_name_the_field(data, field):
    with pytest.raises(RecipeError) as info:
        Recipe.parse(data)
    assert field in str(info.value)


def test_per_channel_spellings_of_group_size():
    assert WeightArgs(bits=4, group_size=None).strategy == Strategy.CHANNEL
    for bad in (0, -1, -5):  # non-positive is an error, not a spelling of per-channel
        with pytest.raises(ValueError, match="group_size must be a positive integer"):
            WeightArgs(bits=4, group_size=bad)


def test_yaml_and_json_files_load_the_same_recipe(tmp_path):
    data = {"scheme": "W4A16", "weights": {"bits": 4, "group_size": 64}, "ignore": ["re:.*down_proj"],
            "algorithms": [{"name": "minmax", "clip_search": True}]}
    (tmp_path / "r.json").write_text(json.dumps(data))
    (tmp_path / "r.yaml").write_text(Recipe.parse(data).dump_yaml())
    assert Recipe.load(tmp_path / "r.json") == Recipe.load(tmp_path / "r.yaml")


def test_unreadable_or_malformed_recipe_files(tmp_path):
    with pytest.raises(RecipeError, match="cannot read"):
        Recipe.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("scheme: [W8A16\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.load(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping"):
        Recipe.load(listing)


def test_unknown_algorithm_lists_the_installed_ones():
    with pytest.raises(RecipeError) as info:
        plan_algorithms(Recipe.parse({"algorithms": ["gtpq"]}))
    assert "gtpq" in str(info.value) and "minmax" in str(info.value)


def test_plugin_arguments_are_validated_with_the_field_named():
    with pytest.raises(RecipeError) as info:
        plan_algorithms(Recipe.parse({"algorithms": [{"name": "minmax", "act_metod": 2}]}))
    assert "act_metod" in str(info.value)
    with pytest.raises(RecipeError, match="act_method"):
        plan_algorithms(Recipe.parse({"algorithms": [{"name": "minmax", "act_method": 4}]}))


def test_minmax_is_the_default_algorithm():
    plan = plan_algorithms(Recipe(scheme="W8A8"))
    assert plan.weight_algorithm == "minmax" and plan.act_algorithm == "minmax"
    assert list(plan.plugins.plugins) == ["minmax"]
