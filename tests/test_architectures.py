"""The layer-wise runtime on tiny random models of each supported architecture family (no downloads).

Dense: Llama, Qwen2, Qwen3, Mistral, Gemma, OPT, GPT-2 (Conv1D), Phi (parallel block). MoE: Mixtral and
Qwen2-MoE, whose fused 3-D expert tensors slimquant rewrites into one gate/up/down Linear triple per expert.
"""

from __future__ import annotations

import copy
import functools
import re

import pytest
import torch
from tiny_models import ARCHS, MOE_ARCHS, tiny_model, token_samples
from torch import nn

import slimquant
from slimquant.builtin.minmax import MinMaxPlugin
from slimquant.errors import NonFiniteError, RecipeError
from slimquant.eval.divergence import divergence, logits_of
from slimquant.model.structure import find_decoder_layers, layer_linears, normalize_linears
from slimquant.quant.fake_linear import FakeQuantLinear
from slimquant.quant.math import range_to_qparams
from slimquant.runtime.catcher import catch_layer_inputs
from slimquant.runtime.context import LayerContext, hidden_of, with_hidden

NUM_EXPERTS = 8
CPU = torch.device("cpu")

LLAMA_LIKE = {
    "prefix": "model.layers",
    "linears": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    "norms": {"input_layernorm": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
              "post_attention_layernorm": ["mlp.gate_proj", "mlp.up_proj"]},
    "pairs": {("self_attn.v_proj", "self_attn.o_proj", "attention"), ("mlp.up_proj", "mlp.down_proj", "gated")},
    "groups": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
               ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
}


def _experts(*leaves: str) -> list[str]:
    return [f"mlp.experts.{e}.{leaf}" for e in range(NUM_EXPERTS) for leaf in leaves]


ATTENTION = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
MIXTRAL = {
    "prefix": "model.layers",
    "linears": ATTENTION + _experts("gate_proj", "up_proj", "down_proj"),
    "norms": {"input_layernorm": ATTENTION[:3], "post_attention_layernorm": _experts("gate_proj", "up_proj")},
    "pairs": {("self_attn.v_proj", "self_attn.o_proj", "attention")}
    | {(f"mlp.experts.{e}.up_proj", f"mlp.experts.{e}.down_proj", "gated")
       for e in range(NUM_EXPERTS)},
    "groups": [ATTENTION[:3], ATTENTION[3:], _experts("gate_proj", "up_proj"), _experts("down_proj")],
}
SHARED = ["mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"]
QWEN2_MOE = {
    **MIXTRAL,
    "linears": MIXTRAL["linears"] + SHARED,  # the shared_expert_gate router stays out
    "norms": {"input_layernorm": ATTENTION[:3],
              "post_attention_layernorm": _experts("gate_proj", "up_proj") + SHARED[:2]},
    "pairs": MIXTRAL["pairs"] | {(SHARED[1], SHARED[2], "gated")},
    "groups": [ATTENTION[:3], ATTENTION[3:], SHARED[:2], SHARED[2:], _experts("gate_proj", "up_proj"),
               _experts("down_proj")],
}

EXPECTED = {
    "llama": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "gemma": LLAMA_LIKE,
    "opt": {
        "prefix": "model.decoder.layers",
        "linears": ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"],
        "norms": {"self_attn_layer_norm": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                  "final_layer_norm": ["fc1"]},
        "pairs": {("self_attn.v_proj", "self_attn.out_proj", "attention")},
        "groups": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["fc1"],
                   ["fc2"]],
    },
    "gpt2": {
        "prefix": "transformer.h",
        "linears": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
        "norms": {"ln_1": ["attn.c_attn"], "ln_2": ["mlp.c_fc"]},
        "pairs": set(),  # c_attn is a fused q/k/v Linear, c_fc -> c_proj runs through a GELU: no exact pair
        "groups": [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]],
    },
    "phi": {
        "prefix": "model.layers",
        "linears": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense", "mlp.fc1",
                    "mlp.fc2"],
        # a parallel block: attention and MLP read the same normed input
        "norms": {"input_layernorm": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1"]},
        "pairs": {("self_attn.v_proj", "self_attn.dense", "attention")},
        "groups": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.dense"], ["mlp.fc1"],
                   ["mlp.fc2"]],
    },
    "mixtral": MIXTRAL,
    "qwen2_moe": QWEN2_MOE,
}
assert set(EXPECTED) == set(ARCHS)

