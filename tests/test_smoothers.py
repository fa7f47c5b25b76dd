"""Outlier suppression in the core: smoothing's own pieces, and the msModelSlim / PaddleSlim calls on top of the
smoothing plugins (skipped when a plugin they name is not installed). Each smoother's own behaviour is tested beside
it: plugins/smoothquant, plugins/shift and plugins/piecewise (with slimquant.testing.smoothing)."""

import pytest
import torch
from tiny_models import VOCAB, tiny_model, token_samples

import slimquant
from slimquant import smoothing
from slimquant.errors import CalibrationError, RecipeError
from slimquant.quant.fake_linear import FakeQuantLinear
from slimquant.testing.smoothing import changed_parameters as changed_params
from slimquant.testing.smoothing import logits
from slimquant.testing.smoothing import relative_error as rel
from slimquant.testing.smoothing import smoothing_recipe as recipe

PLUGIN_MODULES = {"smoothquant": "slimquant_smoothquant", "shift": "slimquant_shift",
                  "piecewise": "slimquant_piecewise"}


def need(*names):
    for name in names:
        pytest.importorskip(PLUGIN_MODULES[name])


# -- smoothing's own pieces ------------------------------------------------------------------------------------------


def test_smooth_only_needs_a_smoother():
    with pytest.raises(RecipeError, match="no smoothing algorithm"):
        slimquant.smooth_only(tiny_model("llama"), recipe([{"name": "minmax"}]), samples=token_samples(1))


def test_norm_flavors_are_probed():
    assert smoothing.norm_flavor(tiny_model("gemma").model.layers[0].input_layernorm) == "offset"
    assert smoothing.norm_flavor(tiny_model("llama").model.layers[0].input_layernorm) == "scale"
    assert smoothing.norm_flavor(torch.nn.LayerNorm(8)) == "scale"


def test_ema_sampler_is_bias_corrected():
    r = smoothing.ChannelRange("ema", 0.9)
    for _ in range(3):
        r.update(torch.tensor([[-2.0, 1.0], [1.0, 3.0]]))
    lo, hi = r.span()
    torch.testing.assert_close(lo, torch.tensor([-2.0, 1.0]))
    torch.testing.assert_close(hi, torch.tensor([1.0, 3.0]))


# -- the APIs users know ---------------------------------------------------------------------------------------------


def calib():
    ids = [torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    return [[i, torch.ones_like(i)] for i in ids]


@pytest.mark.parametrize("method", ["m1", "m2"])
def test_anti_outlier_then_calibrator(method):
    need("smoothquant", "shift")
    from slimquant.compat.anti_outlier import AntiOutlier, AntiOutlierConfig
    from slimquant.compat.msmodelslim import Calibrator, QuantConfig

    model = tiny_model("qwen2")
    ids = token_samples(1, 24, seed=7)[0]
    reference = logits(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = AntiOutlierConfig(w_bit=8, a_bit=8, anti_method=method, dev_type="cpu", alpha=0.6)
    AntiOutlier(model, calib_data=calib(), cfg=cfg, progress=False).process()
    assert rel(logits(model, ids), reference) < 1e-4
    assert changed_params(before, model) > 0
    if method == "m2":
        assert "model.layers.0.input_layernorm.bias" in model.state_dict()
    Calibrator(model, QuantConfig(w_bit=8, a_bit=8, mm_tensor=False), calib_data=calib(), progress=False).run()
    assert isinstance(model.model.layers[0].self_attn.q_proj, FakeQuantLinear)


@pytest.mark.parametrize("kwargs,message", [
    ({"anti_method": "m6"}, "m6"),
    ({"anti_method": "m9"}, "unknown anti_method 'm9'"),
    ({"a_bit": 16}, "a_bit=16"),
    ({"dev_type": "tpu"}, "dev_type"),
])
def test_anti_outlier_unsupported_options_fail_clearly(kwargs, message):
    from slimquant.compat.anti_outlier import AntiOutlierConfig

    with pytest.raises(RecipeError, match=message):
        AntiOutlierConfig(**kwargs)


def test_anti_outlier_needs_calibration_data():
    from slimquant.compat.anti_outlier import AntiOutlier

    with pytest.raises(CalibrationError):
        AntiOutlier(tiny_model("llama"), calib_data=[])


def run_data(model, obj, batches=3):
    for ids in token_samples(batches, 32, seed=11):
        model(ids)
        obj.step += 1


@pytest.mark.parametrize("kind", ["smooth", "smooth_ema_all", "search", "shift"])
def test_paddleslim_flows(kind):
    need("smoothquant", "shift", "piecewise")
    from slimquant.compat.paddleslim import EMASampler, MultiStepSampler, PieceWiseSearch, Shift, Smooth

    model = tiny_model("llama")
    ids = token_samples(1, 24, seed=7)[0]
    reference = logits(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    obj = {
        "smooth": lambda: Smooth(model, {}, alpha=0.5, sample_function=MultiStepSampler()),
        "smooth_ema_all": lambda: Smooth(model, alpha=0.7, smooth_all_linears=True, sample_function=EMASampler()),
        "search": lambda: Smooth(model, None, smooth_all_linears=True, search_function=PieceWiseSearch(
            k_piece=2, search_scale_max=3.0)),
        "shift": lambda: Shift(model, {"fused_qkv": False}, shift_all_linears=True, sample_function=EMASampler()),
    }[kind]()
    with torch.no_grad():
        run_data(model, obj)
    obj.update_weight()
    assert rel(logits(model, ids), reference) < 1e-4
    assert changed_params(before, model) > 0


def test_paddleslim_misuse_fails_clearly():
    need("smoothquant")
    from slimquant.compat.paddleslim import PieceWiseSearch, Smooth

    model = tiny_model("llama")
    with pytest.raises(CalibrationError, match="no data"):
        Smooth(model).update_weight()
    with pytest.raises(RecipeError, match="unknown key"):
        Smooth(model, {"norm_flags": "x"})
    with pytest.raises(RecipeError, match="use_clip"):
        PieceWiseSearch(use_clip=True)
    with pytest.raises(RecipeError, match="sample_function"):
        Smooth(model, sample_function=object())


def test_paddleslim_skip_norm_list():
    need("smoothquant")
    from slimquant.compat.paddleslim import Smooth

    model = tiny_model("llama")
    w0 = [layer.input_layernorm.weight.clone() for layer in model.model.layers]
    smooth = Smooth(model, {"skip_norm_list": ["model.layers.0.input_layernorm"]})
    with torch.no_grad():
        run_data(model, smooth)
    smooth.update_weight()
    assert torch.equal(model.model.layers[0].input_layernorm.weight, w0[0])
    assert not torch.equal(model.model.layers[1].input_layernorm.weight, w0[1])
