"""Saving in msModelSlim's layout (safetensors, shards, numpy) and loading back bit-exactly."""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from export_helpers import RECIPES, base_model, description, float_llama, logits, quantized, saved
from safetensors.torch import load_file
from tiny_models import token_samples

import slimquant
from slimquant.export import save_quantized
from slimquant.export.packing import pack_int4, unpack_int4
from slimquant.loader import load_quantized
from slimquant.quant.fake_linear import FakeQuantLinear
from slimquant.quant.math import quantize_weight_with, weight_qparams

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def float_model():
    return base_model()


# -- round trips --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(RECIPES))
def test_saved_model_loads_back_with_identical_logits(float_model, kind, tmp_path):
    model, out = saved(float_model, kind, tmp_path)
    qtype = "w8a8" if kind == "mixed" else kind.lower()
    assert (out / f"quant_model_weight_{qtype}.safetensors").is_file()
    assert (out / f"quant_model_description_{qtype}.json").is_file()
    loaded = load_quantized(copy.deepcopy(float_model), out)
    expected = {n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    assert {n for n, m in loaded.named_modules() if isinstance(m, FakeQuantLinear)} == expected
    assert torch.equal(logits(loaded), logits(model))
    assert not torch.equal(logits(loaded), logits(float_model))


def test_description_types_every_tensor_and_records_groups(float_model, tmp_path):
    model, out = saved(float_model, "mixed", tmp_path)
    desc = description(out)
    tensors = load_file(out / "quant_model_weight_w8a8.safetensors")
    assert desc["model_quant_type"] == "W8A8" and desc["version"]
    assert {k for k, v in desc.items() if isinstance(v, str)} - {"model_quant_type", "version"} == set(tensors)
    assert desc["model.embed_tokens.weight"] == desc["model.norm.weight"] == "FLOAT"
    assert desc["model.layers.0.mlp.gate_proj.weight"] == "FLOAT"  # ignored: a float Linear
    assert tensors["model.layers.0.mlp.gate_proj.weight"].dtype == torch.float32
    assert desc["model.layers.1.mlp.down_proj.weight"] == "W4A16"
    assert desc["model.layers.1.self_attn.v_proj.weight_scale"] == "W8A8_DYNAMIC"
    assert desc["model.layers.0.self_attn.q_proj.deq_scale"] == "W8A8"
    down = desc["slimquant"]["linears"]["model.layers.1.mlp.down_proj"]
    assert (down["group_size"], down["in_features"], down["groups"], down["pack"]) == (32, 80, 3, "int4x2")
    up = desc["slimquant"]["linears"]["model.layers.0.mlp.up_proj"]
    assert (up["bits"], up["pack"], up["symmetric"]) == (3, "int4x2", True)
    assert not tensors["model.layers.0.mlp.up_proj.weight_offset"].any()  # symmetric: zeros
    assert tensors["model.layers.1.mlp.down_proj.weight_scale"].shape == (48, 3)
    assert desc["slimquant"]["linears"]["model.layers.0.self_attn.o_proj"]["act"]["per_channel"] is True
    assert tensors["model.layers.0.self_attn.o_proj.input_scale"].shape == (48,)


def test_tied_embeddings_are_saved_once_and_tied_again(float_model, tmp_path):
    assert float_model.lm_head.weight is float_model.model.embed_tokens.weight
    _, out = saved(float_model, "W8A8_DYNAMIC", tmp_path)
    assert "lm_head.weight" not in load_file(out / "quant_model_weight_w8a8_dynamic.safetensors")
    assert description(out)["slimquant"]["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    fresh = copy.deepcopy(float_model)
    fresh.lm_head.weight = torch.nn.Parameter(torch.zeros_like(fresh.lm_head.weight))  # untied
    loaded = load_quantized(fresh, out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_untied_head_is_saved_as_its_own_float_tensor(tmp_path):
    model = float_llama(tied=False, attention_bias=False, mlp_bias=False)
    quantized_model = copy.deepcopy(model)
    slimquant.quantize(quantized_model, {"scheme": "W8A16", "model": {"device": "cpu"},
                                         "runtime": {"progress": False}}, samples=token_samples(2, 16))
    save_quantized(quantized_model, tmp_path / "o")
    tensors = load_file(tmp_path / "o" / "quant_model_weight_w8a16.safetensors")
    assert tensors["lm_head.weight"].dtype == torch.float32 and "model.layers.0.mlp.up_proj.bias" not in tensors
    assert torch.equal(logits(load_quantized(copy.deepcopy(model), tmp_path / "o")), logits(quantized_model))


def test_permuted_groups_and_extra_tensors_round_trip(tmp_path):
    model = float_llama(attention_bias=False, mlp_bias=False)
    fresh = copy.deepcopy(model)
    lin = model.model.layers[0].mlp.down_proj
    g_idx = (torch.randperm(80, generator=torch.Generator().manual_seed(0)) % 3).to(torch.int32)
    scale, zero = weight_qparams(lin.weight, 4, False, 32, g_idx=g_idx)
    qw = quantize_weight_with(lin.weight, scale, zero, 4, 32, g_idx=g_idx)
    qw.extras["awq_input_scale"] = torch.rand(48, 1)
    model.model.layers[0].mlp.down_proj = FakeQuantLinear(qw, None, None)
    save_quantized(model, tmp_path / "o", save_type="safe_tensor")
    tensors = load_file(tmp_path / "o" / "quant_model_weight_w4a16.safetensors")
    assert torch.equal(tensors["model.layers.0.mlp.down_proj.g_idx"], g_idx)
    loaded = load_quantized(fresh, tmp_path / "o")
    back = loaded.model.layers[0].mlp.down_proj
    assert torch.equal(back.extra_awq_input_scale, qw.extras["awq_input_scale"])
    assert torch.equal(logits(loaded), logits(model))


# -- tensors ------------------------------------------------------------------------------------------------


def test_w8a8_integer_kernel_parameters_reproduce_the_fake_quantized_linear(float_model, tmp_path):
    model, out = saved(float_model, "W8A8", tmp_path)
    t = load_file(out / "quant_model_weight_w8a8.safetensors")
    name = "model.layers.0.mlp.down_proj"
    w, qb, deq = t[f"{name}.weight"], t[f"{name}.quant_bias"], t[f"{name}.deq_scale"]
    s_in, off = t[f"{name}.input_scale"], t[f"{name}.input_offset"]
    assert (w.dtype, qb.dtype, deq.dtype, s_in.dtype) == (torch.int8, torch.int32, torch.float32, torch.float32)
    assert qb.shape == deq.shape == (48,) and s_in.shape == off.shape == (1,)
    assert torch.equal(deq, s_in * t[f"{name}.weight_scale"][:, 0])
    assert not torch.equal(off, torch.zeros(1))  # asymmetric activations: the offset correction matters
    x = torch.randn(5, 80) * 0.5
    x_q = torch.clamp(torch.round(x / s_in) + off, -128, 127).to(torch.int64)
    y_int = ((x_q @ w.to(torch.int64).T) + qb.to(torch.int64)).double() * deq.double()
    with torch.no_grad():
        y_fake = model.get_submodule(name)(x).double()
    assert (y_int - y_fake).abs().max() <= 0.5 * deq.max() + 1e-5


def test_int4_packing_layout():
    codes = torch.tensor([[-8, 7, 0], [1, -1, 3]], dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[0xF0, 0x88], [0x79, 0x8B]]  # low nibble = even column, code + 8; odd pad 8
    assert torch.equal(unpack_int4(packed, 3), codes)
    for width in (1, 31, 32):
        random = torch.randint(-8, 8, (4, width), dtype=torch.int8)
        assert torch.equal(unpack_int4(pack_int4(random), width), random)
    with pytest.raises(ValueError):
        unpack_int4(packed, 5)


def test_four_bit_weights_are_packed_in_the_file(float_model, tmp_path):
    model, out = saved(float_model, "W4A16", tmp_path)
    t = load_file(out / "quant_model_weight_w4a16.safetensors")
    key = "model.layers.0.mlp.down_proj"
    assert t[f"{key}.weight"].dtype == torch.uint8 and t[f"{key}.weight"].shape == (48, 40)
    assert torch.equal(unpack_int4(t[f"{key}.weight"], 80), model.get_submodule(key).codes)


def test_sharded_output_has_an_index_and_loads(float_model, tmp_path):
    model, out = saved(float_model, "W4A16", tmp_path, part_file_size=40e3 / 1024**3)
    shards = sorted(out.glob("quant_model_weight_w4a16-*-of-*.safetensors"))
    assert len(shards) >= 2 and not (out / "quant_model_weight_w4a16.safetensors").exists()
    assert all(re.fullmatch(rf"quant_model_weight_w4a16-\d{{5}}-of-{len(shards):05d}\.safetensors", p.name)
               for p in shards)
    index = json.loads((out / "quant_model_weight_w4a16.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    held = {k: p.name for p in shards for k in load_file(p)}
    assert index["weight_map"] == held
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for p in shards
                                                  for t in load_file(p).values())
    assert torch.equal(logits(load_quantized(copy.deepcopy(float_model), out)), logits(model))


def test_numpy_files_load_without_pickle_and_match_safetensors(float_model, tmp_path):
    model, out = saved(float_model, "W8A8", tmp_path, save_type=["safe_tensor", "numpy"])
    t = load_file(out / "quant_model_weight_w8a8.safetensors")
    files = sorted(out.glob("*.npz"))
    assert {p.name for p in files} >= {"quant_weight.npz", "deq_scale.npz", "quant_bias.npz", "float_weights.npz"}
    for path in files:
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                full = key if path.name == "float_weights.npz" else \
                    f"{key}.{'weight' if path.stem == 'quant_weight' else path.stem}"
                assert np.array_equal(npz[key], t[full].numpy()), full
    with np.load(out / "quant_weight.npz", allow_pickle=False) as npz:
        assert npz["model.layers.1.self_attn.q_proj"].dtype == np.int8
    assert set(description(out)["slimquant"]["files"]) == {p.name for p in files} | {
        "quant_model_weight_w8a8.safetensors"}


def test_tokenizer_is_saved_alongside(float_model, tmp_path):
    from tiny_tokenizer import build_tokenizer

    _, out = saved(float_model, "W8A8_DYNAMIC", tmp_path, tokenizer=build_tokenizer())
    assert (out / "tokenizer.json").is_file()


# -- the exporter plugin ------------------------------------------------------------------------------------


def test_exporters_are_plugins_of_their_own_entry_point_group(float_model, tmp_path):
    from slimquant.plugins import EXPORTERS, PluginSet, hooks_of, installed, load_plugin_class

    declared = tomllib.loads((ROOT / "core" / "pyproject.toml").read_text())["project"]["entry-points"]
    assert declared["slimquant.exporters"] == {"safe_tensor": "slimquant.export.ascend:SafetensorsExporter",
                                               "numpy": "slimquant.export.ascend:NumpyExporter"}
    assert not set(declared["slimquant.plugins"]) & {"safe_tensor", "numpy", "ascend"}
    assert {"safe_tensor", "numpy"} <= set(installed(EXPORTERS))
    cls = load_plugin_class("safe_tensor", EXPORTERS)
    assert hooks_of(cls) == ["export"]
    plugins = PluginSet({"safe_tensor": cls(cls.Config())})
    model, _ = quantized(float_model, "W8A8_DYNAMIC")
    files = plugins.call("safe_tensor", "export", model=model, output_dir=tmp_path, options={})
    assert {Path(f).name for f in files} == {"quant_model_weight_w8a8_dynamic.safetensors",
                                             "quant_model_description_w8a8_dynamic.json"}
