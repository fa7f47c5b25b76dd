"""The kvcache plugin on tiny models: exact against a hand-computed attention, scale shapes, export and reload."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from slimquant_kvcache.plugin import KVCachePlugin
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

import slimquant
from slimquant.errors import RecipeError
from slimquant.export import save_quantized
from slimquant.loader import load_quantized
from slimquant.runtime import kv_attention
from slimquant.testing import ARCHS, check_declaration, tiny_model, token_samples

QUIET = {"progress": False}


def quantized(arch="llama", kv=None, scheme="W8A16", samples=None, **recipe):
    model = tiny_model(arch)
    recipe = {"scheme": scheme, "kv_cache": kv if kv is not None else {"bits": 8}, "runtime": QUIET, **recipe}
    slimquant.quantize(model, recipe, samples=token_samples(4) if samples is None else samples)
    return model


def attention_io(model, x):
    """Layer 0's attention: its input hidden states, position embeddings and output on tokens `x`."""
    caught = {}
    attn = model.model.layers[0].self_attn

    def pre(module, args, kwargs):
        caught["hidden"], caught["pos"] = kwargs["hidden_states"], kwargs["position_embeddings"]

    def post(module, args, kwargs, output):
        caught["out"] = output[0]

    handles = [attn.register_forward_pre_hook(pre, with_kwargs=True),
               attn.register_forward_hook(post, with_kwargs=True)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return caught


def by_hand(attn, hidden, pos, quantize_kv):
    """Llama attention written out: q/k/v projections, RoPE, then `quantize_kv` on post-RoPE keys and values."""
    b, s, _ = hidden.shape
    d = attn.head_dim
    q = attn.q_proj(hidden).view(b, s, -1, d).transpose(1, 2)
    k = attn.k_proj(hidden).view(b, s, -1, d).transpose(1, 2)
    v = attn.v_proj(hidden).view(b, s, -1, d).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *pos)
    k, v = quantize_kv(k, v)
    k, v = repeat_kv(k, attn.num_key_value_groups), repeat_kv(v, attn.num_key_value_groups)
    scores = q @ k.transpose(2, 3) * attn.scaling
    scores = scores + torch.full((s, s), float("-inf")).triu(1)
    out = torch.softmax(scores.float(), dim=-1) @ v
    return attn.o_proj(out.transpose(1, 2).reshape(b, s, -1)), (k, v)


def int8_asymmetric(x, lo, hi):
    """What a per-head static int8 asymmetric cache stores, from the range [lo, hi] of each head."""
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / 255).clamp_min(1e-8)
    zero = torch.round(-128 - lo / scale).clamp(-128, 127)
    return (torch.clamp(torch.round(x / scale) + zero, -128, 127) - zero) * scale


def test_declaration():
    check_declaration(KVCachePlugin)


def test_matches_attention_computed_by_hand_on_llama():
    samples = token_samples(4)
    model = quantized(samples=samples)
    attn = model.model.layers[0].self_attn
    # the calibration range of layer 0's post-RoPE keys and values, per kv head, recomputed here
    keys, values = [], []
    saved = attn.kv_cache_quant
    del attn.kv_cache_quant
    for x in samples:
        io = attention_io(model, x)
        _, (k, v) = by_hand(attn, io["hidden"], io["pos"], lambda k, v: (k, v))
        keys.append(k[:, ::attn.num_key_value_groups])
        values.append(v[:, ::attn.num_key_value_groups])
    attn.kv_cache_quant = saved
    k_all, v_all = torch.cat(keys, 2), torch.cat(values, 2)

    def per_head_int8(k, v):
        kr = k_all.amin(dim=(0, 2, 3)).view(1, -1, 1, 1), k_all.amax(dim=(0, 2, 3)).view(1, -1, 1, 1)
        vr = v_all.amin(dim=(0, 2, 3)).view(1, -1, 1, 1), v_all.amax(dim=(0, 2, 3)).view(1, -1, 1, 1)
        return int8_asymmetric(k, *kr), int8_asymmetric(v, *vr)

    x = token_samples(1, seed=7)[0]
    io = attention_io(model, x)
    expected, _ = by_hand(attn, io["hidden"], io["pos"], per_head_int8)
    unquantized, _ = by_hand(attn, io["hidden"], io["pos"], lambda k, v: (k, v))
    assert torch.allclose(io["out"], expected, atol=1e-6, rtol=1e-5)
    change = (io["out"] - unquantized).norm() / unquantized.norm()
    assert 0 < change < 0.02, change


