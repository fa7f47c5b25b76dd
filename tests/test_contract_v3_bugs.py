"""Contract v3, items 2-7 of issue 32, each reproduced: what a plugin author got wrong without being told, now refused
by the runtime and by `slimquant.testing.check_plugin`, naming the plugin (and the Linear, key or path)."""

import io
import logging
import sys
import textwrap
from types import SimpleNamespace
from typing import Literal

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from rich.console import Console
from tiny_models import tiny_model

import slimquant
from slimquant.errors import PluginError, RecipeError
from slimquant.plugins import AlgorithmPlan, PluginSet, plan_algorithms
from slimquant.sdk import Exporter, WeightQuantizer
from slimquant.testing import ContractError, check_declaration, check_plugin

PLUGIN_SOURCE = '''
"""Plugins that each break one rule of the contract, as a third party wrote them."""
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from slimquant import hookimpl
from slimquant.sdk import Exporter, WeightQuantizer
from slimquant.quant.fake_linear import FakeQuantLinear
from slimquant.quant.math import round_to_nearest
from slimquant.stats import Reduce, Statistic


class Forgot(WeightQuantizer):
    """quantize_weight written but not marked @hookimpl: only observe reaches the runtime."""
    name = "forgot"
    requires_calibration_data = True

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: Literal["forgot"] = "forgot"

    def __init__(self, config):
        self.config = config

    @hookimpl
    def observe(self, ctx, name, module, inputs, output):
        pass

    def quantize_weight(self, ctx, name, module, args):
        return round_to_nearest(module.weight, args)


class ObserveOnly(Forgot):
    name = "observeonly"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: Literal["observeonly"] = "observeonly"

    quantize_weight = None


class Loose(WeightQuantizer):
    """A Config without extra="forbid": pydantic ignores unknown keys."""
    name = "loose"

    class Config(BaseModel):
        name: Literal["loose"] = "loose"
        strength: float = 0.5

    def __init__(self, config):
        self.config = config

    @hookimpl
    def quantize_weight(self, ctx, name, module, args):
        return round_to_nearest(module.weight, args)


class Absmax(Statistic):
    reductions = {"value": Reduce.MAX}

    def __init__(self):
        self.value = None

    def update(self, x):
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0)
        self.value = m if self.value is None else torch.maximum(self.value, m)


class PlainTensor(WeightQuantizer):
    """Declares distributed, but keeps its statistic as a plain tensor: never combined across processes."""
    name = "plaintensor"
    requires_calibration_data = True
    distributed = True
    wrapped = False  # True: the statistic is an Absmax Statistic, as the contract asks

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: Literal["plaintensor"] = "plaintensor"

    def __init__(self, config):
        self.config = config

    @hookimpl
    def observe(self, ctx, name, module, inputs, output):
        state = ctx.state(self.name)
        if self.wrapped:
            state.setdefault(name, Absmax()).update(inputs)
            return
        m = inputs.detach().abs().reshape(-1, inputs.shape[-1]).amax(0)
        state[name] = m if name not in state else torch.maximum(state[name], m)

    @hookimpl
    def quantize_weight(self, ctx, name, module, args):
        ctx.state(self.name).pop(name, None)
        return round_to_nearest(module.weight, args)


class CalibratedPathBreaks(WeightQuantizer):
    """Data-free, and correct alone; behind a smoother (calibrated path) it fails."""
    name = "dataonlyalone"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: Literal["dataonlyalone"] = "dataonlyalone"

    def __init__(self, config):
        self.config = config

    @hookimpl
    def quantize_weight(self, ctx, name, module, args):
        if ctx.inputs:
            raise RuntimeError("this plugin was only ever tried data-free")
        return round_to_nearest(module.weight, args)


class Npz(Exporter):
    """An exporter: every fake-quantized Linear's codes and scales in one .npz."""
    name = "npz"
    stray = False  # True: it also writes a file beside its output folder

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: Literal["npz"] = "npz"

    def __init__(self, config):
        self.config = config

    @hookimpl
    def export(self, model, output_dir, options):
        arrays = {}
        for name, module in model.named_modules():
            if isinstance(module, FakeQuantLinear):
                arrays[f"{name}.codes"] = module.qweight.codes.numpy()
                arrays[f"{name}.scale"] = module.qweight.scale.numpy()
        path = Path(output_dir) / "weights.npz"
        np.savez(path, **arrays)
        if self.stray:
            (Path(output_dir).parent / "npz.log").write_text("written beside the output")
        return [path]
'''