CALIB = token_samples(4, 32, seed=0)
HELD_OUT = token_samples(2, 32, seed=1)
FAST_HISTOGRAM = {"histogram_bins": 128}  # the default 2048 bins are slow on 2 CPU cores


@functools.cache
def _float_model(arch: str) -> nn.Module:
    return tiny_model(arch)


def fresh(arch: str) -> nn.Module:
    return copy.deepcopy(_float_model(arch))


@functools.cache
def _reference_logits(arch: str) -> list[torch.Tensor]:
    return logits_of(_float_model(arch), HELD_OUT)


def quantize(model, scheme="W8A16", samples=CALIB, **recipe):
    return slimquant.quantize(model, {"scheme": scheme, "runtime": {"progress": False}, **recipe}, samples=samples)


def layer_names(arch: str, index: int, relative: list[str]) -> list[str]:
    return [f"{EXPECTED[arch]['prefix']}.{index}.{name}" for name in relative]


@torch.no_grad()
def layer_context(model, index: int, samples) -> LayerContext:
    """The context the runtime builds for decoder layer `index` (layers before it left in float)."""
    normalize_linears(model)
    prefix, layers = find_decoder_layers(model)
    inputs = catch_layer_inputs(model, layers, samples, CPU, progress=False)
    for layer in layers[:index]:
        inputs = [with_hidden((args, kwargs), hidden_of(layer(*args, **kwargs))) for args, kwargs in inputs]
    linears = layer_linears(layers[index], f"{prefix}.{index}")
    return LayerContext(index, f"{prefix}.{index}", layers[index], CPU, linears, dict.fromkeys(linears), inputs)


