"""Contract v3's model-transform role: a whole-model rewrite that runs once, before any calibration input is caught,
on the data-free and the calibrated path, keeping the float model's function and its Linears."""

import sys
import textwrap

import pytest
import torch
from tiny_models import tiny_model, token_samples

import slimquant
from slimquant.errors import PluginError, RecipeError
from slimquant.sdk import FakeQuantLinear

PLUGIN_SOURCE = '''
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from slimquant.sdk import ModelTransform, hookimpl


class ScaleMLP(ModelTransform):
    """Every gated MLP's up_proj rows times `factor`, its down_proj columns divided by it: the same function."""
    name = "scalemlp"
    calls = 0

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: Literal["scalemlp"] = "scalemlp"
        factor: float = 2.0

    @hookimpl
    def check_model(self, ctx):
        return [f"{ctx.prefix}.{i}: no gated MLP (mlp.up_proj) to scale" for i, layer in enumerate(ctx.layers)
                if not hasattr(getattr(layer, "mlp", None), "up_proj")]

    @hookimpl
    def transform_model(self, ctx):
        type(self).calls += 1
        f = self.config.factor
        for layer in ctx.layers:
            layer.mlp.up_proj.weight.data.mul_(f)
            layer.mlp.down_proj.weight.data.div_(f)
        ctx.note(f"scaled {len(ctx.layers)} MLPs by {f}")


class TurnsDownInputs(ModelTransform):
    """An online rotation: every down_proj's input turns by a random orthogonal matrix at run time."""
    name = "turnsdown"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: Literal["turnsdown"] = "turnsdown"

    @hookimpl
    def transform_model(self, ctx):
        for i, layer in enumerate(ctx.layers):
            down = layer.mlp.down_proj
            q, _ = torch.linalg.qr(torch.randn(down.in_features, down.in_features,
                                               generator=torch.Generator().manual_seed(i)))
            down.weight.data = down.weight.data @ q
            ctx.set_input_transform(f"{ctx.prefix}.{i}.mlp.down_proj", q)


class AddsALinear(ModelTransform):
    name = "addsalinear"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: Literal["addsalinear"] = "addsalinear"

    @hookimpl
    def transform_model(self, ctx):
        ctx.layers[0].mlp.extra = nn.Linear(4, 4)
'''


