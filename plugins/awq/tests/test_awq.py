"""awq: its scales never make a sub-block's quantized output worse than no scaling, the float function survives the
scaling, [awq, gptq] composes, bad arguments are refused at plan time, save -> load round trip."""

import pytest

import slimquant
from slimquant.errors import RecipeError
from slimquant.plugins import plan_algorithms
from slimquant.testing import ARCHS, check_plugin, tiny_model, token_samples
from slimquant_awq import AWQPlugin

W4 = {"bits": 4, "symmetric": False, "group_size": 16}


@pytest.mark.parametrize("arch", ARCHS)
def test_chosen_scales_never_increase_the_sub_block_error(arch, monkeypatch):
    """Spy on every unit's search: the loss of the scales it applies (the very tensor it returns) is at most the loss
    of no scaling, and some unit does apply scales."""
    from slimquant_awq import plugin as awq

    seen = []
    original = awq.AWQPlugin._loss

    def spy(self, ctx, unit, block, inputs, reference, originals, s):
        loss = original(self, ctx, unit, block, inputs, reference, originals, s)
        seen.append((s, loss))
        return loss

    chosen = []
    original_best = awq.AWQPlugin._best_scales

    def record(self, ctx, unit, stats):
        start = len(seen)
        best = original_best(self, ctx, unit, stats)
        losses = seen[start:]
        unscaled = next(loss for s, loss in losses if s is None)
        applied = unscaled if best is None else next(loss for s, loss in losses if s is best)
        chosen.append((unit.source, applied, unscaled))
        return best

    monkeypatch.setattr(awq.AWQPlugin, "_loss", spy)
    monkeypatch.setattr(awq.AWQPlugin, "_best_scales", record)
    slimquant.quantize(tiny_model(arch), {"weights": W4, "algorithms": [{"name": "awq", "clip": False}],
                                          "runtime": {"progress": False}}, samples=token_samples(4, 16))
    assert chosen, "no unit was searched"
    assert all(applied <= unscaled for _, applied, unscaled in chosen), chosen
    assert any(applied < unscaled for _, applied, unscaled in chosen), "no unit chose scales"


def test_scaling_alone_keeps_the_float_function():
    """With weights at 8 bits the quantization barely moves the output, so any change would come from the rewrite;
    the Guard also checks every rewrite against the layer output."""
    model = tiny_model("llama")
    ids = token_samples(1, 16, seed=5)[0]
    reference = model(ids).logits
    slimquant.smooth_only(model, {"weights": W4, "algorithms": [{"name": "awq", "clip": False}],
                                  "runtime": {"progress": False}}, samples=token_samples(4, 16))
    assert ((model(ids).logits - reference).norm() / reference.norm()) < 1e-4


def test_contract_with_round_to_nearest_and_with_gptq():
    changes = check_plugin(AWQPlugin, scheme={"weights": W4}, archs=("llama", "qwen2", "opt", "gpt2", "mixtral"))
    assert all(change < 1.0 for change in changes.values()), changes
    pytest.importorskip("slimquant_gptq")
    changes = check_plugin(AWQPlugin, scheme={"weights": W4}, archs=("llama", "qwen2_moe"),
                           extra_algorithms=[{"name": "gptq", "mse": False}])
    assert all(change < 1.0 for change in changes.values()), changes


def test_awq_beats_round_to_nearest_on_a_tiny_model():
    from slimquant.eval.divergence import divergence, logits_of

    samples, held_out = token_samples(8, 32, seed=1), token_samples(4, 32, seed=9)
    float_model = tiny_model("llama")
    reference = logits_of(float_model, held_out)
    kl = {}
    for name, algorithms in {"rtn": [], "awq": ["awq"]}.items():
        model = tiny_model("llama")
        slimquant.quantize(model, {"weights": {"bits": 3, "symmetric": False, "group_size": 16},
                                   "algorithms": algorithms, "runtime": {"progress": False}}, samples=samples)
        kl[name] = divergence(reference, model, held_out).kl
    assert kl["awq"] < kl["rtn"], kl


@pytest.mark.parametrize("args,field", [({"n_grid": 0}, "n_grid"), ({"max_shrink": 1.0}, "max_shrink"),
                                        ({"search_samples": 0}, "search_samples")])
def test_bad_arguments_are_refused_at_plan_time(args, field):
    with pytest.raises(RecipeError, match=field):
        plan_algorithms(slimquant.Recipe.parse({"weights": W4, "algorithms": [{"name": "awq", **args}]}))


def test_msmodelslim_names():
    from slimquant.compat.anti_outlier import AntiOutlierConfig
    from slimquant.compat.msmodelslim import QuantConfig

    assert QuantConfig(w_bit=4, a_bit=16, w_sym=False, w_method="AWQ", group_size=64).to_recipe().algorithms[-1] \
        == {"name": "awq"}
    recipe = AntiOutlierConfig(w_bit=4, a_bit=16, w_sym=False, anti_method="m3").to_recipe()
    assert [a["name"] for a in recipe.algorithms] == ["awq"]