def experts_reached(model, samples) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per MoE Linear name: the min/max of its float input over `samples`, for the Linears tokens reached."""
    normalize_linears(model)
    prefix, layers = find_decoder_layers(model)
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(name):
        def hook(module, inputs, output):
            x = inputs[0]
            lo, hi = x.min(), x.max()
            if name in ranges:
                lo, hi = torch.minimum(lo, ranges[name][0]), torch.maximum(hi, ranges[name][1])
            ranges[name] = (lo, hi)
        return hook

    handles = [module.register_forward_hook(record(name))
               for i, layer in enumerate(layers) for name, module in layer_linears(layer, f"{prefix}.{i}").items()
               if ".experts." in name]
    try:
        logits_of(model, samples)
    finally:
        for h in handles:
            h.remove()
    return ranges


# -- 1. structure --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_layers_and_their_linears(arch):
    model = fresh(arch)
    spec = EXPECTED[arch]
    before = logits_of(model, HELD_OUT[:1])[0]
    normalize_linears(model)
    after = logits_of(model, HELD_OUT[:1])[0]
    assert torch.allclose(before, after, rtol=0, atol=1e-5), (before - after).abs().max()

    prefix, layers = find_decoder_layers(model)
    assert prefix == spec["prefix"]
    assert layers is model.get_submodule(prefix) and len(layers) == 2
    for i, layer in enumerate(layers):
        linears = layer_linears(layer, f"{prefix}.{i}")
        assert sorted(linears) == sorted(layer_names(arch, i, spec["linears"]))
        assert all(type(m) is nn.Linear for m in linears.values())
    assert not [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]


def test_gpt2_conv1d_becomes_an_equivalent_linear():
    model = fresh("gpt2")
    conv = model.transformer.h[0].attn.c_attn
    weight, bias = conv.weight.detach().clone(), conv.bias.detach().clone()  # Conv1D stores [in, out]
    x = torch.randn(3, 64)
    expected = conv(x)
    before = logits_of(model, HELD_OUT)
    normalize_linears(model)
    linear = model.transformer.h[0].attn.c_attn
    assert type(linear) is nn.Linear and (linear.in_features, linear.out_features) == (64, 192)
    assert torch.equal(linear.weight, weight.t()) and torch.equal(linear.bias, bias)
    assert torch.allclose(linear(x), expected, atol=1e-6)
    for b, a in zip(before, logits_of(model, HELD_OUT), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_unfuse_is_exact(arch):
    model = fresh(arch)
    fused = model.model.layers[1].mlp.experts
    gate_up, down = fused.gate_up_proj.detach().clone(), fused.down_proj.detach().clone()
    before = logits_of(model, HELD_OUT)
    normalize_linears(model)
    after = logits_of(model, HELD_OUT)
    for b, a in zip(before, after, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-5), (a - b).abs().max()
    expert = model.model.layers[1].mlp.experts[5]
    half = gate_up.shape[1] // 2
    assert torch.equal(expert.gate_proj.weight, gate_up[5, :half])
    assert torch.equal(expert.up_proj.weight, gate_up[5, half:])
    assert torch.equal(expert.down_proj.weight, down[5])
    normalize_linears(model)  # a second call finds nothing left to rewrite
    assert len(layer_linears(model.model.layers[1], "model.layers.1")) == len(EXPECTED[arch]["linears"])


# -- 2. the runtime ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_w8a16_swaps_every_planned_linear_and_stays_close(arch):
    model = fresh(arch)
    report = quantize(model, "W8A16")
    expected = {n for i in range(2) for n in layer_names(arch, i, EXPECTED[arch]["linears"])}
    assert set(report.plans) == expected
    assert all(plan is not None and plan.scheme.type_name == "W8A16" for plan in report.plans.values())
    fakes = {n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    assert fakes == expected
    prefix = EXPECTED[arch]["prefix"]
    float_left = [n for n, m in model.get_submodule(prefix).named_modules() if type(m) is nn.Linear]
    assert float_left == (["0.mlp.shared_expert_gate", "1.mlp.shared_expert_gate"] if arch == "qwen2_moe" else [])
    assert len(report.layers) == 2
    assert all(0 < layer.output_rel_error < 1e-3 for layer in report.layers), report.layers
    assert all(layer.quantized == len(EXPECTED[arch]["linears"]) and layer.kept_float == 0
               for layer in report.layers)
    assert set(report.linear_errors) == expected
    got = logits_of(model, HELD_OUT)
    assert all(torch.isfinite(g).all() for g in got)
    d = divergence(_reference_logits(arch), model, HELD_OUT)
    assert d.kl < 1e-4 and d.top1 >= 0.9, d


RECIPES = {
    "W8A16": ("W8A16", {}),
    "W4A16": ("W4A16", {}),
    "W8A8 minmax": ("W8A8", {"algorithms": [{"name": "minmax", "act_method": 1}]}),
    "W8A8 histogram": ("W8A8", {"algorithms": [{"name": "minmax", "act_method": 2, **FAST_HISTOGRAM}]}),
    "W8A8 auto": ("W8A8", {"algorithms": [{"name": "minmax", "act_method": 3, **FAST_HISTOGRAM}]}),
    "W8A8_DYNAMIC": ("W8A8_DYNAMIC", {}),
    "W4A8_DYNAMIC": ("W4A8_DYNAMIC", {}),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_scheme_runs_and_errors_order_sensibly(arch):
    err, kl = {}, {}
    for key, (scheme, extra) in RECIPES.items():
        model = fresh(arch)
        report = quantize(model, scheme, **extra)
        fakes = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
        assert len(fakes) == 2 * len(EXPECTED[arch]["linears"]), key
        bits = 4 if scheme.startswith("W4") else 8
        assert all(f.bits == bits and int(f.codes.min()) >= -(2 ** (bits - 1))
                   and int(f.codes.max()) <= 2 ** (bits - 1) - 1 for f in fakes), key
        if scheme == "W8A8":
            scales = torch.cat([f.input_scale.reshape(-1) for f in fakes])
            assert torch.isfinite(scales).all() and (scales > 0).all(), key
        elif scheme.endswith("DYNAMIC"):
            assert all(f.act.dynamic for f in fakes), key
        else:
            assert all(f.act is None for f in fakes), key
        assert all(torch.isfinite(g).all() for g in logits_of(model, HELD_OUT)), key
        err[key] = sum(layer.output_rel_error for layer in report.layers) / len(report.layers)
        kl[key] = divergence(_reference_logits(arch), model, HELD_OUT).kl
    assert err["W8A16"] < err["W4A16"] and kl["W8A16"] < kl["W4A16"], (err, kl)
    for static in ("W8A8 minmax", "W8A8 histogram", "W8A8 auto"):
        assert err["W8A16"] < err[static] < err["W4A16"], (static, err)
    assert err["W8A16"] < err["W8A8_DYNAMIC"] < err["W4A8_DYNAMIC"], err
    assert err["W4A16"] < err["W4A8_DYNAMIC"], err
    assert max(err.values()) < 0.05 and max(kl.values()) < 1e-2, (err, kl)


# -- 3. subgraphs --------------------------------------------------------------------------------------------


def _as_sets(subgraphs):
    norms = {g.source: sorted(g.targets) for g in subgraphs if g.kind == "norm"}
    pairs = {(g.source, target, g.kind) for g in subgraphs if g.kind != "norm" for target in g.targets}
    return norms, pairs


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("index", [0, 1])
def test_subgraphs_and_call_groups(arch, index):
    spec = EXPECTED[arch]
    ctx = layer_context(fresh(arch), index, CALIB[:2])
    untraced = ctx.run_layer()
    norms, pairs = _as_sets(ctx.subgraphs)
    assert norms == {f"{ctx.prefix}.{n}": sorted(layer_names(arch, index, t)) for n, t in spec["norms"].items()}
    assert pairs == {(f"{ctx.prefix}.{a}", f"{ctx.prefix}.{b}", kind) for a, b, kind in spec["pairs"]}
    assert [sorted(g) for g in ctx.trace.groups] == [sorted(layer_names(arch, index, g)) for g in spec["groups"]]
    # tracing observes the layer without changing what it computes
    for a, b in zip(untraced, ctx.run_layer(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_subgraphs_cover_experts_no_token_reached(arch):
    few = [CALIB[0][:, :2]]  # two tokens, two experts each: at most four of eight experts run
    reached = experts_reached(fresh(arch), few)
    ctx = layer_context(fresh(arch), 0, few)
    experts = {n for n in ctx.linears if ".experts." in n}
    assert 0 < len(experts & set(reached)) < len(experts)
    norms, pairs = _as_sets(ctx.subgraphs)
    post = norms[f"{ctx.prefix}.post_attention_layernorm"]
    assert {n for n in experts if n.endswith(("gate_proj", "up_proj"))} <= set(post)
    assert len({p for p in pairs if p[2] == "gated" and ".experts." in p[0]}) == NUM_EXPERTS
    groups = ctx.trace.groups
    assert sorted(groups[-2]) == sorted(n for n in experts if not n.endswith("down_proj"))
    assert sorted(groups[-1]) == sorted(n for n in experts if n.endswith("down_proj"))


# -- 4. MoE experts without calibration tokens -----------------------------------------------------------------


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("true_sequential", [False, True], ids=["one-pass", "true-sequential"])
@pytest.mark.parametrize("act_method", [1, 2])
def test_static_w8a8_scales_for_experts_no_token_reached(arch, true_sequential, act_method, monkeypatch):
    monkeypatch.setattr(MinMaxPlugin, "sequential", true_sequential)
    few = [CALIB[0][:, :2]]
    reached = experts_reached(fresh(arch), few)
    model = fresh(arch)
    reference = logits_of(model, HELD_OUT)
    quantize(model, "W8A8", samples=few,
             algorithms=[{"name": "minmax", "act_method": act_method, **FAST_HISTOGRAM}])
    modules = dict(model.named_modules())
    experts = {n: m for n, m in modules.items() if ".experts." in n and isinstance(m, FakeQuantLinear)}
    assert len(experts) == 2 * 3 * NUM_EXPERTS
    assert 0 < len(set(experts) & set(reached)) < len(experts)
    for name, fake in experts.items():
        assert torch.isfinite(fake.input_scale).all() and (fake.input_scale > 1e-4).all(), name
        assert torch.isfinite(fake.input_zero).all(), name
    for name, fake in experts.items():
        if name in reached:
            continue
        key = re.sub(r"\.experts\.\d+\.", ".experts.*.", name)
        siblings = [n for n in reached if re.sub(r"\.experts\.\d+\.", ".experts.*.", n) == key]
        assert siblings, name
        # the union of the siblings' ranges: at least as wide as any one of them
        assert fake.input_scale >= max(experts[s].input_scale for s in siblings) * (1 - 1e-6), name
        if act_method == 1 and not true_sequential and name.startswith("model.layers.0."):
            lo = torch.stack([reached[s][0] for s in siblings]).min()
            hi = torch.stack([reached[s][1] for s in siblings]).max()
            scale, zero = range_to_qparams(lo, hi, 8, symmetric=False)
            assert torch.allclose(fake.input_scale, scale.reshape(-1), rtol=1e-5), name
            assert torch.equal(fake.input_zero, zero.reshape(-1)), name
    got = logits_of(model, HELD_OUT)
    assert all(torch.isfinite(g).all() for g in got)
    assert divergence(reference, model, HELD_OUT).kl < 1e-2


# -- 5. ignore (disable_names) -----------------------------------------------------------------------------------


IGNORE_CASES = {
    "llama": (["model.layers.0.mlp.down_proj", "re:.*k_proj", "lm_head", "model.embed_tokens"],
              ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj"]),
    "gpt2": (["transformer.h.1.attn.c_attn", "*.mlp.c_proj"],
             ["transformer.h.1.attn.c_attn", "transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]),
    "mixtral": ([r"re:model\.layers\.1\.mlp\.experts\.3\..*"],
                [f"model.layers.1.mlp.experts.3.{leaf}" for leaf in ("gate_proj", "up_proj", "down_proj")]),
}


@pytest.mark.parametrize("arch", list(IGNORE_CASES))
def test_ignored_linears_stay_float(arch):
    patterns, kept = IGNORE_CASES[arch]
    model = fresh(arch)
    normalize_linears(model)
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in kept}
    report = quantize(model, "W8A8", ignore=patterns)
    assert sorted(n for n, p in report.plans.items() if p is None) == sorted(kept)
    for name in kept:
        module = model.get_submodule(name)
        assert type(module) is nn.Linear, name
        assert torch.equal(module.weight, originals[name]), name
    fakes = [n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    assert len(fakes) == 2 * len(EXPECTED[arch]["linears"]) - len(kept)
    assert sum(layer.kept_float for layer in report.layers) == len(kept)
    assert all(torch.isfinite(g).all() for g in logits_of(model, HELD_OUT))


@pytest.mark.parametrize("pattern", ["model.layers.0.mlp.down_prj", "re:.*kproj", "*.c_attn",
                                     "model.layers.2.mlp.up_proj"])
def test_ignore_name_matching_no_layer_is_an_error(pattern):
    model = fresh("llama")
    with pytest.raises(RecipeError, match=re.escape(repr(pattern))):
        quantize(model, "W8A16", ignore=["re:.*q_proj", pattern])
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())  # failed before any work


# -- 6. non-finite weights -----------------------------------------------------------------------------------------


def _poison_llama(model):
    model.model.layers[1].mlp.up_proj.weight.data[3, 5] = float("nan")
    return "model.layers.1.mlp.up_proj"


def _poison_gpt2(model):
    model.transformer.h[0].mlp.c_fc.weight.data[7, 2] = float("inf")  # a Conv1D, before it becomes a Linear
    return "transformer.h.0.mlp.c_fc"


def _poison_mixtral(model):
    gate_up = model.model.layers[0].mlp.experts.gate_up_proj.data  # [experts, 2 * intermediate, hidden]
    gate_up[6, gate_up.shape[1] // 2 + 1, 0] = float("nan")  # a row of expert 6's up projection
    return "model.layers.0.mlp.experts.6.up_proj"


@pytest.mark.parametrize("poison", [_poison_llama, _poison_gpt2, _poison_mixtral], ids=["llama", "gpt2", "mixtral"])
def test_non_finite_weight_names_its_module(poison):
    model = fresh(poison.__name__.removeprefix("_poison_"))
    name = poison(model)
    with pytest.raises(NonFiniteError, match=re.escape(f"{name}.weight")) as info:
        quantize(model, "W8A16")
    assert "1 NaN/Inf" in str(info.value)
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())
