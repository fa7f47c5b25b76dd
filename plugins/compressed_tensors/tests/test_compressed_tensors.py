"""compressed-tensors export: transformers loads every scheme back to the fake-quantized weights and logits."""

import json

import pytest
import torch
import transformers
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from typer.testing import CliRunner

from slimquant import quantize
from slimquant.cli import app
from slimquant.config.scheme import ActArgs, Scheme, WeightArgs
from slimquant.errors import OutputError
from slimquant.export import save_quantized
from slimquant.plugins import EXPORTERS
from slimquant.quant.fake_linear import FakeQuantLinear
from slimquant.runtime.plan import LinearPlan
from slimquant.testing import check_declaration, tiny_model, token_samples
from slimquant_compressed_tensors import CompressedTensorsExporter, pack_int32, unpack_int32

IDS = token_samples(1, 16, seed=99)[0]
CASES = {
    "w4a16_sym_g64": ({"weights": {"bits": 4, "symmetric": True, "group_size": 64}}, "pack-quantized"),
    "w4a16_asym_g32": ({"weights": {"bits": 4, "symmetric": False, "group_size": 32}}, "pack-quantized"),
    "w8a16_channel": ({"weights": {"bits": 8, "symmetric": True}}, "pack-quantized"),
    "w8a8_static": ({"scheme": "W8A8"}, "int-quantized"),
    "w8a8_static_asym_weights": ({"weights": {"bits": 8, "symmetric": False},
                                  "activations": {"bits": 8, "symmetric": False}}, "int-quantized"),
    "w8a8_dynamic": ({"scheme": "W8A8_DYNAMIC"}, "int-quantized"),
}


def quantized(arch, recipe):
    model = tiny_model(arch)
    static = "W8A8" == recipe.get("scheme") or "activations" in recipe
    quantize(model, {**recipe, "runtime": {"progress": False}}, samples=token_samples(4, 16) if static else None)
    return model


def fakes(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def load(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
    logits = model(IDS).logits  # compressed-tensors decompresses the weights on the first forward
    return model, logits


def test_contract():
    check_declaration(CompressedTensorsExporter, EXPORTERS)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_packing_matches_compressed_tensors(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (6, 37), generator=g).to(torch.int8)
    for dim in (0, 1):
        packed = pack_int32(codes, bits, dim)
        assert torch.equal(packed, pack_to_int32(codes, bits, packed_dim=dim))
        assert torch.equal(unpack_int32(packed, bits, codes.shape[dim], dim), codes)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("case", list(CASES))
def test_transformers_loads_the_fake_quantized_model(tmp_path, arch, case):
    recipe, fmt = CASES[case]
    model = quantized(arch, recipe)
    expected = model(IDS).logits
    save_quantized(model, tmp_path / "out", save_type=["compressed-tensors"])
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["quantization_status"]) == ("compressed-tensors", fmt, "compressed")
    assert "lm_head" in qc["ignore"]
    loaded, logits = load(tmp_path / "out")
    for name, fake in fakes(model).items():
        assert torch.equal(loaded.get_submodule(name).weight, fake.weight), name
    if case == "w8a8_dynamic":  # compressed-tensors' reference divides by 127.5, slimquant (and vLLM) by 127
        assert torch.allclose(logits, expected, atol=0.05)
    else:
        assert torch.allclose(logits, expected, atol=1e-5, rtol=0)


def test_mixed_schemes_name_their_linears(tmp_path):
    recipe = {"weights": {"bits": 4, "symmetric": True, "group_size": 32}, "ignore": ["*.o_proj"],
              "overrides": [{"targets": ["*.down_proj"], "weights": {"bits": 8, "symmetric": True}}]}
    model = quantized("llama", recipe)
    save_quantized(model, tmp_path / "out", save_type=["compressed-tensors"])
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert len(qc["config_groups"]) == 2
    assert all("model.layers.0.mlp.down_proj" in g["targets"] or "model.layers.0.mlp.up_proj" in g["targets"]
               for g in qc["config_groups"].values())
    assert "model.layers.1.self_attn.o_proj" in qc["ignore"]
    loaded, logits = load(tmp_path / "out")
    assert torch.allclose(logits, model(IDS).logits, atol=1e-5, rtol=0)


def test_act_order_groups_are_stored_as_weight_g_idx(tmp_path):
    model = quantized("llama", {"weights": {"bits": 4, "symmetric": False, "group_size": 32}})
    for fake in fakes(model).values():
        qw = fake.qweight
        perm = torch.randperm(qw.shape[1], generator=torch.Generator().manual_seed(0))
        g_idx = torch.empty_like(perm)
        g_idx[perm] = torch.arange(qw.shape[1]) // 32
        fake.g_idx = g_idx.to(torch.int32)
    save_quantized(model, tmp_path / "out", save_type=["compressed-tensors"])
    loaded, logits = load(tmp_path / "out")
    for name, fake in fakes(model).items():
        assert torch.equal(loaded.get_submodule(name).weight, fake.weight), name
    assert torch.allclose(logits, model(IDS).logits, atol=1e-5, rtol=0)


def plan(weights, activations=None):
    return LinearPlan(Scheme(weights=WeightArgs(**weights), activations=activations), "minmax", "minmax")


def test_check_refuses_what_the_format_lacks():
    exporter = CompressedTensorsExporter()
    assert exporter.check(plan=plan({"bits": 4, "group_size": 128}), name=None, shape=None) == []
    [ragged] = exporter.check(plan=plan({"bits": 4, "group_size": 48}), name="x", shape=(8, 64))
    assert ragged.startswith("weights.group_size: x has 64 input channels, not a multiple of group_size 48")
    [per_channel] = exporter.check(plan=plan({"bits": 8}, ActArgs(strategy="channel")), name=None, shape=None)
    assert per_channel.startswith("activations.strategy: compressed-tensors has no static per-input-channel")


def refusal(tmp_path, model, edit):
    name, fake = next(iter(fakes(model).items()))
    edit(fake)
    with pytest.raises(OutputError) as err:
        save_quantized(model, tmp_path / "out", save_type=["compressed-tensors"])
    assert not (tmp_path / "out").exists()
    return name, str(err.value)


def test_fractional_zero_points_are_refused(tmp_path):
    model = quantized("llama", {"weights": {"bits": 4, "symmetric": False, "group_size": 32}})
    name, msg = refusal(tmp_path, model, lambda f: f.weight_zero.add_(0.25))
    assert f"this format cannot hold fractional zero points (fractional_zeros): {name}" in msg


def test_codebook_grids_are_refused(tmp_path):
    model = quantized("llama", {"weights": {"bits": 4, "symmetric": True, "group_size": 32}})
    name, msg = refusal(tmp_path, model, lambda f: setattr(f, "codebook", torch.linspace(-1, 1, 16)))
    assert f"cannot hold codes standing for a codebook's values (a non-uniform grid) (codebook): {name}" in msg


def test_unequal_permuted_groups_are_refused(tmp_path):
    model = quantized("llama", {"weights": {"bits": 4, "symmetric": True, "group_size": 32}})
    g_idx = torch.zeros(64, dtype=torch.int32)
    g_idx[-1] = 1
    name, msg = refusal(tmp_path, model, lambda f: setattr(f, "g_idx", g_idx))
    assert f"{name}: g_idx puts unequal numbers of input channels in its groups" in msg


def test_scales_the_model_dtype_cannot_hold_are_refused(tmp_path):
    model = quantized("llama", {"weights": {"bits": 4, "symmetric": True, "group_size": 32}}).to(torch.bfloat16)
    name, msg = refusal(tmp_path, model, lambda f: setattr(f, "weight_scale", f.weight_scale.float() * (1 + 2**-12)))
    assert f"{name}: weight_scale is not exactly representable in torch.bfloat16" in msg


def test_conv1d_models_are_refused(tmp_path):
    model = quantized("gpt2", {"weights": {"bits": 8, "symmetric": True}})
    _, msg = refusal(tmp_path, model, lambda f: None)
    assert "has no nn.Linear" in msg


def test_export_command_converts_a_saved_output(tmp_path):
    model = quantized("llama", {"weights": {"bits": 4, "symmetric": False, "group_size": 64}})
    tiny_model("llama").save_pretrained(tmp_path / "float")
    save_quantized(model, tmp_path / "saved")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "saved"), "--to", "compressed-tensors",
                                      "--output", str(tmp_path / "ct"), "--model", str(tmp_path / "float")])
    assert result.exit_code == 0, result.output
    _, logits = load(tmp_path / "ct")
    assert torch.allclose(logits, model(IDS).logits, atol=1e-5, rtol=0)
    again = CliRunner().invoke(app, ["export", str(tmp_path / "saved"), "--to", "compressed-tensors",
                                     "--output", str(tmp_path / "ct"), "--model", str(tmp_path / "float")])
    assert again.exit_code == 2