@pytest.mark.parametrize("strategy", ["head", "tensor", "channel"])
def test_scale_shapes_on_a_gqa_model(strategy):
    model = quantized("qwen2", kv={"bits": 8, "strategy": strategy, "symmetric": True})
    for quantizer in kv_attention.quantizers(model).values():
        params = quantizer.params
        assert params.shape == (2, 16) and params.key_zero is None  # 2 kv heads of 4 query heads
        scale = params.key_scale
        if strategy == "tensor":
            assert torch.all(scale == scale[0, 0])
        elif strategy == "head":
            assert torch.all(scale == scale[:, :1]) and scale[0, 0] != scale[1, 0]
        else:
            assert not torch.all(scale == scale[:, :1])


def test_dynamic_cache_needs_no_data_and_changes_attention_a_little():
    model = tiny_model("llama")
    x = token_samples(1, seed=3)[0]
    with torch.no_grad():
        weights_only = copy.deepcopy(model)
        slimquant.quantize(weights_only, {"scheme": "W8A16", "runtime": QUIET})
        ref = weights_only(x).logits
    report = slimquant.quantize(model, {"scheme": "W8A16", "runtime": QUIET,
                                        "kv_cache": {"bits": 8, "strategy": "token", "dynamic": True}})
    assert report.data_free
    assert all(q.dynamic and q.key_scale is None for q in kv_attention.quantizers(model).values())
    with torch.no_grad():
        change = (model(x).logits - ref).abs().max()
    assert 0 < change < 0.05


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture(arch):
    float_model = tiny_model(arch)
    model = quantized(arch)
    assert len(kv_attention.quantizers(model)) == 2  # one per decoder layer
    x = token_samples(1, seed=5)[0]
    with torch.no_grad():
        out, ref = model(x).logits, float_model(x).logits
    assert torch.isfinite(out).all() and 0 < (out - ref).abs().max() < 0.1


def test_saved_tensors_description_and_round_trip(tmp_path):
    model = quantized("mistral", scheme="W8A8", kv={"bits": 8})
    save_quantized(model, tmp_path / "out")
    desc = json.loads(next((tmp_path / "out").glob("quant_model_description*.json")).read_text())
    tensors = load_file(next((tmp_path / "out").glob("*.safetensors")))
    assert desc["kv_cache_type"] == "C8"
    for proj in ("k_proj", "v_proj"):
        for leaf in ("kv_cache_scale", "kv_cache_offset"):
            key = f"model.layers.1.self_attn.{proj}.{leaf}"
            assert desc[key] == "C8"
            assert tensors[key].dtype == torch.float32 and tensors[key].shape == (2 * 16,)
    assert desc["slimquant"]["kv_cache"]["layers"]["model.layers.0.self_attn"] == {"kv_heads": 2, "head_dim": 16}

    reloaded = load_quantized(tiny_model("mistral"), tmp_path / "out")
    assert len(kv_attention.quantizers(reloaded)) == 2
    x = token_samples(2, seed=9)[1]
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)


def test_dynamic_cache_round_trip_has_no_tensors(tmp_path):
    model = quantized(kv={"bits": 8, "strategy": "token", "dynamic": True, "symmetric": True})
    save_quantized(model, tmp_path / "out")
    tensors = load_file(next((tmp_path / "out").glob("*.safetensors")))
    assert not [k for k in tensors if "kv_cache" in k]
    reloaded = load_quantized(tiny_model("llama"), tmp_path / "out")
    x = token_samples(1, seed=2)[0]
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)


@pytest.mark.parametrize(("kv", "field"), [
    ({"bits": 3}, "kv_cache.bits"),
    ({"bits": 8, "strategy": "row"}, "kv_cache.strategy"),
    ({"bits": 8, "dynamic": True}, "kv_cache"),
    ({"bits": 8, "algorithm": "minmax"}, "kv_cache.algorithm"),
    ({"bits": 8, "algorithm": "no-such-plugin"}, "kv_cache.algorithm"),
])
def test_bad_kv_cache_sections_are_refused_naming_the_field(kv, field):
    with pytest.raises(RecipeError, match=field.replace(".", r"\.")):
        slimquant.quantize(tiny_model("llama"), {"scheme": "W8A16", "kv_cache": kv, "runtime": QUIET},
                           samples=token_samples(1))


def test_the_plugin_without_a_kv_cache_section_is_refused():
    with pytest.raises(RecipeError, match="add a `kv_cache` section"):
        slimquant.quantize(tiny_model("llama"), {"scheme": "W8A16", "algorithms": ["kvcache"], "runtime": QUIET},
                           samples=token_samples(1))
