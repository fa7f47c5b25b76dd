"""Outlier suppression (issue 5): SmoothQuant, Shift (OS+), PaddleSlim's piecewise search, and the msModelSlim /
PaddleSlim calls on top of them. Smoothing alone must leave the float model's function unchanged."""

import logging

import pytest
import torch
import transformers
from tiny_models import VOCAB, tiny_model, token_samples

import slimquant
from slimquant import smoothing
from slimquant.errors import CalibrationError, RecipeError
from slimquant.model.structure import normalize_linears
from slimquant.quant.fake_linear import FakeQuantLinear

EQUIV_ARCHS = ["llama", "qwen2", "mistral", "gemma", "opt", "phi", "gpt2", "mixtral"]
SMOOTHERS = {
    "smoothquant": [{"name": "smoothquant", "smooth_all_linears": False}],
    "smoothquant_all": [{"name": "smoothquant", "alpha": 0.8, "smooth_all_linears": True, "sampler": "ema"}],
    "shift": [{"name": "shift", "shift_all_linears": True, "scale": True}],
    "shift+smoothquant": [{"name": "shift", "shift_all_linears": True},
                          {"name": "smoothquant", "smooth_all_linears": True}],
    "piecewise": [{"name": "piecewise", "k_piece": 2, "search_piece": True, "smooth_all_linears": True,
                   "search_alpha_step": 0.2, "search_scale_step": 2.0, "sample_tokens": 64}],
}
PLUGIN_MODULES = {"smoothquant": "slimquant_smoothquant", "shift": "slimquant_shift",
                  "piecewise": "slimquant_piecewise"}


def need(*names):
    for name in names:
        pytest.importorskip(PLUGIN_MODULES[name])


def recipe(algorithms, scheme="W8A8", **extra):
    return {"scheme": scheme, "algorithms": algorithms, "model": {"device": "cpu"}, "runtime": {"progress": False},
            **extra}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def rel(a, b):
    return float((a - b).norm() / b.norm())


def changed_params(before: dict, model) -> int:
    after = model.state_dict()
    return sum(1 for k, v in after.items() if k not in before or not torch.allclose(v, before[k]))


# -- equivalence ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("smoother", list(SMOOTHERS))
@pytest.mark.parametrize("arch", EQUIV_ARCHS)
def test_smoothing_alone_keeps_the_float_model(arch, smoother):
    need(*{a["name"] for a in SMOOTHERS[smoother]})
    model = tiny_model(arch)
    normalize_linears(model)  # GPT-2 Conv1D -> Linear first, so parameters compare one to one
    ids = token_samples(1, 24, seed=7)[0]
    reference = logits(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    slimquant.smooth_only(model, recipe(SMOOTHERS[smoother]), samples=token_samples(4, 32))
    assert rel(logits(model, ids), reference) < 1e-4
    assert changed_params(before, model) > 0  # something was rewritten, not everything undone


def test_smooth_only_needs_a_smoother():
    with pytest.raises(RecipeError, match="no smoothing algorithm"):
        slimquant.smooth_only(tiny_model("llama"), recipe([{"name": "minmax"}]), samples=token_samples(1))


def test_norm_flavors_are_probed():
    assert smoothing.norm_flavor(tiny_model("gemma").model.layers[0].input_layernorm) == "offset"
    assert smoothing.norm_flavor(tiny_model("llama").model.layers[0].input_layernorm) == "scale"
    assert smoothing.norm_flavor(torch.nn.LayerNorm(8)) == "scale"


def test_gqa_v_to_o_shares_each_kv_heads_factors():
    need("smoothquant")
    model = tiny_model("llama")  # 4 query heads over 2 kv heads of 16 channels
    attn = model.model.layers[0].self_attn
    v0, o0 = attn.v_proj.weight.clone(), attn.o_proj.weight.clone()
    only_pairs = {"name": "smoothquant", "smooth_all_linears": True, "skip": ["*layernorm"]}
    slimquant.smooth_only(model, recipe([only_pairs]), samples=token_samples(4, 32))
    s_v = v0[:, 0] / attn.v_proj.weight[:, 0]  # per v channel: row divided by s
    s_o = attn.o_proj.weight[0] / o0[0]  # per o input channel: column multiplied by s
    assert not torch.allclose(s_v, torch.ones_like(s_v))
    expected = s_v.reshape(2, 1, 16).expand(2, 2, 16).reshape(-1)
    torch.testing.assert_close(s_o, expected, rtol=1e-4, atol=1e-6)


# -- what smoothing buys ---------------------------------------------------------------------------------------------


def outlier_llama():
    """A tiny Llama whose norms emit a few huge channels, as real LLMs do."""
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 17, 40]] *= 60.0
    return model


def w8a8_error(algorithms) -> float:
    model = outlier_llama()
    ids = token_samples(4, 32, seed=3)
    reference = [logits(model, i) for i in ids]
    slimquant.quantize(model, recipe(algorithms + [{"name": "minmax", "act_method": 1}]),
                       samples=token_samples(8, 32))
    return sum(rel(logits(model, i), r) for i, r in zip(ids, reference, strict=True))


