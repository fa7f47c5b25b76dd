"""Contract v3's output features: what a plan produces (permuted groups, a codebook, fractional zeros, two-level
scales, sparsity, outliers, a quantized cache) is checked against what each format and grid holds, at plan time,
naming the plugin, the feature and the setting; and again on the quantized model before any format writes."""

from typing import Literal

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from tiny_models import tiny_model

import slimquant
from slimquant.config.recipe import Recipe
from slimquant.errors import OutputError, PluginError, RecipeError
from slimquant.export import save_quantized
from slimquant.loader import load_quantized
from slimquant.plugins import AlgorithmPlan, PluginSet, plan_algorithms
from slimquant.sdk import FakeQuantLinear, Feature, WeightQuantizer, features_of, round_to_nearest


def planned(recipe: dict, formats: list[str]):
    return plan_algorithms(Recipe.model_validate({"runtime": {"progress": False}, **recipe}), formats=formats)


def refused(recipe: dict, fmt: str) -> str:
    with pytest.raises(RecipeError) as err:
        planned(recipe, [fmt])
    return str(err.value)


@pytest.mark.parametrize("fmt", ["gguf", "gptq", "compressed-tensors"])
def test_a_codebook_grid_is_refused_before_loading_by_formats_of_uniform_grids(fmt):
    pytest.importorskip("slimquant_nf4")
    pytest.importorskip({"gguf": "slimquant_gguf", "gptq": "slimquant_gptq_export",
                         "compressed-tensors": "slimquant_compressed_tensors"}[fmt])
    recipe = {"weights": {"bits": 4, "group_size": 32, "scale_dtype": "float16"}, "algorithms": ["nf4"]}
    assert (f"save_type {fmt}: this format cannot hold codes standing for a codebook's values (a non-uniform grid) "
            "(codebook), which nf4 produces (codebook: nf4)") in refused(recipe, fmt)
    planned(recipe | {"weights": {"bits": 4, "group_size": 32}}, ["safe_tensor"])


@pytest.mark.parametrize("fmt", ["gguf", "gptq", "compressed-tensors"])
def test_fractional_zero_points_are_refused_before_loading(fmt):
    pytest.importorskip("slimquant_hqq")
    pytest.importorskip({"gguf": "slimquant_gguf", "gptq": "slimquant_gptq_export",
                         "compressed-tensors": "slimquant_compressed_tensors"}[fmt])
    recipe = {"weights": {"bits": 4, "symmetric": False, "group_size": 32, "scale_dtype": "float16"},
              "algorithms": ["hqq"]}
    assert "hqq" in refused(recipe, fmt) and "fractional zero points" in refused(recipe, fmt)


def test_two_level_scales_come_from_the_scheme():
    pytest.importorskip("slimquant_gptq_export")
    recipe = {"weights": {"bits": 4, "symmetric": True, "group_size": 32, "channel_bits": 8,
                          "scale_dtype": "float16"}}
    message = refused(recipe, "gptq")
    assert ("save_type gptq: this format cannot hold two-level scales (a per-channel scale times a per-group one) "
            "(two_level_scales), which the scheme produces (weights.channel_bits)") in message


class Declares(WeightQuantizer):
    """Round to nearest that declares what its output has, as its config says."""

    name = "declares"
    outputs: object = {Feature.PERMUTED_GROUPS: "always"}

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: Literal["declares"] = "declares"

    def output_features(self, plan):
        return self.outputs

    @slimquant.hookimpl
    def quantize_weight(self, ctx, name, module, args):
        return round_to_nearest(module.weight, args)


def _algorithm_plan(plugin, formats: list[str]) -> AlgorithmPlan:
    from slimquant.plugins import load_exporters

    return AlgorithmPlan(PluginSet({plugin.name: plugin}), [], plugin.name, plugin.name,
                         PluginSet(load_exporters(formats)))


def test_features_are_recorded_in_the_plan_with_who_makes_them_and_why():
    algorithms = _algorithm_plan(Declares(Declares.Config()), ["safe_tensor"])
    plan = algorithms.linear_plan(Recipe.model_validate({"scheme": "W4A16"}).base_scheme(), "declares")
    assert plan.feature_map() == {Feature.PERMUTED_GROUPS: ("declares", "always")}
    assert plan.has(Feature.PERMUTED_GROUPS) and not plan.has(Feature.CODEBOOK)
    assert algorithms.check(plan) == []


def test_a_malformed_feature_declaration_is_a_plugin_error():
    plugin = Declares(Declares.Config())
    plugin.outputs = {"permuted_groups": True}
    algorithms = _algorithm_plan(plugin, [])
    with pytest.raises(PluginError, match="plugin 'declares': output_features must return a dict of "
                                          "slimquant.sdk.Feature"):
        algorithms.linear_plan(Recipe.model_validate({"scheme": "W4A16"}).base_scheme(), "declares")


def test_what_a_saved_model_holds_is_refused_before_any_format_writes(tmp_path):
    """A model quantized for one format and saved in another (as `slimquant export` does) meets the same check on
    what its Linears actually hold, before anything is written."""
    pytest.importorskip("slimquant_compressed_tensors")
    model = tiny_model("llama")
    slimquant.quantize(model, {"weights": {"bits": 4, "symmetric": False, "group_size": 16},
                               "runtime": {"progress": False}})
    fake = next(m for m in model.modules() if isinstance(m, FakeQuantLinear))
    fake.weight_zero.add_(0.25)
    assert features_of(fake.qweight) == {Feature.FRACTIONAL_ZEROS}
    with pytest.raises(OutputError, match=r"save_type compressed-tensors: this format cannot hold fractional zero "
                                          r"points \(fractional_zeros\): model.layers.0.self_attn.q_proj"):
        save_quantized(model, tmp_path / "out", save_type=["safe_tensor", "compressed-tensors"])
    assert not (tmp_path / "out").exists()
    save_quantized(model, tmp_path / "out", save_type=["safe_tensor"])
    reloaded = load_quantized(tiny_model("llama"), tmp_path / "out")
    assert torch.equal(reloaded.model.layers[0].self_attn.q_proj.weight_zero, fake.weight_zero)
