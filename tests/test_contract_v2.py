"""Contract v2 from the outside: a third-party plugin in one file (a data-free codebook algorithm, and one with
fractional zero points), installed through a real entry point, with no change to slimquant; plus the contract's
rules: plan-time checks, state lifetime, sub-block access, statistics that reduce across processes."""

import sys
import textwrap
from typing import Literal

import pytest
import torch
from pydantic import BaseModel
from tiny_models import tiny_model, token_samples
from typer.testing import CliRunner

import slimquant
from slimquant.errors import PluginError, RecipeError
from slimquant.plugins import plan_algorithms
from slimquant.sdk import WeightQuantizer
from slimquant.testing import check_plugin

PLUGIN_SOURCE = '''
"""Two data-free weight algorithms, written against slimquant's plugin contract v2 alone."""
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from slimquant import hookimpl
from slimquant.sdk import WeightQuantizer
from slimquant.quant.qweight import QuantizedWeight, contiguous_g_idx, num_groups

LOG_GRID = torch.tensor([-1.0, -0.5, -0.25, -0.125, -0.0625, -0.03125, -0.015625, 0.0,
                         0.015625, 0.03125, 0.0625, 0.125, 0.25, 0.5, 0.75, 1.0])


def _groups(w, group_size):
    size = group_size or w.shape[1]
    return contiguous_g_idx(w.shape[1], size).long(), num_groups(w.shape[1], size)


class Pow2(WeightQuantizer):
    """4-bit codes on a logarithmic codebook, absmax scale per group: a non-uniform grid."""
    name = "pow2"
    requires_calibration_data = False
    aliases = {"msmodelslim.w_method": "POW2"}

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: Literal["pow2"] = "pow2"

    def __init__(self, config):
        self.config = config

    @hookimpl
    def check(self, plan, name, shape):
        problems = []
        if plan.scheme.weights.bits != 4:
            problems.append("weights.bits: pow2 has a 4-bit codebook")
        if plan.scheme.weights.strategy == "tensor":
            problems.append("weights.strategy: pow2 scales per channel or group")
        return problems

    @hookimpl
    def quantize_weight(self, ctx, name, module, args):
        w = module.weight.detach().float()
        idx, groups = _groups(w, args.group_size)
        absmax = torch.zeros(w.shape[0], groups).scatter_reduce(1, idx.expand_as(w), w.abs(), "amax")
        scale = absmax.clamp_min(1e-8)
        normalized = w / scale[:, idx]
        codes = (normalized.unsqueeze(-1) - LOG_GRID).abs().argmin(-1) - 8
        return QuantizedWeight(codes.to(torch.int8), scale, None, 4, args.group_size, codebook=LOG_GRID.clone())


class HalfZero(WeightQuantizer):
    """Asymmetric rounding whose zero point is not rounded: a fractional zero point."""
    name = "halfzero"
    requires_calibration_data = False

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: Literal["halfzero"] = "halfzero"
        shrink: float = Field(1.0, gt=0, le=1)

    def __init__(self, config):
        self.config = config

    @hookimpl
    def quantize_weight(self, ctx, name, module, args):
        w = module.weight.detach().float()
        idx, groups = _groups(w, args.group_size)
        lo = torch.full((w.shape[0], groups), float("inf")).scatter_reduce(1, idx.expand_as(w), w, "amin")
        hi = torch.full((w.shape[0], groups), float("-inf")).scatter_reduce(1, idx.expand_as(w), w, "amax")
        qmin, qmax = -(2 ** (args.bits - 1)), 2 ** (args.bits - 1) - 1
        scale = ((hi - lo) * self.config.shrink / (qmax - qmin)).clamp_min(1e-8)
        zero = qmin - lo / scale
        codes = torch.round(w / scale[:, idx] + zero[:, idx]).clamp(qmin, qmax)
        return QuantizedWeight(codes.to(torch.int8), scale, zero, args.bits, args.group_size)
'''


@pytest.fixture()
def third_party(tmp_path, monkeypatch):
    (tmp_path / "pow2_plugin.py").write_text(PLUGIN_SOURCE)
    info = tmp_path / "pow2_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pow2-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""
        [slimquant.plugins]
        pow2 = pow2_plugin:Pow2
        halfzero = pow2_plugin:HalfZero
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("pow2_plugin", None)


def _no_text(monkeypatch):
    """Fail if anything generates or reads calibration text."""
    from slimquant import calibration, workflow

    def refuse(*args, **kwargs):
        raise AssertionError("a data-free run generated or read text")

    for module in (calibration, workflow):
        for fn in ("generate_samples", "build_samples"):
            if hasattr(module, fn):
                monkeypatch.setattr(module, fn, refuse)


def test_a_data_free_codebook_plugin_passes_the_contract_check(third_party, monkeypatch):
    import pow2_plugin

    _no_text(monkeypatch)
    changes = check_plugin(pow2_plugin.Pow2, scheme={"weights": {"bits": 4, "group_size": 16}})
    assert all(0 < change < 1.0 for change in changes.values()), changes