@pytest.fixture()
def third_party(tmp_path, monkeypatch):
    home = tmp_path / "site"
    home.mkdir()
    (home / "v3_plugins.py").write_text(PLUGIN_SOURCE)
    info = home / "v3_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: v3-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""
        [slimquant.plugins]
        forgot = v3_plugins:Forgot
        observeonly = v3_plugins:ObserveOnly
        loose = v3_plugins:Loose
        plaintensor = v3_plugins:PlainTensor
        dataonlyalone = v3_plugins:CalibratedPathBreaks

        [slimquant.exporters]
        npz = v3_plugins:Npz
    """))
    monkeypatch.syspath_prepend(str(home))
    import v3_plugins

    yield v3_plugins
    sys.modules.pop("v3_plugins", None)


def plan(recipe: dict, formats=None):
    return plan_algorithms(slimquant.Recipe.parse(recipe), formats)


def run_with(plugin):
    """A data-free W8A16 run of a tiny Llama with `plugin` as its weight algorithm (no entry point needed)."""
    from slimquant.runtime.pipeline import LayerwiseQuantizer

    recipe = slimquant.Recipe.parse({"scheme": "W8A16", "runtime": {"progress": False}})
    algorithms = AlgorithmPlan(PluginSet({plugin.name: plugin}), [], plugin.name, plugin.name)
    return LayerwiseQuantizer(tiny_model("llama"), recipe, torch.device("cpu"), algorithms).run()


# -- 2. a named plugin with no role ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["forgot", "observeonly"])
def test_a_named_algorithm_without_its_role_hook_is_refused_when_it_loads(third_party, name):
    with pytest.raises(RecipeError, match=rf"algorithms\[0\]: plugin '{name}' is a WeightQuantizer but has no "
                                          "@hookimpl quantize_weight"):
        plan({"scheme": "W4A16", "algorithms": [name]})


def test_the_contract_check_fails_for_a_forgotten_hookimpl_and_an_observe_only_plugin(third_party):
    with pytest.raises(ContractError, match="forgot: quantize_weight is not marked @hookimpl"):
        check_plugin(third_party.Forgot, archs=["llama"])
    with pytest.raises(ContractError, match="'observeonly' is a WeightQuantizer but has no @hookimpl quantize_weight"):
        check_plugin(third_party.ObserveOnly, archs=["llama"])


def _declared(bases: tuple, **attributes) -> type:
    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: Literal["declared"] = "declared"

    def quantize_weight(self, ctx, name, module, args):
        return None

    hooks = {"quantize_weight": slimquant.hookimpl(quantize_weight)}
    return type("Declared", bases, {"name": "declared", "Config": Config, **hooks, **attributes})


@pytest.mark.parametrize("bases, attributes, problem", [
    ((object,), {}, "plugin 'declared' takes no role: contract v3 plugins subclass the base of each role"),
    ((WeightQuantizer,), {"requires_calibration": True},
     "declared.requires_calibration is not a capability; did you mean requires_calibration_data?"),
    ((WeightQuantizer,), {"distributed": "yes"}, "declared.distributed must be bool, got 'yes'"),
    ((WeightQuantizer,), {"holds": frozenset()},
     r"declared.holds is not a capability of its roles \(WeightQuantizer\)"),
    ((WeightQuantizer,), {"smooth": slimquant.hookimpl(lambda self, ctx: None)},
     r"implements smooth, which none of its roles \(WeightQuantizer\) has"),
    ((Exporter,), {}, "an output format subclasses Exporter alone"),
])
def test_roles_and_capabilities_are_checked_when_a_plugin_loads(bases, attributes, problem):
    with pytest.raises(ContractError, match=problem):
        check_declaration(_declared(bases, **attributes))


def test_a_capability_set_wrongly_in_init_is_refused_once_built():
    from slimquant.plugins import build_plugin

    cls = _declared((WeightQuantizer,))
    cls.__init__ = lambda self, config: setattr(self, "row_parallel", 1) or setattr(self, "config", config)
    with pytest.raises(PluginError, match="declared.row_parallel must be bool, got 1"):
        build_plugin(cls, cls.Config())


def test_each_role_counts_as_one(third_party):
    """An algorithm named for its arguments alone still has a role: activations, an override, the grid."""
    assert plan({"algorithms": [{"name": "minmax", "act_method": 2}, "loose"]}).act_algorithm == "minmax"
    overridden = plan({"algorithms": ["minmax", {"name": "loose", "strength": 0.7}],
                       "overrides": [{"targets": ["*.down_proj"], "algorithm": "loose"}]})
    assert overridden.weight_algorithm == "minmax" and overridden.plugins.get("loose").config.strength == 0.7
    pytest.importorskip("slimquant_nf4")
    assert plan({"weights": {"bits": 4, "group_size": 16}, "algorithms": ["nf4", "minmax"]}).grid_algorithm == "nf4"


# -- 3. distributed = True taken on trust ------------------------------------------------------------------------------


def test_a_plain_tensor_in_a_distributed_plugins_state_is_refused_naming_plugin_and_key(third_party):
    from slimquant.runtime.pipeline import check_reducible_state

    plugins = PluginSet({"plaintensor": third_party.PlainTensor(third_party.PlainTensor.Config())})
    check_reducible_state({"plaintensor": {"q": third_party.Absmax(), "done": {}}}, plugins)
    with pytest.raises(PluginError, match=r"plugin 'plaintensor' declares distributed = True but keeps a tensor at "
                                          r"ctx.state\('plaintensor'\)\['q'\]\[1\]"):
        check_reducible_state({"plaintensor": {"q": [third_party.Absmax(), torch.zeros(3)]}}, plugins)
    holder = SimpleNamespace(hessian=torch.zeros(2, 2))
    with pytest.raises(PluginError, match=r"SimpleNamespace \(not a Statistic\) at ctx.state\('plaintensor'\)\['h'\]"):
        check_reducible_state({"plaintensor": {"h": holder}}, plugins)


def test_several_processes_check_the_state_before_reducing_it(third_party, monkeypatch):
    from slimquant.runtime import distributed
    from slimquant.runtime.context import LayerContext
    from slimquant.runtime.parallelism import Parallelism

    monkeypatch.setattr(distributed, "reduce_statistic", lambda *a: pytest.fail("reduced before the check"))
    plugins = PluginSet({"plaintensor": third_party.PlainTensor(third_party.PlainTensor.Config())})
    parallel = Parallelism(SimpleNamespace(several=True), plugins, {}, torch.device("cpu"))
    ctx = LayerContext(0, "model.layers.0", torch.nn.Identity(), torch.device("cpu"), {}, {}, [])
    ctx.state("plaintensor")["model.layers.0.mlp.up_proj"] = torch.ones(4)
    with pytest.raises(PluginError, match=r"\['model.layers.0.mlp.up_proj'\]"):
        parallel.reduce_statistics(ctx)


def test_the_contract_check_runs_the_state_check_of_a_distributed_plugin(third_party, monkeypatch):
    with pytest.raises(PluginError, match="plugin 'plaintensor' declares distributed = True but keeps a tensor"):
        check_plugin(third_party.PlainTensor, scheme="W8A16", archs=["llama"])
    monkeypatch.setattr(third_party.PlainTensor, "wrapped", True)
    check_plugin(third_party.PlainTensor, scheme="W8A16", archs=["llama"])


def test_gptq_keeps_only_statistics_in_its_state():
    pytest.importorskip("slimquant_gptq")
    from tiny_models import token_samples

    from slimquant.runtime.pipeline import statistics_checked

    with statistics_checked():
        slimquant.quantize(tiny_model("llama"), {"scheme": "W4A16", "algorithms": ["gptq"],
                                                 "runtime": {"progress": False}}, samples=token_samples(2, 16))


# -- 4. a QuantizedWeight changed after construction -------------------------------------------------------------------


class _ChangesItsResult(WeightQuantizer):
    name = "changes"

    def __init__(self, change):
        self.change = change

    @slimquant.hookimpl
    def quantize_weight(self, ctx, name, module, args):
        from slimquant.quant.math import round_to_nearest

        qweight = round_to_nearest(module.weight, args)
        self.change(qweight)
        return qweight


@pytest.mark.parametrize("change,problem", [
    (lambda q: setattr(q, "bits", 2), "codes outside the 2-bit range"),
    (lambda q: setattr(q, "scale", q.scale[:, :0]), "scale shape"),
    (lambda q: setattr(q, "codes", q.codes.to(torch.int32)), "codes must be int8"),
])
def test_a_qweight_changed_after_construction_is_refused_at_quantize_time(change, problem):
    with pytest.raises(PluginError, match=rf"model.layers.0.self_attn.q_proj: plugin 'changes' returned an invalid "
                                          rf"QuantizedWeight: {problem}"):
        run_with(_ChangesItsResult(change))


# -- 5. unknown keys, whatever the Config says -------------------------------------------------------------------------


def test_a_typo_is_refused_even_when_the_config_would_ignore_it(third_party):
    with pytest.raises(RecipeError, match=r"algorithms\[0\] \(loose\).*strenght: unknown key for 'loose'"):
        plan({"algorithms": [{"name": "loose", "strenght": 0.9}]})
    assert plan({"algorithms": [{"name": "loose", "strength": 0.9}]}).plugins.get("loose").config.strength == 0.9


def test_an_alias_is_a_known_key():
    from typing import Literal

    from pydantic import AliasChoices, BaseModel, Field

    from slimquant.plugins import validate_args

    class Aliased(WeightQuantizer):
        name = "aliased"

        class Config(BaseModel):
            name: Literal["aliased"] = "aliased"
            ratio: float = Field(0.5, validation_alias=AliasChoices("ratio", "clip_ratio"))

    assert validate_args(Aliased, {"name": "aliased", "clip_ratio": 0.7}, "here").ratio == 0.7
    with pytest.raises(RecipeError, match="here: 1 problem.*clip_ration: unknown key for 'aliased'"):
        validate_args(Aliased, {"name": "aliased", "clip_ration": 0.7}, "here")


def test_the_contract_check_asks_for_extra_forbid(third_party):
    with pytest.raises(ContractError, match=r"loose: Config must refuse unknown keys: add "
                                            r"`model_config = ConfigDict\(extra=\"forbid\"\)`"):
        check_declaration(third_party.Loose)


# -- 6. exporters, mixed recipes, exceptions in hooks, strays ----------------------------------------------------------


def test_the_contract_check_runs_an_exporter(third_party):
    from slimquant.export import ascend

    written = check_plugin(third_party.Npz, scheme="W8A16", archs=["llama", "gpt2"])
    assert written == {"llama": ["weights.npz"], "gpt2": ["weights.npz"]}
    reloaded = check_plugin(ascend.SafetensorsExporter, scheme="W4A16", archs=["llama"])  # exported, then reloaded
    assert "quant_model_weight_w4a16.safetensors" in reloaded["llama"]


def test_the_contract_check_fails_an_exporter_writing_outside_its_folder(third_party, monkeypatch):
    monkeypatch.setattr(third_party.Npz, "stray", True)
    with pytest.raises(PluginError, match=r"exporter 'npz' wrote .*npz.log outside its output folder"):
        check_plugin(third_party.Npz, scheme="W8A16", archs=["llama"])


def test_a_stray_file_is_reported_and_removed_and_what_was_there_is_kept(third_party, monkeypatch, tmp_path, caplog):
    from slimquant.export import save_quantized

    model = tiny_model("llama")
    slimquant.quantize(model, {"scheme": "W8A16", "runtime": {"progress": False}})
    parent = tmp_path / "outputs"
    parent.mkdir()
    (parent / "notes.txt").write_text("mine")
    monkeypatch.setattr(third_party.Npz, "stray", True)
    with pytest.raises(PluginError, match=rf"exporter 'npz' wrote {parent / 'npz.log'} outside its output folder"):
        save_quantized(model, parent / "out", save_type="npz")
    assert sorted(p.name for p in parent.iterdir()) == ["notes.txt"]
    (parent / "npz.log").write_text("there before")  # changed, not created: warned about (a log may be in use)
    with caplog.at_level(logging.WARNING, logger="slimquant.export"):
        save_quantized(model, parent / "out", save_type="npz")
    assert f"{parent / 'npz.log'} changed while exporter 'npz' wrote" in caplog.text
    assert (parent / "npz.log").read_text() == "written beside the output"


def test_the_contract_check_runs_a_data_free_plugin_behind_a_calibrated_one(third_party):
    pytest.importorskip("slimquant_smoothquant")
    from slimquant.testing import check_run

    check_run(third_party.CalibratedPathBreaks, scheme="W8A16", archs=["llama"])  # alone: data-free, fine
    with pytest.raises(PluginError, match="plugin 'dataonlyalone' failed in quantize_weight on model.layers.0"):
        check_plugin(third_party.CalibratedPathBreaks, scheme="W8A16", archs=["llama"])


class _Raises(WeightQuantizer):
    name = "raises"

    def __init__(self, error):
        self.error = error

    @slimquant.hookimpl
    def quantize_weight(self, ctx, name, module, args):
        raise self.error


def test_an_exception_in_a_hook_names_the_plugin_the_hook_and_the_linear():
    error = AttributeError("'NoneType' object has no attribute 'hessian'")
    with pytest.raises(PluginError, match=r"^plugin 'raises' failed in quantize_weight on "
                                          r"model.layers.0.self_attn.q_proj: AttributeError: 'NoneType'") as caught:
        run_with(_Raises(error))
    assert caught.value.__cause__ is error


@pytest.mark.parametrize("error", [RecipeError("weights.bits: 3 is not supported"), KeyboardInterrupt()])
def test_user_errors_and_interrupts_pass_through_a_hook_unchanged(error):
    plugins = PluginSet({"raises": _Raises(error)})
    with pytest.raises(type(error)) as caught:
        plugins.call("raises", "quantize_weight", ctx=None, name="x", module=None, args=None)
    assert caught.value is error


# -- 7. what the CLI prints --------------------------------------------------------------------------------------------


def test_a_data_free_summary_does_not_print_an_unmeasured_error(capsys):
    from slimquant.workflow import _print_summary

    report = slimquant.quantize(tiny_model("llama"), {"scheme": "W8A16", "runtime": {"progress": False}})
    assert report.data_free
    _print_summary(Console(), report, {"size_mb_before": 1.0, "size_mb_after": 0.5, "quantize_seconds": 0.1})
    out = capsys.readouterr().out
    assert "not measured (data-free)" in out and "e+00" not in out


def test_the_plan_line_names_the_grid_provider():
    pytest.importorskip("slimquant_nf4")
    pytest.importorskip("slimquant_gptq")
    from slimquant.workflow import _print_plan

    recipe = slimquant.Recipe.parse({"weights": {"bits": 4, "group_size": 16}, "algorithms": ["nf4", "gptq"]})
    text = io.StringIO()
    _print_plan(Console(file=text, width=200), SimpleNamespace(recipe=recipe, output=None, plan_notes=[]),
                plan_algorithms(recipe), data_free=False)
    assert "weights=gptq on the nf4 grid " in text.getvalue()
