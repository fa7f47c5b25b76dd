"""nf4: the codebooks, nearest rounding, block absmax, double quantization, the grid under GPTQ, exact reload, bytes
on disk, plan-time refusals."""

import copy
import json
import tempfile
from pathlib import Path

import pytest
import torch

import slimquant
from slimquant.config.scheme import WeightArgs
from slimquant.errors import RecipeError
from slimquant.eval.divergence import divergence, logits_of
from slimquant.export import save_quantized
from slimquant.export.layout import build_layout
from slimquant.loader import load_quantized
from slimquant.plugins import plan_algorithms
from slimquant.quant.fake_linear import FakeQuantLinear
from slimquant.quant.grid import WeightGrid
from slimquant.quant.math import round_to_nearest
from slimquant.testing import ARCHS, check_plugin, check_run, tiny_model, token_samples
from slimquant_gptq import GPTQPlugin, GPTQSettings, gptq_quantize
from slimquant_nf4 import CODEBOOKS, FP4, NF4, NF4Grid, NF4Plugin, double_quantize
from slimquant_nf4.codebooks import BITSANDBYTES_NIBBLE, normal_float_values

G64 = WeightArgs(bits=4, group_size=64)
BNB_FP4_BY_NIBBLE = torch.tensor([0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                                  -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]) / 12


def recipe(*algorithms, weights=None):
    return {"weights": weights or {"bits": 4, "group_size": 16}, "algorithms": list(algorithms),
            "runtime": {"progress": False}}


@pytest.mark.parametrize("name", ["nf4", "fp4"])
def test_codebooks_have_16_sorted_values_with_exact_zero_and_unit_ends(name):
    values = CODEBOOKS[name]
    assert values.shape == (16,) and values.dtype == torch.float32
    assert bool((values[1:] >= values[:-1]).all())
    assert values[0] == -1.0 and values[-1] == 1.0 and (values == 0).any()


def test_nf4_is_the_normal_quantiles_with_asymmetric_halves():
    assert torch.allclose(NF4, normal_float_values(), atol=1e-6)
    assert int((NF4 > 0).sum()) == 8 and int((NF4 < 0).sum()) == 7


def test_fp4_is_bitsandbytes_table_and_the_nibble_map_inverts_it():
    assert torch.equal(FP4.abs(), BNB_FP4_BY_NIBBLE[BITSANDBYTES_NIBBLE["fp4"]].abs())
    assert torch.equal(torch.signbit(FP4), torch.signbit(BNB_FP4_BY_NIBBLE[BITSANDBYTES_NIBBLE["fp4"]]))
    assert sorted(BITSANDBYTES_NIBBLE["fp4"]) == list(range(16))


