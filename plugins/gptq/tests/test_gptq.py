import copy
import logging
from types import SimpleNamespace

import pytest
import torch

import slimquant
from slimquant.config.scheme import WeightArgs
from slimquant.eval.divergence import divergence, logits_of
from slimquant.quant.hessian import HessianAccumulator, inverse_hessian_factor
from slimquant.quant.math import quantize_weight_with, weight_qparams
from slimquant.testing import check_plugin, tiny_model, token_samples
from slimquant_gptq import GPTQ, GPTQPlugin, GPTQSettings, gptq_quantize


def correlated_inputs(n=2048, d=64, seed=0, rank=16):
    """Mostly low-rank inputs: the correlation between channels that GPTQ's error feedback exploits."""
    g = torch.Generator().manual_seed(seed)
    low_rank = torch.randn(n, rank, generator=g) @ torch.randn(rank, d, generator=g)
    return low_rank + 0.3 * torch.randn(n, d, generator=g)


def hessian_of(x):
    acc = HessianAccumulator(x.shape[1])
    for chunk in x.split(500):
        acc.add(chunk)
    return acc.hessian


def rtn(w, group_size, bits=4):
    s, z = weight_qparams(w, bits, False, group_size)
    return quantize_weight_with(w, s, z, bits, group_size)


def output_error(x, w, qw):
    return (x @ w.t() - x @ qw.dequantize().t()).pow(2).mean().item()


@pytest.mark.parametrize("group_size", [None, 32, 24])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(group_size):
    x, w = correlated_inputs(), torch.randn(48, 64, generator=torch.Generator().manual_seed(100))
    baseline = rtn(w, group_size)
    gptq = gptq_quantize(w, hessian_of(x), GPTQSettings(bits=4, group_size=group_size, block_size=16))
    assert output_error(x, w, gptq) < 0.5 * output_error(x, w, baseline)
    assert gptq.scale.shape == baseline.scale.shape  # 64 / 24 -> 3 groups, the last one shorter
    mse = gptq_quantize(w, hessian_of(x), GPTQSettings(bits=4, group_size=group_size, mse=True))
    assert output_error(x, w, mse) < 0.5 * output_error(x, w, baseline)


def test_running_mean_hessian_matches_the_batch_formula():
    x = correlated_inputs(n=1000)
    assert torch.allclose(hessian_of(x), 2 * x.t() @ x / 1000, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("group_size", [None, 16, 24])
def test_act_order_equals_the_plain_sweep_on_permuted_columns(group_size):
    x, w = correlated_inputs(seed=1), torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    h = hessian_of(x)
    ordered = gptq_quantize(w, h, GPTQSettings(bits=4, group_size=group_size, act_order=True, block_size=20))
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    by_hand = gptq_quantize(w[:, perm], h[perm][:, perm], GPTQSettings(bits=4, group_size=group_size, block_size=20))
    inverse = torch.argsort(perm)
    assert torch.equal(ordered.codes, by_hand.codes[:, inverse])
    assert torch.equal(ordered.scale, by_hand.scale)
    assert torch.allclose(ordered.dequantize(), by_hand.dequantize()[:, inverse])
    if group_size:  # original column i belongs to the group its sweep position had
        assert torch.equal(ordered.g_idx.long(), by_hand.group_index()[inverse])
    else:
        assert ordered.g_idx is None
    plain = gptq_quantize(w, h, GPTQSettings(bits=4, group_size=group_size))
    assert output_error(x, w, ordered) < 1.5 * output_error(x, w, plain)


def test_static_groups_with_act_order_keep_contiguous_groups():
    x, w = correlated_inputs(seed=3), torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    q = gptq_quantize(w, hessian_of(x), GPTQSettings(bits=4, group_size=16, act_order=True, static_groups=True))
    assert q.g_idx is None
    before = rtn(w, 16)  # scales fixed from the un-updated weights, group by contiguous group
    assert torch.equal(q.scale, before.scale) and torch.equal(q.zero, before.zero)
    assert output_error(x, w, q) < 0.5 * output_error(x, w, before)


def test_singular_hessians_are_repaired(caplog):
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(4))
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(4))  # fewer tokens than features: rank 8
    x[:, 5] = 0  # a dead input channel
    q = gptq_quantize(w, hessian_of(x), GPTQSettings(bits=4, damp_percent=1e-9))
    assert torch.isfinite(q.dequantize()).all()
    assert torch.equal(q.dequantize()[:, 5], torch.zeros(16))  # a dead column is quantized as zero
    assert torch.isfinite(gptq_quantize(w, torch.zeros(32, 32), GPTQSettings(bits=4)).dequantize()).all()
    indefinite = torch.eye(32) + 2 * torch.diag(torch.ones(31), 1) + 2 * torch.diag(torch.ones(31), -1)
    with caplog.at_level(logging.INFO, logger="slimquant.quant.hessian"):
        u = inverse_hessian_factor(indefinite, 0.01, "mlp.down_proj")
    assert torch.isfinite(u).all() and "mlp.down_proj" in caplog.text and "damped" in caplog.text
    nan = torch.full((4, 4), float("nan"))
    with caplog.at_level(logging.WARNING, logger="slimquant.quant.hessian"):
        inverse_hessian_factor(nan, 0.01, "broken")
    assert "diagonal only" in caplog.text