def test_a_quantized_kv_cache_is_refused_before_and_at_export(tmp_path):
    from slimquant.config.recipe import Recipe
    from slimquant.errors import RecipeError
    from slimquant.plugins import plan_algorithms

    recipe = {"scheme": "W8A16", "kv_cache": {"bits": 8}, "runtime": {"progress": False}}
    with pytest.raises(RecipeError, match="save_type compressed-tensors: this format cannot hold a quantized KV"):
        plan_algorithms(Recipe.model_validate(recipe), formats=["compressed-tensors"])
    model = tiny_model("llama")
    quantize(model, recipe, samples=token_samples(2, 16))
    with pytest.raises(OutputError, match="KV cache is quantized"):
        save_quantized(model, tmp_path / "out", save_type=["compressed-tensors"])
    assert not (tmp_path / "out").exists()


def test_gptq_scales_cut_from_stacked_linears_are_saved(tmp_path):
    """GPTQ quantizes q/k/v (and gate/up) stacked: their scales are views of one tensor, which safetensors refuses
    to write as such."""
    model = tiny_model("llama")
    quantize(model, {"weights": {"bits": 4, "symmetric": False, "group_size": 32}, "algorithms": ["gptq"],
                     "runtime": {"progress": False}}, samples=token_samples(4, 16))
    q, k = (model.get_submodule(f"model.layers.0.self_attn.{p}").qweight.scale for p in ("q_proj", "k_proj"))
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    save_quantized(model, tmp_path / "out", save_type=["compressed-tensors"])
    _, logits = load(tmp_path / "out")
    assert torch.allclose(logits, model(IDS).logits, atol=1e-5, rtol=0)


def test_activation_rounding_matches_compressed_tensors_bit_for_bit():
    """Where x / scale lies within a few ulps of a half-integer, adding the zero point before or after rounding
    gives different codes; slimquant adds it before, as compressed-tensors (and vLLM) do."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize

    from slimquant.quant.math import fake_quantize

    scale, zero = torch.tensor([0.0121]), torch.tensor([-35.0])
    halves = torch.arange(-90, 160, dtype=torch.float32) + 0.5
    x = torch.cat([(halves + d) * scale for d in (-3e-6, -1e-6, 0.0, 1e-6, 3e-6)]).reshape(1, -1)
    args = QuantizationArgs(num_bits=8, type="int", symmetric=False, strategy="tensor")
    assert torch.equal(fake_quantize(x, scale, zero, 8), ct_fake_quantize(x, scale, zero.to(torch.int8), args))
