"""The plugin as slimquant sees it: the contract on the tiny architectures, plan-time refusals naming the field,
msModelSlim's QuantConfig(co_sparse / is_lowbit), exporters refusing outliers."""

import pytest
import torch

import slimquant
from slimquant.errors import RecipeError
from slimquant.plugins import plan_algorithms
from slimquant.sdk import Feature, features_of
from slimquant.testing import ARCHS, check_plugin, tiny_model, token_samples
from slimquant_sparse import SparsePlugin, SparseSettings, magnitude_prune_quantize


@pytest.mark.parametrize("args", [{"sparsity": 0.5}, {"pattern": "2:4", "fraction": 0.02}])
def test_contract_on_every_architecture(args):
    changes = check_plugin(SparsePlugin, args=args, scheme={"weights": {"bits": 8}}, archs=ARCHS)
    assert all(0 < change < 10 for change in changes.values()), changes


def test_magnitude_needs_no_data(monkeypatch):
    from slimquant import calibration

    monkeypatch.setattr(calibration, "generate_samples", lambda *a, **k: pytest.fail("magnitude generated text"))
    check_plugin(SparsePlugin, args={"method": "magnitude"}, scheme={"weights": {"bits": 8}}, archs=["llama"])


@pytest.mark.parametrize("args,field", [
    ({"sparsity": 1.2}, "sparsity"),
    ({"sparsity": -0.1}, "sparsity"),
    ({"fraction": 0.5}, "fraction"),
    ({"pattern": "4:2"}, "pattern"),
    ({"pattern": "dense"}, "pattern"),
    ({"method": "wanda"}, "method"),
])
def test_bad_arguments_are_refused_at_plan_time(args, field):
    with pytest.raises(RecipeError, match=field):
        plan_algorithms(slimquant.Recipe.parse({"scheme": "W8A8", "algorithms": [{"name": "sparse", **args}]}))


def test_an_n_m_pattern_the_linear_cannot_hold_is_refused_before_calibration():
    recipe = {"scheme": "W8A16", "runtime": {"progress": False}, "algorithms": [{"name": "sparse", "pattern": "3:5"}]}
    with pytest.raises(RecipeError, match=r"pattern: 3:5 needs in_features divisible by 5, but model\.layers\.0\."):
        slimquant.quantize(tiny_model("llama"), recipe, samples=token_samples(2, 16))


def test_msmodelslim_co_sparse_and_is_lowbit():
    from slimquant.compat.msmodelslim import QuantConfig

    recipe = QuantConfig(w_bit=8, a_bit=8, co_sparse=True, fraction=0.02, mm_tensor=False).to_recipe()
    assert recipe.algorithms[-1] == {"name": "sparse", "fraction": 0.02, "sigma_factor": 3.0}
    recipe = QuantConfig(w_bit=4, a_bit=8, is_lowbit=True, sigma_factor=4.0, mm_tensor=False).to_recipe()
    assert recipe.algorithms[-1] == {"name": "sparse", "fraction": 0.01, "sigma_factor": 4.0}
    with pytest.raises(RecipeError, match="sparse quantization only"):
        QuantConfig(fraction=0.02)
    with pytest.raises(RecipeError, match="w_method"):
        QuantConfig(w_bit=8, a_bit=8, co_sparse=True, w_method="GPTQ")


def test_msmodelslim_co_sparse_without_the_plugin_says_what_to_install(monkeypatch):
    from slimquant.compat import aliases
    from slimquant.compat.msmodelslim import QuantConfig

    monkeypatch.setattr(aliases, "find_by_alias", lambda key, value: None if key == "msmodelslim.sparse" else "minmax")
    with pytest.raises(RecipeError, match="install slimquant-sparse"):
        QuantConfig(w_bit=8, a_bit=8, co_sparse=True)


def test_other_exporters_refuse_outliers():
    """Outliers are an output feature (slimquant.sdk.Feature) the sparse plugin declares when fraction > 0: the
    formats that do not hold them are refused at plan time, before any model is loaded."""
    from slimquant.config.recipe import Recipe

    w = torch.randn(32, 64) * 0.05
    w[0, 0] = 3.0
    qw = magnitude_prune_quantize(w, SparseSettings(bits=8, group_size=32, fraction=0.01))
    assert features_of(qw) == {Feature.SPARSITY, Feature.OUTLIERS}
    recipe = Recipe.model_validate({"weights": {"bits": 8, "group_size": 32, "scale_dtype": "float16"},
                                    "algorithms": [{"name": "sparse", "method": "magnitude", "fraction": 0.01}]})
    for fmt in ("compressed-tensors", "gguf", "gptq"):
        with pytest.raises(RecipeError, match=rf"save_type {fmt}: this format cannot hold 16-bit outlier weights "
                                              r"beside the codes \(outliers\), which sparse produces "
                                              r"\(fraction: 0.01\)"):
            plan_algorithms(recipe, formats=[fmt])
    plan_algorithms(recipe, formats=["safe_tensor"])


@pytest.mark.parametrize("index,values,problem", [
    ([0, 2048], [1.0, 1.0], "outside"),
    ([3, 3], [1.0, 1.0], "twice"),
    ([1, 2], [1.0, float("inf")], "NaN or Inf"),
])
def test_quantized_weight_refuses_bad_outliers(index, values, problem):
    from slimquant.quant.outliers import WeightOutliers
    from slimquant.quant.qweight import QuantizedWeight

    with pytest.raises(ValueError, match=problem):
        QuantizedWeight(torch.zeros(32, 64, dtype=torch.int8), torch.ones(32, 1), None, 8, None,
                        outliers=WeightOutliers(torch.tensor(index), torch.tensor(values, dtype=torch.float16)))