def test_paddleslim_style_block():
    layer = torch.nn.Linear(64, 32, bias=False)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    layer.weight.data.copy_(w)
    x = correlated_inputs(seed=2)
    wrapper = GPTQ(layer)
    layer(x[:1000])
    layer(x[1000:])
    q = wrapper.fasterquant(act_order=True, bits=4, group_size=32, sym=False)
    assert torch.equal(layer.weight, q.dequantize()) and not layer._forward_hooks
    assert q.g_idx is not None and q.bits == 4 and q.zero is not None
    ref = torch.nn.functional.linear(x, w)
    assert (layer(x) - ref).pow(2).mean() < (x @ rtn(w, 32).dequantize().t() - ref).pow(2).mean()
    with pytest.raises(ValueError, match="no data"):
        GPTQ(torch.nn.Linear(8, 8)).fasterquant()
    with pytest.raises(TypeError):
        GPTQ(torch.nn.Conv1d(8, 8, 1))


def test_a_linear_no_token_reached_is_rounded_to_nearest(caplog):
    plugin = GPTQPlugin(GPTQPlugin.Config(mse=False))  # plain min-max ranges, to compare with minmax exactly
    linear = torch.nn.Linear(64, 8)
    ctx = SimpleNamespace(state=lambda name: {}, grid=lambda name: None, row_block=lambda name: slice(0, 8))
    args = WeightArgs(bits=4, symmetric=False, group_size=32)
    with caplog.at_level(logging.INFO, logger="slimquant_gptq.plugin"):
        q = plugin.quantize_weight(ctx=ctx, name="experts.7.w1", module=linear, args=args)
    assert torch.equal(q.codes, rtn(linear.weight.detach(), 32).codes)
    assert "experts.7.w1" in caplog.text and "rounding to nearest" in caplog.text


def test_plugin_end_to_end_beats_minmax():
    model = tiny_model("llama")
    calib, held_out = token_samples(8, 64, seed=0), token_samples(2, 64, seed=5)
    reference = logits_of(model, held_out)
    kl = {}
    for key, algorithm in {"minmax": {"name": "minmax"}, "gptq": {"name": "gptq"},
                           "gptq act_order, not sequential": {"name": "gptq", "act_order": True,
                                                              "true_sequential": False}}.items():
        m = copy.deepcopy(model)
        slimquant.quantize(m, {"scheme": "W4A16", "algorithms": [algorithm], "runtime": {"progress": False}},
                           samples=calib)
        kl[key] = divergence(reference, m, held_out).kl
    assert kl["gptq"] < kl["minmax"] and kl["gptq act_order, not sequential"] < kl["minmax"], kl


def test_bad_arguments_are_named():
    from slimquant.plugins import plan_algorithms

    with pytest.raises(slimquant.errors.RecipeError, match="damp_percent"):
        plan_algorithms(slimquant.Recipe.parse({"algorithms": [{"name": "gptq", "damp_percent": 2}]}))
    with pytest.raises(slimquant.errors.RecipeError, match="act_ordr"):
        plan_algorithms(slimquant.Recipe.parse({"algorithms": [{"name": "gptq", "act_ordr": True}]}))


def test_contract_on_every_architecture():
    changes = check_plugin(GPTQPlugin, args={"mse": False}, scheme="W8A16")
    assert all(change < 0.5 for change in changes.values()), changes


def test_per_tensor_weights_are_refused_at_plan_time():
    from slimquant.errors import RecipeError
    from slimquant.plugins import plan_algorithms

    with pytest.raises(RecipeError, match="weights.strategy: gptq quantizes weights per channel or per group"):
        plan_algorithms(slimquant.Recipe.parse({"weights": {"bits": 8, "strategy": "tensor"}, "algorithms": ["gptq"]}))


def test_q_k_v_share_one_hessian():
    """q/k/v read one tensor: the plugin accumulates its Hessian once and hands the same one to all three."""
    plugin = GPTQPlugin(GPTQPlugin.Config())
    state: dict = {}
    ctx = SimpleNamespace(state=lambda name: state)
    x = torch.randn(2, 5, 16)
    for name in ("q", "k", "v"):
        plugin.observe(ctx=ctx, name=name, module=torch.nn.Linear(16, 4), inputs=x, output=None)
    assert state["q"] is state["k"] is state["v"] and state["q"].tokens == 10
    y = torch.randn(2, 5, 16)
    for name in ("q", "k", "v"):
        plugin.observe(ctx=ctx, name=name, module=torch.nn.Linear(16, 4), inputs=y, output=None)
    assert state["q"] is state["v"] and state["q"].tokens == 20
    expected = HessianAccumulator(16)
    expected.add(x)
    expected.add(y)
    assert torch.allclose(state["k"].hessian, expected.hessian)