def test_smoothquant_lowers_w8a8_static_error_on_outlier_channels():
    need("smoothquant", "piecewise")
    plain = w8a8_error([])
    smoothed = w8a8_error([{"name": "smoothquant", "alpha": 0.5}])
    searched = w8a8_error([{"name": "piecewise", "k_piece": 2, "sample_tokens": 128}])
    assert smoothed < 0.7 * plain, (plain, smoothed)
    assert searched < 0.7 * plain, (plain, searched)


def test_shift_centres_every_channel_range():
    need("shift")
    model = tiny_model("llama")
    samples = token_samples(4, 32)
    slimquant.smooth_only(model, recipe([{"name": "shift", "shift_all_linears": True}]), samples=samples)
    layer = model.model.layers[0]
    assert type(layer.input_layernorm).__name__ == "LlamaRMSNormWithBias"
    assert "model.layers.0.input_layernorm.bias" in model.state_dict()
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.setdefault(n, []).append(i[0].reshape(-1, 64)))
             for n, m in [("q", layer.self_attn.q_proj), ("gate", layer.mlp.gate_proj)]]
    for ids in samples:
        logits(model, ids)
    for h in hooks:
        h.remove()
    for name, xs in seen.items():
        x = torch.cat(xs)
        lo, hi = x.amin(0), x.amax(0)
        assert float(((hi + lo).abs() / (hi - lo)).max()) < 1e-4, name


def test_ema_sampler_is_bias_corrected():
    r = smoothing.ChannelRange("ema", 0.9)
    for _ in range(3):
        r.update(torch.tensor([[-2.0, 1.0], [1.0, 3.0]]))
    lo, hi = r.span()
    torch.testing.assert_close(lo, torch.tensor([-2.0, 1.0]))
    torch.testing.assert_close(hi, torch.tensor([1.0, 3.0]))


def test_piecewise_search_never_loses_to_no_smoothing():
    need("piecewise")
    from slimquant_piecewise import PieceWiseConfig, PieceWiseSearchPlugin, kmeans_1d

    labels = kmeans_1d(torch.tensor([0.1, 50.0, 0.2, 3.0, 2.9, 49.0]), 3)
    assert labels.tolist() == [0, 2, 0, 1, 1, 2]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=g)
    x[:, [2, 9]] *= 80
    w = torch.randn(48, 32, generator=g)
    plugin = PieceWiseSearchPlugin(PieceWiseConfig(k_piece=3, search_piece=True))
    s = plugin.search("test", x, x.abs().amax(0), w.abs().amax(0), w, lambda t: t)
    ref = x @ w.T
    assert plugin.loss(x, w, ref, s) < 0.5 * plugin.loss(x, w, ref, torch.ones(32))


# -- structures that cannot be smoothed ------------------------------------------------------------------------------


@pytest.mark.parametrize("seqlen", [32, 96])  # 96: the guard checks the first 64 tokens only
def test_post_norm_shortcut_is_left_alone_and_still_quantized(caplog, seqlen):
    need("smoothquant")
    cfg = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                 num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=128,
                                 do_layer_norm_before=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(cfg).eval()
    ids = token_samples(1, 24, seed=7)[0]
    reference = logits(model, ids)
    with caplog.at_level(logging.WARNING, logger="slimquant.smoothing"):
        slimquant.smooth_only(model, recipe([{"name": "smoothquant", "smooth_all_linears": True}]),
                              samples=token_samples(4, seqlen))
    assert rel(logits(model, ids), reference) < 1e-4
    assert "model.decoder.layers.0.self_attn_layer_norm" in caplog.text and "post-norm" in caplog.text
    slimquant.quantize(model, recipe([{"name": "smoothquant"}]), samples=token_samples(4, 32))
    assert isinstance(model.model.decoder.layers[1].fc1, FakeQuantLinear)


def test_moe_router_blocks_a_shift_but_takes_a_scale(caplog):
    need("shift", "smoothquant")
    model = tiny_model("mixtral")
    router = model.model.layers[0].mlp.gate
    w0 = router.weight.clone()
    with caplog.at_level(logging.WARNING, logger="slimquant.smoothing"):
        slimquant.smooth_only(model, recipe([{"name": "shift"}, {"name": "smoothquant"}]),
                              samples=token_samples(4, 32))
    assert "model.layers.0.mlp.gate (MixtralTopKRouter)" in caplog.text
    assert not torch.allclose(router.weight, w0)  # smoothquant scaled the router's columns with the experts'


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


# -- saved and reloaded ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("smoother", ["shift", "shift+smoothquant"])
def test_smoothed_norms_and_new_biases_are_saved_and_restored(smoother, tmp_path):
    """Shift gives RMSNorms and bias-free Linears a bias: the loader must recreate it, or the logits go wrong."""
    need(*{a["name"] for a in SMOOTHERS[smoother]})
    from slimquant.export import save_quantized
    from slimquant.loader import load_quantized

    float_model = tiny_model("llama")
    model = tiny_model("llama")
    model.load_state_dict(float_model.state_dict())
    slimquant.quantize(model, recipe(SMOOTHERS[smoother]), samples=token_samples(4, 16))
    norm = model.model.layers[0].input_layernorm
    assert getattr(norm, "bias", None) is not None and float(norm.bias.abs().max()) > 0
    out = tmp_path / "out"
    save_quantized(model, out)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    loaded = load_quantized(float_model, out)
    assert torch.allclose(logits(loaded, ids), logits(model, ids), rtol=0, atol=1e-5)