@pytest.fixture
def transforms(tmp_path, monkeypatch):
    home = tmp_path / "site"
    home.mkdir()
    (home / "transform_plugins.py").write_text(PLUGIN_SOURCE)
    info = home / "transform_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: transform-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""
        [slimquant.plugins]
        scalemlp = transform_plugins:ScaleMLP
        addsalinear = transform_plugins:AddsALinear
        turnsdown = transform_plugins:TurnsDownInputs
    """))
    monkeypatch.syspath_prepend(str(home))
    import transform_plugins

    transform_plugins.ScaleMLP.calls = 0
    yield transform_plugins
    sys.modules.pop("transform_plugins", None)


def _down_proj(model) -> FakeQuantLinear:
    return model.model.layers[0].mlp.down_proj


def test_a_transform_runs_once_before_data_free_quantization(transforms):
    model, reference = tiny_model("llama"), tiny_model("llama")
    report = slimquant.quantize(model, {"scheme": "W8A16", "algorithms": ["scalemlp"], "runtime": {"progress": False}})
    assert transforms.ScaleMLP.calls == 1 and report.data_free
    assert report.transforms == ["scalemlp: scaled 2 MLPs by 2.0"]
    halved = reference.model.layers[0].mlp.down_proj.weight.detach() / 2
    assert torch.allclose(_down_proj(model).weight, halved, atol=float(halved.abs().max()) / 100)


def test_a_transform_runs_before_calibration_inputs_are_caught(transforms):
    """Static activation ranges of down_proj are observed on the transformed model: twice the untransformed ones."""
    recipe = {"scheme": "W8A8", "runtime": {"progress": False}}
    samples = token_samples(4, 16)
    plain, scaled = tiny_model("llama"), tiny_model("llama")
    slimquant.quantize(plain, recipe, samples=samples)
    slimquant.quantize(scaled, {**recipe, "algorithms": ["scalemlp", "minmax"]}, samples=samples)
    ratio = _down_proj(scaled).act_qparams.scale / _down_proj(plain).act_qparams.scale
    assert torch.allclose(ratio, torch.full_like(ratio, 2.0), rtol=1e-3)


def test_the_transformed_float_model_computes_what_the_original_did(transforms):
    from slimquant.plugins import PluginSet
    from slimquant.runtime.model_context import ModelContext, run_transforms

    model, reference = tiny_model("llama"), tiny_model("llama")
    ids = token_samples(1, 16, seed=3)[0]
    plugin = transforms.ScaleMLP(transforms.ScaleMLP.Config())
    ctx = ModelContext(model, "model.layers", model.model.layers, {}, torch.device("cpu"))
    assert run_transforms(ctx, PluginSet({"scalemlp": plugin}), ["scalemlp"]) == ["scalemlp: scaled 2 MLPs by 2.0"]
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)


def test_a_transform_that_changes_the_linears_is_a_plugin_error(transforms):
    with pytest.raises(PluginError, match=r"plugin 'addsalinear' changed the model's Linears in transform_model "
                                          r"\(model.layers.0.mlp.extra\)"):
        slimquant.quantize(tiny_model("llama"), {"scheme": "W8A16", "algorithms": ["addsalinear"],
                                                 "runtime": {"progress": False}})


def test_lazy_loading_refuses_a_transform_that_needs_the_whole_model(transforms, tmp_path):
    from slimquant.lazy import quantize_checkpoint

    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    with pytest.raises(RecipeError, match="algorithms: 'scalemlp' is a model transform that needs the whole model in "
                                          "memory; lazy loading reads one decoder layer at a time"):
        quantize_checkpoint({"model": {"path": str(model_dir)}, "scheme": "W8A16", "algorithms": ["scalemlp"]},
                      tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_transform_refuses_a_model_it_cannot_rewrite_before_any_weight_is_read(transforms):
    from slimquant.config.recipe import Recipe
    from slimquant.plugins import plan_algorithms
    from slimquant.runtime.preflight import check_before_loading

    recipe = Recipe.parse({"scheme": "W8A16", "algorithms": ["scalemlp"]})
    config = tiny_model("opt").config
    with pytest.raises(RecipeError, match=r"the model transforms cannot rewrite this model: scalemlp: "
                                          r"model.decoder.layers.0: no gated MLP \(mlp.up_proj\) to scale"):
        check_before_loading(recipe, plan_algorithms(recipe), config)
    check_before_loading(recipe, plan_algorithms(recipe), tiny_model("llama").config)
    with pytest.raises(RecipeError, match="scalemlp: model.decoder.layers.0: no gated MLP"):
        slimquant.quantize(tiny_model("opt"), {"scheme": "W8A16", "algorithms": ["scalemlp"],
                                               "runtime": {"progress": False}})
    assert transforms.ScaleMLP.calls == 0


def test_an_online_input_transform_stays_with_the_linear_through_quantization_and_checkpoints(transforms):
    from slimquant.runtime.layer_state import layer_state, restore_layer_state

    model, reference = tiny_model("llama"), tiny_model("llama")
    ids = token_samples(1, 16, seed=5)[0]
    recipe = {"scheme": "W8A8_DYNAMIC", "algorithms": ["turnsdown", "minmax"], "runtime": {"progress": False}}
    slimquant.quantize(model, recipe, samples=token_samples(4, 16))
    down = _down_proj(model)
    assert isinstance(down, FakeQuantLinear) and down.input_transform is not None
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0.05, atol=0.05)
    without = tiny_model("llama")
    slimquant.quantize(without, {**recipe, "algorithms": ["minmax"]}, samples=token_samples(4, 16))
    assert not torch.equal(down.codes, _down_proj(without).codes)  # it quantized the turned weight
    tensors, meta = layer_state(model.model.layers[0])
    fresh = tiny_model("llama").model.layers[0]
    restore_layer_state(fresh, tensors, meta)
    assert torch.equal(fresh.mlp.down_proj.input_transform, down.input_transform)
