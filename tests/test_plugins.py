"""A third-party plugin, unknown to slimquant, found through a real entry point on sys.path."""

import copy
import sys
import textwrap

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import slimquant
from slimquant import plugins as registry
from slimquant.errors import RecipeError
from slimquant.quant.fake_linear import FakeQuantLinear
from slimquant.testing import tiny_model, token_samples

PLUGIN_SOURCE = '''
from typing import Literal
import torch
from pydantic import BaseModel
from slimquant import hookimpl
from slimquant.sdk import WeightQuantizer
from slimquant.quant.math import quantize_weight_with, weight_qparams

CALLS = []

class Config(BaseModel):
    name: Literal["halfrange"] = "halfrange"
    ratio: float = 0.5

class HalfRange(WeightQuantizer):
    """Round-to-nearest with every range shrunk by `ratio` (a deliberately odd algorithm)."""
    name = "halfrange"
    Config = Config

    def __init__(self, config):
        self.config = config

    @hookimpl
    def quantize_weight(self, ctx, name, module, args):  # no "is this mine?" test: the runtime calls only its own
        CALLS.append((self.name, name))
        s, z = weight_qparams(module.weight, args.bits, args.symmetric, args.group_size,
                              clip_ratio=self.config.ratio)
        return quantize_weight_with(module.weight, s, z, args.bits, args.group_size)


class QuarterRange(HalfRange):
    name = "quarterrange"

    class Config(BaseModel):
        name: Literal["quarterrange"] = "quarterrange"
        ratio: float = 0.25
'''

BROKEN_SOURCE = "raise ImportError('this plugin is broken on purpose')\n"


@pytest.fixture()
def third_party(tmp_path, monkeypatch):
    (tmp_path / "halfrange_plugin.py").write_text(PLUGIN_SOURCE)
    (tmp_path / "broken_plugin.py").write_text(BROKEN_SOURCE)
    for dist, module, cls, ep in [("halfrange-plugin", "halfrange_plugin", "HalfRange", "halfrange"),
                                  ("quarter-plugin", "halfrange_plugin", "QuarterRange", "quarterrange"),
                                  ("broken-plugin", "broken_plugin", "Nothing", "broken")]:
        info = tmp_path / f"{dist.replace('-', '_')}-1.2.3.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
        (info / "entry_points.txt").write_text(textwrap.dedent(f"""
            [slimquant.plugins]
            {ep} = {module}:{cls}
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for mod in ("halfrange_plugin", "broken_plugin"):
        sys.modules.pop(mod, None)


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def test_listing_does_not_import_plugins(third_party):
    found = registry.installed()
    assert found["halfrange"].distribution == "halfrange-plugin" and found["halfrange"].version == "1.2.3"
    assert "minmax" in found and "broken" in found
    assert "halfrange_plugin" not in sys.modules and "broken_plugin" not in sys.modules


def test_third_party_plugin_is_selected_by_name(third_party):
    model = tiny_llama()
    samples = [torch.randint(0, 128, (1, 16)) for _ in range(2)]
    slimquant.quantize(model, {"scheme": "W8A16", "algorithms": [{"name": "halfrange", "ratio": 0.9}],
                               "runtime": {"progress": False}}, samples=samples)
    import halfrange_plugin

    assert len(halfrange_plugin.CALLS) == 14  # 7 Linears x 2 layers
    assert "broken_plugin" not in sys.modules  # installed but not named: never imported


def test_a_broken_plugin_names_itself_and_spares_the_others(third_party):
    with pytest.raises(RecipeError, match="broken.*failed to import"):
        registry.plan_algorithms(slimquant.Recipe.parse({"algorithms": ["broken"]}))
    plan = registry.plan_algorithms(slimquant.Recipe.parse({"algorithms": ["halfrange"]}))
    assert plan.weight_algorithm == "halfrange"


def test_plugin_arguments_are_checked_by_its_own_model(third_party):
    with pytest.raises(RecipeError, match="ratio"):
        registry.plan_algorithms(slimquant.Recipe.parse({"algorithms": [{"name": "halfrange", "ratio": "x"}]}))


def test_two_weight_algorithms_need_overrides(third_party):
    with pytest.raises(RecipeError, match="several weight algorithms"):
        registry.plan_algorithms(slimquant.Recipe.parse({"algorithms": ["halfrange", "quarterrange"]}))
    # minmax named beside another weight algorithm only sets activation arguments
    plan = registry.plan_algorithms(slimquant.Recipe.parse({"algorithms": [{"name": "minmax", "act_method": 2},
                                                                           "halfrange"]}))
    assert (plan.weight_algorithm, plan.act_algorithm) == ("halfrange", "minmax")
    recipe = slimquant.Recipe.parse({"algorithms": ["minmax"], "overrides": [
        {"targets": ["re:.*down_proj"], "algorithm": "halfrange", "weights": {"bits": 4}}]})
    model = tiny_llama()
    report = slimquant.quantize(model, recipe.model_copy(update={"runtime": recipe.runtime.model_copy(
        update={"progress": False})}), samples=[torch.randint(0, 128, (1, 16))])
    import halfrange_plugin

    assert sorted(halfrange_plugin.CALLS) == [("halfrange", "model.layers.0.mlp.down_proj"),
                                              ("halfrange", "model.layers.1.mlp.down_proj")]
    assert report.plans["model.layers.0.mlp.down_proj"].scheme.weights.bits == 4
    assert report.plans["model.layers.0.mlp.up_proj"].scheme.weights.bits == 8
    assert model.model.layers[1].mlp.down_proj.bits == 4


def test_hooks_of_reports_what_a_plugin_implements(third_party):
    cls = registry.load_plugin_class("halfrange")
    assert registry.hooks_of(cls) == ["quantize_weight"]
    assert registry.hooks_of(registry.load_plugin_class("minmax")) == ["check", "observe", "quantize_weight",
                                                                       "quantize_act"]


def test_a_plugin_is_only_called_for_the_linears_its_plan_names(third_party):
    """Neither plugin checks which algorithm it is asked for: direct dispatch keeps them apart."""
    recipe = slimquant.Recipe.parse({"algorithms": ["halfrange"], "runtime": {"progress": False}, "overrides": [
        {"targets": ["re:.*down_proj"], "algorithm": "quarterrange"}]})
    slimquant.quantize(tiny_llama(), recipe)
    import halfrange_plugin

    calls = halfrange_plugin.CALLS
    assert len(calls) == 14 and len(set(calls)) == 14
    assert all((algo == "quarterrange") == name.endswith("down_proj") for algo, name in calls)


@pytest.mark.parametrize("algorithm", ["minmax", "gptq", "sparse"])
def test_symmetric_scale_rule_reaches_every_uniform_weight_algorithm(algorithm):
    """weights.symmetric_scale: 'signed' (default) gives negative scales where a group's extreme weight is positive;
    'absmax' only positive ones. Every algorithm that chooses uniform-grid scales honours it."""
    model = tiny_model("llama")
    calib = token_samples(4, 32, seed=0)
    signs = {}
    for rule in ("signed", "absmax"):
        m = copy.deepcopy(model)
        slimquant.quantize(m, {"weights": {"bits": 4, "symmetric": True, "group_size": 32, "symmetric_scale": rule},
                               "algorithms": [algorithm], "runtime": {"progress": False}}, samples=calib)
        scales = torch.cat([mod.weight_scale.flatten() for mod in m.modules() if isinstance(mod, FakeQuantLinear)])
        signs[rule] = bool((scales < 0).any()), bool((scales > 0).all())
    assert signs == {"signed": (True, False), "absmax": (False, True)}