@pytest.mark.parametrize("name", ["nf4", "fp4"])
def test_rounding_is_the_nearest_codebook_value(name):
    torch.manual_seed(0)
    w = torch.randn(32, 256) * 0.02
    w[0, :5] = torch.tensor([0.0, 1e-9, -1e-9, 0.0, 0.0])
    q = round_to_nearest(w, G64, grid=NF4Grid(name))
    normalized = w / q.scale[:, q.group_index()]
    brute = (normalized.unsqueeze(-1) - CODEBOOKS[name]).abs()
    chosen = brute.gather(-1, (q.codes.long() + 8).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(chosen, brute.min(-1).values, rtol=0, atol=1e-7)
    assert torch.equal(q.codebook, CODEBOOKS[name])
    assert bool((q.dequantize()[0, :5] == 0).all())


def test_scale_is_the_block_absmax_and_the_block_extreme_is_exact():
    torch.manual_seed(1)
    w = torch.randn(8, 192)
    q = round_to_nearest(w, G64, grid=NF4Grid())
    assert torch.equal(q.scale, w.abs().view(8, 3, 64).amax(-1))
    at = w.abs().view(8, 3, 64).argmax(-1, keepdim=True)
    extremes = w.view(8, 3, 64).gather(-1, at)
    assert torch.equal(q.dequantize().view(8, 3, 64).gather(-1, at), extremes)


def test_the_block_defaults_to_64_and_follows_the_scheme():
    grid = NF4Grid()
    assert grid.group_size(WeightArgs(bits=4)) == 64
    assert grid.group_size(WeightArgs(bits=4, group_size=32)) == 32
    assert grid.group_size(WeightArgs(bits=4, strategy="channel")) is None


def test_double_quantized_scales_are_close_and_used_everywhere():
    torch.manual_seed(2)
    w = torch.randn(300, 512) * torch.rand(300, 1)  # 2400 scales: 10 blocks of 256, the last one shorter
    plain = round_to_nearest(w, G64, grid=NF4Grid())
    double = round_to_nearest(w, G64, grid=NF4Grid(double_quant=True))
    stored = double.scale_quant
    assert stored is not None and stored.codes.dtype == torch.int8 and stored.block_scale.shape == (10,)
    assert torch.equal(double.scale, stored.dequantize())
    error = (double.scale - plain.scale).abs().max()
    assert error <= stored.block_scale.max() / 2 + 1e-7
    assert error <= (plain.scale - plain.scale.mean()).abs().max() / 254 + 1e-6  # half an 8-bit step
    assert ((double.scale - plain.scale).abs() / plain.scale).median() < 0.01
    # the codes were chosen for the double-quantized scales: nearest values for those
    normalized = w / double.scale[:, double.group_index()]
    brute = (normalized.unsqueeze(-1) - NF4).abs()
    chosen = brute.gather(-1, (double.codes.long() + 8).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(chosen, brute.min(-1).values, atol=1e-6)


def test_double_quantize_of_equal_scales_is_exact():
    scale = torch.full((4, 8), 0.125)
    assert torch.equal(double_quantize(scale).dequantize(), scale)


@pytest.mark.parametrize("args", [{}, {"double_quant": True}, {"codebook": "fp4"}])
def test_contract_and_exact_reload_on_every_architecture(args, monkeypatch):
    from slimquant import calibration

    monkeypatch.setattr(calibration, "generate_samples", lambda *a, **k: pytest.fail("nf4 generated text"))
    changes = check_plugin(NF4Plugin, args, scheme={"weights": {"bits": 4, "group_size": 16}}, archs=ARCHS)
    assert all(0 < change < 1.0 for change in changes.values()), changes


@pytest.mark.parametrize("args", [{}, {"double_quant": True}])
def test_nf4_under_gptq_passes_the_contract_and_reloads_exactly(args):
    changes = check_run(GPTQPlugin, scheme={"weights": {"bits": 4, "group_size": 16}},
                        archs=["llama", "qwen2"], extra_algorithms=[{"name": "nf4", **args}])
    assert all(0 < change < 1.0 for change in changes.values()), changes


def test_roles_the_grid_provider_and_the_quantizer():
    for algorithms, weight in [(["nf4"], "nf4"), (["nf4", "gptq"], "gptq"), (["gptq", "nf4"], "gptq"),
                               (["minmax", "nf4"], "minmax")]:
        plan = plan_algorithms(slimquant.Recipe.parse(recipe(*algorithms)))
        assert (plan.weight_algorithm, plan.grid_algorithm) == (weight, "nf4"), algorithms
    plain = plan_algorithms(slimquant.Recipe.parse(recipe("gptq")))
    assert plain.grid_algorithm is None


def test_an_override_picks_its_own_grid_or_the_uniform_one():
    model = tiny_model("llama")
    calib = token_samples(4, 32, seed=0)
    grids = recipe("nf4", "gptq")
    grids["overrides"] = [{"targets": ["*down_proj"], "grid": "uniform"}]
    slimquant.quantize(model, grids, samples=calib)
    fakes = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    assert all((m.codebook is None) == n.endswith("down_proj") for n, m in fakes.items())

    model = tiny_model("llama")
    one = recipe("gptq")
    one["overrides"] = [{"targets": ["*down_proj"], "grid": "nf4"}]
    slimquant.quantize(model, one, samples=calib)
    fakes = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    assert all((m.codebook is not None) == n.endswith("down_proj") for n, m in fakes.items())


def test_gptq_on_the_nf4_grid_beats_nf4_alone():
    model = tiny_model("llama")
    calib, held_out = token_samples(8, 64, seed=0), token_samples(2, 64, seed=5)
    reference = logits_of(model, held_out)
    kl = {}
    for key, algorithms in {"nf4": ["nf4"], "nf4+gptq": ["nf4", "gptq"]}.items():
        m = copy.deepcopy(model)
        slimquant.quantize(m, recipe(*algorithms), samples=calib if "gptq" in algorithms else None)
        kl[key] = divergence(reference, m, held_out).kl
        assert all(mod.codebook is not None for mod in m.modules() if isinstance(mod, FakeQuantLinear))
    assert kl["nf4+gptq"] < 0.9 * kl["nf4"], kl


def test_gptq_with_the_uniform_grid_object_matches_its_own_rounding():
    torch.manual_seed(3)
    x = torch.randn(512, 64) @ torch.randn(64, 64)
    w = torch.randn(16, 64)
    s = GPTQSettings(bits=4, symmetric=False, group_size=16, act_order=True)
    ours = gptq_quantize(w, x.t() @ x, s)
    generic = gptq_quantize(w, x.t() @ x, s, grid=WeightGrid(4, False))
    assert torch.equal(ours.codes, generic.codes) and torch.equal(ours.scale, generic.scale)


@pytest.mark.parametrize("double_quant,expected", [(False, 0.5 + 4 / 64), (True, 0.5 + 1 / 64)])
def test_bytes_on_disk_are_half_a_byte_per_weight_plus_scales(double_quant, expected):
    torch.manual_seed(4)
    linear = torch.nn.Linear(1024, 512, bias=False)
    qweight = round_to_nearest(linear.weight, G64, grid=NF4Grid(double_quant=double_quant))
    layout = build_layout(torch.nn.Sequential(FakeQuantLinear(qweight, None, None)))
    stored = sum(t.numel() * t.element_size() for t in layout.tensors.values())
    per_weight = stored / linear.weight.numel()
    assert expected <= per_weight < expected + 0.001, per_weight
    assert layout.tensors["0.weight"].dtype == torch.uint8 and layout.tensors["0.weight"].shape == (512, 512)
    assert "0.weight_offset" not in layout.tensors and torch.equal(layout.tensors["0.weight_codebook"], NF4)


def test_saved_double_quant_reloads_with_the_same_scales_and_names_its_codebook():
    model = tiny_model("llama")
    report = slimquant.quantize(model, recipe({"name": "nf4", "double_quant": True}))
    ids = token_samples(1, 16, seed=99)[0]
    with tempfile.TemporaryDirectory() as tmp:
        save_quantized(model, f"{tmp}/out", linear_types=report.linear_types())
        description = json.loads(next(Path(tmp, "out").glob("quant_model_description*.json")).read_text())
        linears = description["slimquant"]["linears"].values()
        assert all(lin["codebook_name"] == "nf4" and lin["scale_block"] == 256 for lin in linears)
        reloaded = load_quantized(tiny_model("llama"), f"{tmp}/out")
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
        for name, module in model.named_modules():
            if isinstance(module, FakeQuantLinear):
                again = reloaded.get_submodule(name)
                assert torch.equal(again.scale_codes, module.scale_codes)
                assert torch.equal(again.weight_scale, module.weight_scale)


@pytest.mark.parametrize("weights,algorithms,field", [
    ({"bits": 8, "group_size": 64}, [{"name": "nf4"}], "weights.bits"),
    ({"bits": 8, "group_size": 64}, [{"name": "nf4"}, "gptq"], "weights.bits"),
    ({"bits": 4, "strategy": "tensor"}, [{"name": "nf4"}], "weights.strategy"),
    ({"bits": 4, "group_size": 64}, [{"name": "nf4", "codebook": "nf5"}], "codebook"),
    ({"bits": 4, "group_size": 64, "scale_dtype": "float16"}, [{"name": "nf4", "double_quant": True}],
     "weights.scale_dtype"),
    ({"bits": 4, "group_size": 64}, [{"name": "nf4"}, "hqq"], "accepts_weight_grid"),
])
def test_bad_arguments_are_refused_at_plan_time(weights, algorithms, field):
    with pytest.raises(RecipeError, match=field):
        plan_algorithms(slimquant.Recipe.parse({"weights": weights, "algorithms": algorithms}))


def test_msmodelslim_w_method_nf4():
    from slimquant.compat.msmodelslim import QuantConfig

    recipe = QuantConfig(w_bit=4, a_bit=16, w_method="NF4", group_size=64).to_recipe()
    assert recipe.algorithms[-1]["name"] == "nf4"
