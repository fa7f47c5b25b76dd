"""runtime.calibration_dtype: the calibration passes may compute in bfloat16 (autocast) while weights, hidden states,
plugin work and the measured errors stay in the model's dtype."""

from typing import Literal

import pytest
import torch
from pydantic import BaseModel
from tiny_models import tiny_model, token_samples

import slimquant
from slimquant.plugins import AlgorithmPlan, PluginSet
from slimquant.runtime import precision
from slimquant.runtime.pipeline import LayerwiseQuantizer
from slimquant.runtime.precision import resolve_calibration_dtype
from slimquant.sdk import WeightQuantizer
from slimquant.testing import ARCHS

CPU = torch.device("cpu")


class _PrecisionSpy(WeightQuantizer):
    """Records the dtype of each observed input and whether autocast was on inside each hook."""

    name = "precisionspy"
    requires_calibration_data = True

    class Config(BaseModel):
        name: Literal["precisionspy"] = "precisionspy"

    def __init__(self):
        self.observed: list[torch.dtype] = []
        self.inputs: dict[str, torch.Tensor] = {}  # the last input each Linear saw
        self.autocast_in_hooks: list[bool] = []
        self.weight_dtypes: list[torch.dtype] = []

    @slimquant.hookimpl
    def observe(self, ctx, name, module, inputs, output):
        self.observed.append(inputs.dtype)
        self.inputs[name] = inputs
        self.autocast_in_hooks.append(torch.is_autocast_enabled("cpu"))

    @slimquant.hookimpl
    def quantize_weight(self, ctx, name, module, args):
        from slimquant.quant.math import round_to_nearest

        self.autocast_in_hooks.append(torch.is_autocast_enabled("cpu"))
        self.weight_dtypes.append(module.weight.dtype)
        return round_to_nearest(module.weight, args)


def _run(plugin, calibration_dtype, scheme="W8A16"):
    recipe = slimquant.Recipe.parse({"scheme": scheme, "runtime": {"progress": False,
                                                                    "calibration_dtype": calibration_dtype}})
    plan = AlgorithmPlan(PluginSet({plugin.name: plugin}), [], plugin.name, plugin.name)
    model = tiny_model("llama")
    quantizer = LayerwiseQuantizer(model, recipe, CPU, plan)
    report = quantizer.run(token_samples(3, 8))
    return quantizer, report, model


def test_bfloat16_passes_show_observers_half_inputs_but_never_run_plugins_under_autocast():
    spy = _PrecisionSpy()
    quantizer, report, model = _run(spy, "bfloat16")
    assert quantizer.pass_dtype == torch.bfloat16 and report.calibration_dtype == "bfloat16"
    assert set(spy.observed) == {torch.bfloat16}  # what the Linears multiply, norm outputs included
    attention = "model.layers.1.self_attn."
    assert spy.inputs[attention + "q_proj"] is spy.inputs[attention + "k_proj"] is spy.inputs[attention + "v_proj"]
    assert not any(spy.autocast_in_hooks)
    assert set(spy.weight_dtypes) == {torch.float32}
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.compute_dtype == torch.float32  # the fake-quantized model runs in its own dtype afterwards


def test_model_dtype_passes_stay_float32():
    spy = _PrecisionSpy()
    quantizer, report, _ = _run(spy, "model")
    assert quantizer.pass_dtype is None and report.calibration_dtype == "model dtype"
    assert set(spy.observed) == {torch.float32}


def test_errors_are_measured_in_the_model_dtype():
    _, half, _ = _run(_PrecisionSpy(), "bfloat16")
    _, full, _ = _run(_PrecisionSpy(), "model")
    for name, error in full.linear_errors.items():
        # same weights, inputs that differ by bfloat16 rounding: the W8 error itself, not bfloat16 output noise
        # (which alone would be ~1e-5 and swamp an 8-bit error)
        assert half.linear_errors[name] == pytest.approx(error, rel=0.3), name


@pytest.mark.parametrize("setting, model_dtype, weight_only, native, expected", [
    ("auto", torch.float32, True, True, torch.bfloat16),
    ("auto", torch.float32, True, False, None),
    ("auto", torch.float32, False, True, None),  # activation ranges are observed in the model's dtype
    ("auto", torch.bfloat16, True, True, None),
    ("model", torch.float32, True, True, None),
    ("bfloat16", torch.float32, False, False, torch.bfloat16),
    ("float16", torch.float32, True, True, torch.float16),
    ("bfloat16", torch.bfloat16, True, True, None),
])
def test_auto_takes_bfloat16_only_where_it_is_fast_and_safe(monkeypatch, setting, model_dtype, weight_only, native,
                                                            expected):
    monkeypatch.setattr(precision, "native_bfloat16", lambda device: native)
    assert resolve_calibration_dtype(setting, model_dtype, CPU, weight_only) == expected


def test_auto_stays_float32_for_activation_quantization():
    quantizer = LayerwiseQuantizer(tiny_model("llama"), slimquant.Recipe.parse({"scheme": "W8A8"}), CPU)
    assert quantizer.pass_dtype is None


def test_gptq_with_bfloat16_passes_stays_close_to_float32_passes():
    pytest.importorskip("slimquant_gptq")
    samples = token_samples(8, 16)
    errors = {}
    for setting in ("model", "bfloat16"):
        model = tiny_model("llama")
        report = slimquant.quantize(model, {"scheme": "W4A16", "algorithms": ["gptq"],
                                            "runtime": {"progress": False, "calibration_dtype": setting}},
                                    samples=samples)
        errors[setting] = sum(r.output_rel_error for r in report.layers)
    assert errors["bfloat16"] == pytest.approx(errors["model"], rel=0.1)


def test_a_typo_in_the_setting_is_named():
    with pytest.raises(ValueError, match="calibration_dtype"):
        slimquant.Recipe.parse({"runtime": {"calibration_dtype": "bf16"}})


def test_a_hessian_of_bfloat16_inputs_matches_the_float32_one_to_bfloat16_rounding():
    from slimquant.quant.hessian import HessianAccumulator

    torch.manual_seed(0)
    x = (torch.randn(3, 256, 600) * torch.rand(600) * 4).bfloat16()  # uneven channel scales, as activations have
    half, full = HessianAccumulator(600), HessianAccumulator(600)
    for batch in x:
        half.add(batch)
        full.add(batch.float())
    assert half.sum.dtype == torch.float32 and half.tokens == full.tokens == 768
    error = (half.hessian - full.hessian).norm() / full.hessian.norm()
    assert 0 < error < 2 ** -9


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("setting", ["bfloat16", "float16"])
def test_half_precision_passes_run_on_every_architecture(arch, setting):
    pytest.importorskip("slimquant_gptq")
    model = tiny_model(arch)
    report = slimquant.quantize(model, {"scheme": "W4A16", "algorithms": ["gptq"],
                                        "runtime": {"progress": False, "calibration_dtype": setting}},
                                samples=token_samples(4, 16))
    assert report.layers and all(0 < r.output_rel_error < 1 for r in report.layers)
    assert all(p.dtype == torch.float32 for p in model.parameters())
