"""SmoothQuant: the float model is unchanged by smoothing alone on every architecture, and W8A8 static error drops
on outlier channels."""

import logging

import pytest
import torch
import transformers

import slimquant
from slimquant.quant.fake_linear import FakeQuantLinear
from slimquant.testing import VOCAB, tiny_model, token_samples
from slimquant.testing.smoothing import (
    EQUIVALENCE_ARCHS,
    check_smoothing_keeps_float_model,
    logits,
    relative_error,
    smoothing_recipe,
    w8a8_static_error,
)

CONFIGS = {
    "pairs": [{"name": "smoothquant", "smooth_all_linears": False}],
    "all-linears-ema": [{"name": "smoothquant", "alpha": 0.8, "smooth_all_linears": True, "sampler": "ema"}],
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("arch", EQUIVALENCE_ARCHS)
def test_smoothing_alone_keeps_the_float_model(arch, config):
    check_smoothing_keeps_float_model(CONFIGS[config], arch)


def test_gqa_v_to_o_shares_each_kv_heads_factors():
    model = tiny_model("llama")  # 4 query heads over 2 kv heads of 16 channels
    attn = model.model.layers[0].self_attn
    v0, o0 = attn.v_proj.weight.clone(), attn.o_proj.weight.clone()
    only_pairs = {"name": "smoothquant", "smooth_all_linears": True, "skip": ["*layernorm"]}
    slimquant.smooth_only(model, smoothing_recipe([only_pairs]), samples=token_samples(4, 32))
    s_v = v0[:, 0] / attn.v_proj.weight[:, 0]  # per v channel: row divided by s
    s_o = attn.o_proj.weight[0] / o0[0]  # per o input channel: column multiplied by s
    assert not torch.allclose(s_v, torch.ones_like(s_v))
    expected = s_v.reshape(2, 1, 16).expand(2, 2, 16).reshape(-1)
    torch.testing.assert_close(s_o, expected, rtol=1e-4, atol=1e-6)


def test_smoothquant_lowers_w8a8_static_error_on_outlier_channels():
    plain = w8a8_static_error([])
    smoothed = w8a8_static_error([{"name": "smoothquant", "alpha": 0.5}])
    assert smoothed < 0.7 * plain, (plain, smoothed)


@pytest.mark.parametrize("seqlen", [32, 96])  # 96: the guard checks the first 64 tokens only
def test_post_norm_shortcut_is_left_alone_and_still_quantized(caplog, seqlen):
    cfg = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                 num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=128,
                                 do_layer_norm_before=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(cfg).eval()
    ids = token_samples(1, 24, seed=7)[0]
    reference = logits(model, ids)
    with caplog.at_level(logging.WARNING, logger="slimquant.smoothing"):
        slimquant.smooth_only(model, smoothing_recipe([{"name": "smoothquant", "smooth_all_linears": True}]),
                              samples=token_samples(4, seqlen))
    assert relative_error(logits(model, ids), reference) < 1e-4
    assert "model.decoder.layers.0.self_attn_layer_norm" in caplog.text and "post-norm" in caplog.text
    slimquant.quantize(model, smoothing_recipe([{"name": "smoothquant"}]), samples=token_samples(4, 32))
    assert isinstance(model.model.decoder.layers[1].fc1, FakeQuantLinear)
