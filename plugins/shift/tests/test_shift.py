"""Shift (Outlier Suppression+): the float model is unchanged by shifting alone on every architecture, every
channel is centred, and the biases it adds are saved and restored."""

import logging

import pytest
import torch

import slimquant
from slimquant.testing import VOCAB, tiny_model, token_samples
from slimquant.testing.smoothing import (
    EQUIVALENCE_ARCHS,
    check_smoothing_keeps_float_model,
    logits,
    smoothing_recipe,
)

SHIFT = [{"name": "shift", "shift_all_linears": True, "scale": True}]
SHIFT_THEN_SMOOTHQUANT = [{"name": "shift", "shift_all_linears": True},
                          {"name": "smoothquant", "smooth_all_linears": True}]


def needs_smoothquant(algorithms):
    if any(a["name"] == "smoothquant" for a in algorithms):
        pytest.importorskip("slimquant_smoothquant")


@pytest.mark.parametrize("algorithms", [SHIFT, SHIFT_THEN_SMOOTHQUANT], ids=["shift", "shift+smoothquant"])
@pytest.mark.parametrize("arch", EQUIVALENCE_ARCHS)
def test_shifting_alone_keeps_the_float_model(arch, algorithms):
    needs_smoothquant(algorithms)
    check_smoothing_keeps_float_model(algorithms, arch)


def test_shift_centres_every_channel_range():
    model = tiny_model("llama")
    samples = token_samples(4, 32)
    slimquant.smooth_only(model, smoothing_recipe([{"name": "shift", "shift_all_linears": True}]), samples=samples)
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


def test_moe_router_blocks_a_shift_but_takes_a_scale(caplog):
    pytest.importorskip("slimquant_smoothquant")
    model = tiny_model("mixtral")
    router = model.model.layers[0].mlp.gate
    w0 = router.weight.clone()
    with caplog.at_level(logging.WARNING, logger="slimquant.smoothing"):
        slimquant.smooth_only(model, smoothing_recipe([{"name": "shift"}, {"name": "smoothquant"}]),
                              samples=token_samples(4, 32))
    assert "model.layers.0.mlp.gate (MixtralTopKRouter)" in caplog.text
    assert not torch.allclose(router.weight, w0)  # smoothquant scaled the router's columns with the experts'


@pytest.mark.parametrize("algorithms", [SHIFT, SHIFT_THEN_SMOOTHQUANT], ids=["shift", "shift+smoothquant"])
def test_smoothed_norms_and_new_biases_are_saved_and_restored(algorithms, tmp_path):
    """Shift gives RMSNorms and bias-free Linears a bias: the loader must recreate it, or the logits go wrong."""
    needs_smoothquant(algorithms)
    from slimquant.export import save_quantized
    from slimquant.loader import load_quantized

    float_model = tiny_model("llama")
    model = tiny_model("llama")
    model.load_state_dict(float_model.state_dict())
    slimquant.quantize(model, smoothing_recipe(algorithms), samples=token_samples(4, 16))
    norm = model.model.layers[0].input_layernorm
    assert getattr(norm, "bias", None) is not None and float(norm.bias.abs().max()) > 0
    out = tmp_path / "out"
    save_quantized(model, out)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    loaded = load_quantized(float_model, out)
    assert torch.allclose(logits(loaded, ids), logits(model, ids), rtol=0, atol=1e-5)
