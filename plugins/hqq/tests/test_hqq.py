"""hqq: lp error never above round-to-nearest, exact reload of fractional zero points, plan-time refusals, data-free."""

import pytest
import torch

import slimquant
from slimquant.config.scheme import WeightArgs
from slimquant.errors import RecipeError
from slimquant.plugins import plan_algorithms
from slimquant.quant.math import round_to_nearest
from slimquant.testing import ARCHS, check_plugin
from slimquant_hqq import HQQPlugin, HQQSettings, hqq_quantize


def lp_error(w, qweight, p=0.7):
    return float((w - qweight.dequantize()).abs().pow(p).sum())


def heavy_tailed(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((rows, cols)) * 0.02 if seed % 2 else \
        torch.randn(rows, cols, generator=g) * 0.05


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, None])
def test_lp_error_never_above_round_to_nearest(bits, group):
    for seed in range(4):
        torch.manual_seed(seed)
        w = heavy_tailed(48, 128, seed)
        ours = hqq_quantize(w, HQQSettings(bits=bits, group_size=group))
        rtn = round_to_nearest(w, WeightArgs(bits=bits, symmetric=False, group_size=group))
        assert lp_error(w, ours) <= lp_error(w, rtn) * (1 + 1e-5)


def test_the_solver_improves_on_rounding_at_4_bits():
    torch.manual_seed(0)
    w = heavy_tailed(256, 256, 1)
    ours = hqq_quantize(w, HQQSettings(bits=4, group_size=64))
    rtn = round_to_nearest(w, WeightArgs(bits=4, symmetric=False, group_size=64))
    assert lp_error(w, ours) < 0.97 * lp_error(w, rtn)
    assert (ours.zero != ours.zero.round()).any()  # fractional zero points


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_optimize_scale_is_no_worse(bits):
    """Refitting each group's step as well as its zero point never ends above fitting the zero point alone (same
    settings otherwise)."""
    for seed in range(4):
        torch.manual_seed(seed)
        w = heavy_tailed(64, 128, seed)
        plain = hqq_quantize(w, HQQSettings(bits=bits, group_size=32, early_stop=False))
        scaled = hqq_quantize(w, HQQSettings(bits=bits, group_size=32, optimize_scale=True, early_stop=False))
        assert lp_error(w, scaled) <= lp_error(w, plain)
        assert not torch.equal(scaled.scale, plain.scale)  # it did refit the steps


def test_contract_and_round_trip_on_every_architecture(monkeypatch):
    from slimquant import calibration

    monkeypatch.setattr(calibration, "generate_samples", lambda *a, **k: pytest.fail("hqq generated text"))
    changes = check_plugin(HQQPlugin, scheme={"weights": {"bits": 4, "symmetric": False, "group_size": 16}},
                           archs=ARCHS)
    assert all(0 < change < 1.0 for change in changes.values()), changes


@pytest.mark.parametrize("args,field", [
    ({"iters": 0}, "iters"),
    ({"lp_norm": 1.0}, "lp_norm"),
    ({"lp_norm": 0.0}, "lp_norm"),
    ({"kappa": 0.5}, "kappa"),
    ({"beta": -1}, "beta"),
])
def test_bad_arguments_are_refused_at_plan_time(args, field):
    with pytest.raises(RecipeError, match=field):
        plan_algorithms(slimquant.Recipe.parse({"weights": {"bits": 4, "symmetric": False, "group_size": 64},
                                                "algorithms": [{"name": "hqq", **args}]}))


def test_symmetric_weights_are_refused_at_plan_time():
    with pytest.raises(RecipeError, match="weights.symmetric: hqq optimizes zero points"):
        plan_algorithms(slimquant.Recipe.parse({"weights": {"bits": 4, "group_size": 64}, "algorithms": ["hqq"]}))


def test_a_short_last_group_is_solved_on_its_own_channels():
    torch.manual_seed(0)
    w = heavy_tailed(32, 80, 1)  # groups of 32: 32, 32 and a last one of 16
    ours = hqq_quantize(w, HQQSettings(bits=4, group_size=32))
    assert ours.scale.shape == (32, 3)
    rtn = round_to_nearest(w, WeightArgs(bits=4, symmetric=False, group_size=32))
    assert lp_error(w, ours) <= lp_error(w, rtn) * (1 + 1e-5)
    alone = hqq_quantize(w[:, 64:], HQQSettings(bits=4, group_size=16))  # the same group, solved by itself
    assert torch.allclose(ours.zero[:, 2], alone.zero[:, 0], atol=1e-5)


def test_msmodelslim_w_method_hqq():
    from slimquant.compat.msmodelslim import QuantConfig

    recipe = QuantConfig(w_bit=4, a_bit=16, w_sym=False, w_method="HQQ", group_size=64).to_recipe()
    assert recipe.algorithms[-1]["name"] == "hqq"


def test_the_cheap_error_bound_holds_where_weights_are_clamped():
    from slimquant_hqq.solver import _error_bound

    torch.manual_seed(0)
    w = torch.randn(64, 32)
    wmin, wmax = w.amin(1), w.amax(1)
    inverse = 15 / (wmax - wmin)
    step = 1 / inverse
    for shift in (0.0, 3.0, -5.0):  # zero points that push each group's extremes outside the 4-bit codes
        zero = -8 - wmin * inverse + shift
        u = torch.addcmul(zero[:, None], w, inverse[:, None])
        d = (u - u.round().clamp(-8, 7)) * step[:, None]
        bound = _error_bound(step, zero, inverse, wmin, wmax, -8, 7)
        assert float(d.abs().max()) <= bound * (1 + 1e-6)
        assert bound <= 1.01 * max(float(d.abs().max()), 0.5 * float(step.max()))  # and not much above it