def test_fractional_zero_points_round_trip_exactly(third_party, monkeypatch):
    import pow2_plugin

    _no_text(monkeypatch)
    check_plugin(pow2_plugin.HalfZero, args={"shrink": 0.9}, scheme={"weights": {"bits": 4, "symmetric": False,
                                                                                "group_size": 32}})
    model = tiny_model("llama")
    slimquant.quantize(model, {"weights": {"bits": 4, "symmetric": False}, "algorithms": ["halfzero"],
                               "runtime": {"progress": False}})
    zero = model.model.layers[0].mlp.down_proj.weight_zero
    assert (zero != zero.round()).any()


def test_the_cli_runs_a_data_free_plugin_without_text(third_party, monkeypatch, tiny_model_dir, tmp_path):
    from slimquant.cli import app

    _no_text(monkeypatch)
    result = CliRunner().invoke(app, ["quantize", "--model", str(tiny_model_dir), "-a", "pow2", "--w-bits", "4",
                                      "--group-size", "16", "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "data-free" in result.output
    result = CliRunner().invoke(app, ["plugins"])
    assert "pow2" in result.output and "output formats" in result.output and "safe_tensor" in result.output


def test_plan_time_checks_name_the_field_before_any_model(third_party):
    with pytest.raises(RecipeError, match="weights.bits: pow2 has a 4-bit codebook"):
        plan_algorithms(slimquant.Recipe.parse({"weights": {"bits": 8}, "algorithms": ["pow2"]}))
    with pytest.raises(RecipeError, match=r"overrides\[0\]: pow2: weights.strategy"):
        plan_algorithms(slimquant.Recipe.parse({"weights": {"bits": 4}, "algorithms": ["minmax"], "overrides": [
            {"targets": ["*.o_proj"], "algorithm": "pow2", "weights": {"bits": 4, "strategy": "tensor"}}]}))
    with pytest.raises(RecipeError, match="activations.strategy: minmax.act_method=2"):
        plan_algorithms(slimquant.Recipe.parse({"scheme": "W8A8", "activations": {"strategy": "channel"},
                                                "algorithms": [{"name": "minmax", "act_method": 2}]}))


def test_an_msmodelslim_alias_reaches_a_third_party_plugin(third_party):
    from slimquant.compat.msmodelslim import QuantConfig

    assert QuantConfig(w_bit=4, a_bit=16, w_method="POW2", group_size=16).to_recipe().algorithms[-1]["name"] == "pow2"
    with pytest.raises(RecipeError, match="pip install slimquant-nosuch"):
        QuantConfig(w_method="NOSUCH")


class _WrongShape(WeightQuantizer):
    name = "wrongshape"

    class Config(BaseModel):
        name: Literal["wrongshape"] = "wrongshape"

    @slimquant.hookimpl
    def quantize_weight(self, ctx, name, module, args):
        from slimquant.quant.math import round_to_nearest

        return round_to_nearest(module.weight[:, :8], args)


def _run_with(plugin, samples=None):
    from slimquant.plugins import AlgorithmPlan, PluginSet
    from slimquant.runtime.pipeline import LayerwiseQuantizer

    recipe = slimquant.Recipe.parse({"scheme": "W8A16", "runtime": {"progress": False}})
    plan = AlgorithmPlan(PluginSet({plugin.name: plugin}), [], plugin.name, plugin.name)
    return LayerwiseQuantizer(tiny_model("llama"), recipe, torch.device("cpu"), plan).run(samples)


def test_a_plugin_returning_a_bad_qweight_is_named():
    with pytest.raises(PluginError, match="model.layers.0.self_attn.q_proj: plugin 'wrongshape' returned codes"):
        _run_with(_WrongShape())


# -- state lifetime, sub-blocks -----------------------------------------------------------------------------------


class _StateSpy(WeightQuantizer):
    name = "statespy"
    requires_calibration_data = True
    sequential = True

    class Config(BaseModel):
        name: Literal["statespy"] = "statespy"

    def __init__(self):
        self.seen: list[tuple[str, list[str]]] = []

    @slimquant.hookimpl
    def observe(self, ctx, name, module, inputs, output):
        ctx.state(self.name)[name] = True

    @slimquant.hookimpl
    def quantize_weight(self, ctx, name, module, args):
        from slimquant.quant.math import round_to_nearest

        self.seen.append((name, sorted(ctx.state(self.name))))
        return round_to_nearest(module.weight, args)


def test_state_lives_for_the_whole_layer_and_no_longer():
    spy = _StateSpy()
    _run_with(spy, token_samples(2, 8))
    seen = dict(spy.seen)
    layer0 = [n for n in seen if n.startswith("model.layers.0.")]
    assert len(layer0) == 7
    qkv = sorted(n for n in layer0 if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj"))
    assert seen["model.layers.0.self_attn.q_proj"] == qkv
    assert seen["model.layers.0.mlp.down_proj"] == sorted(layer0)  # earlier groups' state is still there
    assert all(n.startswith("model.layers.1.") for n in seen["model.layers.1.self_attn.q_proj"])


def test_a_sub_block_can_be_caught_and_run():
    from slimquant.runtime.catcher import catch_layer_inputs
    from slimquant.runtime.context import LayerContext

    model = tiny_model("llama")
    layer = model.model.layers[0]
    inputs = catch_layer_inputs(model, model.model.layers, token_samples(3, 8), torch.device("cpu"), False)
    ctx = LayerContext(0, "model.layers.0", layer, torch.device("cpu"), {}, {}, inputs)
    mlp_in = ctx.block_inputs("mlp", samples=2)
    residual = ctx.block_inputs("post_attention_layernorm", samples=2)
    assert len(mlp_in) == 2
    with torch.no_grad():
        whole = ctx.run_layer(inputs[:2])
        parts = [r[0][0] + m for r, m in zip(residual, ctx.run_block("mlp", mlp_in), strict=True)]
    for a, b in zip(whole, parts, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_leading_inputs_hold_exactly_the_samples_asked_for():
    from slimquant.runtime.context import LayerContext

    batch = ((), {"hidden_states": torch.randn(4, 8, 16), "position_embeddings": (torch.randn(4, 8, 2),) * 2})
    ctx = LayerContext(0, "model.layers.0", torch.nn.Identity(), torch.device("cpu"), {}, {}, [batch] * 3)
    kept = ctx.leading_inputs(6)
    assert [inp[1]["hidden_states"].shape[0] for inp in kept] == [4, 2]
    assert kept[1][1]["position_embeddings"][0].shape[0] == 2
    assert [inp[1]["hidden_states"].shape[0] for inp in ctx.leading_inputs(1)] == [1]
    assert len(ctx.leading_inputs(None)) == 3 and len(ctx.leading_inputs(100)) == 3


# -- statistics reduce across processes -----------------------------------------------------------------------------


def test_statistics_split_over_processes_reduce_to_the_whole():
    from slimquant.quant.hessian import HessianAccumulator
    from slimquant.quant.observers import Histogram, MinMax, TokenSample
    from slimquant.smoothing import ChannelRange
    from slimquant.stats import reduce_all

    torch.manual_seed(0)
    batches = [torch.randn(2, 16, 12) * (i + 1) for i in range(4)]

    def fed(make):
        whole, parts = make(), [make(), make()]
        for i, b in enumerate(batches):
            whole.update(b) if hasattr(whole, "update") else whole.add(b)
            part = parts[i % 2]
            part.update(b) if hasattr(part, "update") else part.add(b)
        return whole, reduce_all(parts)

    whole, merged = fed(lambda: HessianAccumulator(12))
    assert merged.tokens == whole.tokens and torch.allclose(merged.hessian, whole.hessian, rtol=1e-5)
    for per_channel in (False, True):
        whole, merged = fed(lambda per_channel=per_channel: MinMax(per_channel))
        assert torch.equal(merged.min, whole.min) and torch.equal(merged.max, whole.max)
    whole, merged = fed(lambda: ChannelRange("max"))
    assert torch.equal(merged.lo, whole.lo) and torch.equal(merged.hi, whole.hi)
    whole, merged = fed(lambda: Histogram(256))
    assert merged.counts.sum() == whole.counts.sum() and (merged.lo, merged.hi) == (whole.lo, whole.hi)
    whole, merged = fed(lambda: TokenSample(40))
    assert merged.rows.shape == whole.rows.shape


def test_in_a_smoothing_pass_only_that_smoother_observes(monkeypatch):
    import functools

    pytest.importorskip("slimquant_shift")
    pytest.importorskip("slimquant_smoothquant")
    from slimquant_shift.plugin import ShiftPlugin
    from slimquant_smoothquant.plugin import SmoothQuantPlugin

    events = []
    for cls in (ShiftPlugin, SmoothQuantPlugin):
        for hook in ("observe", "smooth"):
            original = getattr(cls, hook)

            @functools.wraps(original)
            def spy(self, ctx, *args, _original=original, _hook=hook, **kwargs):
                events.append((ctx.index, self.name, _hook))
                return _original(self, ctx, *args, **kwargs)

            monkeypatch.setattr(cls, hook, spy)
    slimquant.quantize(tiny_model("llama"), {"scheme": "W8A8_DYNAMIC", "algorithms": ["shift", "smoothquant"],
                                             "runtime": {"progress": False}}, samples=token_samples(2, 8))
    layer0 = [(name, hook) for index, name, hook in events if index == 0]
    first_smooth = layer0.index(("shift", "smooth"))
    assert layer0[first_smooth + 1:].count(("shift", "observe")) == 0
    assert layer0[:first_smooth].count(("smoothquant", "observe")) == 0
    assert layer0[-1] == ("smoothquant", "smooth") and ("smoothquant", "observe") in layer0
