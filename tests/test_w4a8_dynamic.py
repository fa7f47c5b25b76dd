"""W4A8_DYNAMIC per group as msModelSlim defines it: int4 groups on a per-channel int8 level (two-level scales),
per-token dynamic int8 activations; minmax and gptq; export, description, reload."""

from __future__ import annotations

import json

import pytest
import torch
from export_helpers import float_llama
from safetensors.torch import load_file
from tiny_models import token_samples

import slimquant
from slimquant.config.recipe import Recipe
from slimquant.errors import RecipeError
from slimquant.export import save_quantized
from slimquant.loader import load_quantized
from slimquant.quant.fake_linear import FakeQuantLinear

W4G16 = {"scheme": "W4A8_DYNAMIC", "weights": {"bits": 4, "group_size": 16}, "runtime": {"progress": False}}


def quantized(algorithm: str):
    model = float_llama()
    slimquant.quantize(model, {**W4G16, "algorithms": [algorithm]}, samples=token_samples(4))
    return model


def test_the_scheme_declares_two_level_groups():
    scheme = Recipe.parse(W4G16).base_scheme()
    assert scheme.type_name == "W4A8_DYNAMIC" and scheme.weights.channel_bits == 8
    assert Recipe.parse({"scheme": "W4A8_DYNAMIC"}).base_scheme().weights.channel_bits is None  # per channel
    with pytest.raises(RecipeError, match="channel_bits"):
        Recipe.parse({"weights": {"bits": 4, "channel_bits": 8}})


@pytest.mark.parametrize("algorithm", ["minmax", "gptq"])
def test_saved_tensors_dequantize_to_the_in_memory_weights(tmp_path, algorithm):
    model = quantized(algorithm)
    save_quantized(model, tmp_path / "out", pack_int4=False)
    desc = json.loads(next((tmp_path / "out").glob("quant_model_description*.json")).read_text())
    tensors = load_file(next((tmp_path / "out").glob("*.safetensors")))
    assert desc["model_quant_type"] == "W4A8_DYNAMIC" and desc["model_quant_type_second"] == "W4A8_DYNAMIC"
    fakes = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    for name, fake in fakes.items():
        out_f, in_f = fake.out_features, fake.in_features
        groups = -(-in_f // 16)
        t = {leaf: tensors[f"{name}.{leaf}"] for leaf in ("weight", "weight_scale", "weight_offset",
                                                         "weight_scale_second", "weight_offset_second")}
        assert all(desc[f"{name}.{leaf}"] == "W4A8_DYNAMIC" for leaf in t)
        assert t["weight"].dtype == torch.int8 and t["weight"].shape == (out_f, in_f)
        assert -8 <= int(t["weight"].min()) and int(t["weight"].max()) <= 7
        assert t["weight_scale"].shape == t["weight_offset"].shape == (out_f, 1)
        assert t["weight_scale_second"].shape == t["weight_offset_second"].shape == (out_f, groups)
        assert all(v.dtype == torch.float32 for k, v in t.items() if k != "weight")
        assert not t["weight_offset"].any() and not t["weight_offset_second"].any()
        group = tensors.get(f"{name}.g_idx", torch.arange(in_f) // 16).long()  # gptq's act_order permutes groups
        # the int8 level holds each code * group scale
        assert (t["weight"].float() * t["weight_scale_second"][:, group]).abs().max() <= 127 + 1e-4
        saved = t["weight"].float() * (t["weight_scale_second"] * t["weight_scale"])[:, group]
        assert torch.equal(saved, fake.weight), name
        kernel_order = t["weight"].float() * t["weight_scale_second"][:, group] * t["weight_scale"]
        assert torch.allclose(kernel_order, fake.weight, rtol=1e-6, atol=0)
        assert fake.act.dynamic and fake.act.bits == 8


@pytest.mark.parametrize("algorithm", ["minmax", "gptq"])
def test_round_trip_gives_identical_logits(tmp_path, algorithm):
    model = quantized(algorithm)
    save_quantized(model, tmp_path / "out")  # int4 codes packed two per byte
    reloaded = load_quantized(float_llama(), tmp_path / "out")
    x = token_samples(2, seed=4)[1]
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)
    assert reloaded.model.layers[0].mlp.down_proj.qweight.two_level.channel_bits == 8


def test_gptq_is_closer_than_round_to_nearest():
    x = torch.cat(token_samples(4, seed=11))
    reference = float_llama()
    with torch.no_grad():
        ref = reference(x).logits
        errors = {a: (quantized(a)(x).logits - ref).pow(2).mean() for a in ("minmax", "gptq")}
    assert errors["gptq"] < errors["minmax"] * 1.2, errors
