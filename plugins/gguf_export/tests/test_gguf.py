"""gguf export: the file's blocks dequantize (gguf.quants) to the fake-quantized weights exactly, and transformers
loads it back to the same logits."""

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf.quants import dequantize

from slimquant import quantize
from slimquant.config.scheme import ActArgs, Scheme, WeightArgs
from slimquant.errors import OutputError
from slimquant.export import save_quantized
from slimquant.plugins import EXPORTERS
from slimquant.quant.fake_linear import FakeQuantLinear
from slimquant.runtime.plan import LinearPlan
from slimquant.testing import check_declaration, tiny_model, token_samples
from slimquant_gguf import GGUFExporter, permute_rows, unpermute_rows
from slimquant_gguf.llama import gguf_name, rope_heads

IDS = token_samples(1, 16, seed=99)[0]
CASES = {"Q4_0": dict(bits=4, symmetric=True, group_size=32), "Q4_1": dict(bits=4, symmetric=False, group_size=64),
         "Q5_0": dict(bits=5, symmetric=True, group_size=32), "Q5_1": dict(bits=5, symmetric=False, group_size=64),
         "Q8_0": dict(bits=8, symmetric=True)}


def quantized(weights, arch="llama"):
    model = tiny_model(arch)
    quantize(model, {"weights": {**weights, "scale_dtype": "float16"}, "runtime": {"progress": False}})
    return model


def test_contract():
    check_declaration(GGUFExporter, EXPORTERS)


def test_permutation_is_llama_cpps_and_inverts():
    w = torch.arange(32).reshape(8, 4)
    assert torch.equal(permute_rows(w, 2)[:, 0], torch.tensor([0, 8, 4, 12, 16, 24, 20, 28]))
    assert torch.equal(unpermute_rows(permute_rows(w, 2), 2), w)


@pytest.mark.parametrize("kind", list(CASES))
def test_blocks_dequantize_to_the_fake_quantized_weights(tmp_path, kind):
    model = quantized(CASES[kind])
    expected = model(IDS).logits
    save_quantized(model, tmp_path / "out", save_type=["gguf"])
    reader = gguf.GGUFReader(tmp_path / "out" / "model.gguf")
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.block_count"].contents() == 2
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2
    assert reader.fields["tokenizer.ggml.model"].contents() == "none"
    tensors = {t.name: t for t in reader.tensors}
    state = model.state_dict()
    assert len(tensors) == 2 + 2 * 9 + 1  # embeddings, output_norm, output; per block 2 norms and 7 Linears
    for name, module in model.named_modules():
        gname = gguf_name(f"{name}.weight", model.config)
        if isinstance(module, FakeQuantLinear):
            t = tensors.pop(gname)
            assert t.tensor_type.name == kind, name
            values = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).reshape(module.weight.shape)
            heads = rope_heads(f"{name}.weight", model.config)
            assert torch.equal(values if heads is None else unpermute_rows(values, heads), module.weight), name
    for gname, t in tensors.items():
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, gname
    assert torch.equal(torch.from_numpy(tensors["token_embd.weight"].data.copy()), state["model.embed_tokens.weight"])
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), gguf_file="model.gguf").eval()
    assert torch.allclose(loaded(IDS).logits, expected, atol=1e-5, rtol=0)


def test_tied_embeddings_leave_out_output_weight(tmp_path):
    model = quantized(CASES["Q8_0"])
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    save_quantized(model, tmp_path / "out", save_type=["gguf"])
    names = {t.name for t in gguf.GGUFReader(tmp_path / "out" / "model.gguf").tensors}
    assert "output.weight" not in names and "token_embd.weight" in names


def plan(weights, activations=None):
    return LinearPlan(Scheme(weights=WeightArgs(**weights), activations=activations), "minmax", "minmax")


@pytest.mark.parametrize(("weights", "act", "message"), [
    ({"bits": 3, "group_size": 32}, None, "weights.bits: gguf holds 4- and 5-bit"),
    ({"bits": 8, "symmetric": False}, None, "weights.bits: gguf holds 4- and 5-bit"),
    ({"bits": 6, "group_size": 32}, None, "not symmetric 6-bit"),
    ({"bits": 4, "group_size": 16}, None, "weights.group_size: gguf blocks hold 32 weights"),
    ({"bits": 4, "group_size": 48}, None, "group_size 48 is not a multiple of 32"),
    ({"bits": 8}, ActArgs(), "activations: gguf stores weights only"),
])
def test_check_refuses_what_the_format_lacks(weights, act, message):
    problems = GGUFExporter().check(plan=plan({**weights, "scale_dtype": "float16"}, act), name=None, shape=None)
    assert any(message in p for p in problems), problems


def test_check_requires_float16_scales_and_whole_blocks():
    exporter = GGUFExporter()
    [scales] = exporter.check(plan=plan({"bits": 4, "group_size": 32}), name=None, shape=None)
    assert scales.startswith("weights.scale_dtype: gguf stores float16 scales; set scale_dtype: float16")
    [width] = exporter.check(plan=plan({"bits": 8, "scale_dtype": "float16"}), name="x", shape=(4, 40))
    assert width == "weights: x has 40 input channels, not a multiple of the 32-weight gguf block"


def refusal(tmp_path, model, edit):
    name, fake = next((n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear))
    edit(fake)
    with pytest.raises(OutputError) as err:
        save_quantized(model, tmp_path / "out", save_type=["gguf"])
    assert not (tmp_path / "out").exists()
    return name, str(err.value)


def test_export_refusals(tmp_path):
    model = quantized(CASES["Q4_1"])
    name, msg = refusal(tmp_path, model, lambda f: f.weight_zero.add_(0.5))
    assert f"{name}: fractional zero points cannot be stored in Q4_1 / Q5_1 blocks exactly" in msg
    model = quantized(CASES["Q4_0"])
    name, msg = refusal(tmp_path, model, lambda f: setattr(f, "weight_scale", f.weight_scale * (1 + 2**-14)))
    assert f"{name}: weight scales are not exactly float16 (gguf's d)" in msg
    name, msg = refusal(tmp_path, quantized(CASES["Q4_0"]), lambda f: setattr(f, "codebook", torch.linspace(-1, 1, 16)))
    assert f"cannot hold codes standing for a codebook's values (a non-uniform grid) (codebook): {name}" in msg
    g_idx = torch.arange(64, dtype=torch.int32).flip(0) // 32
    name, msg = refusal(tmp_path, quantized(CASES["Q4_0"]), lambda f: setattr(f, "g_idx", g_idx))
    assert f"cannot hold groups permuted over the input channels (g_idx) (permuted_groups): {name}" in msg
    _, msg = refusal(tmp_path, quantized(CASES["Q8_0"], arch="gemma"), lambda f: None)
    assert "the model is a 'gemma' model; the gguf exporter writes llama, mistral, qwen2, qwen3 models" in msg


def test_float16_scales_make_q4_1_offsets_exact():
    model = quantized(CASES["Q4_1"])
    for module in model.modules():
        if isinstance(module, FakeQuantLinear):
            m = module.weight_scale * (module.weight_zero + 8)
            assert torch.equal(m.half().float(), m)


def test_a_quantized_kv_cache_is_refused_before_and_at_export(tmp_path):
    from slimquant.config.recipe import Recipe
    from slimquant.errors import RecipeError
    from slimquant.plugins import plan_algorithms

    recipe = {"weights": {**CASES["Q8_0"], "scale_dtype": "float16"}, "kv_cache": {"bits": 8},
              "runtime": {"progress": False}}
    with pytest.raises(RecipeError, match="save_type gguf: this format cannot hold a quantized KV cache"):
        plan_algorithms(Recipe.model_validate(recipe), formats=["gguf"])
    model = tiny_model("llama")
    quantize(model, recipe, samples=token_samples(2, 16))
    with pytest.raises(OutputError, match="KV cache is quantized"):
        save_quantized(model, tmp_path / "out", save_type=["gguf"])
    assert not (tmp_path / "out").exists()


def test_permuted_groups_are_refused_before_quantizing():
    from slimquant.config.recipe import Recipe
    from slimquant.errors import RecipeError
    from slimquant.plugins import plan_algorithms

    weights = {"bits": 4, "symmetric": True, "group_size": 32, "scale_dtype": "float16"}
    with pytest.raises(RecipeError, match=r"save_type gguf: this format cannot hold groups permuted over the input "
                                          r"channels \(g_idx\) \(permuted_groups\), which gptq produces \(act_order: "
                                          r"true with static_groups: false\)"):
        plan_algorithms(Recipe.model_validate({"weights": weights, "algorithms": ["gptq"]}), formats=["gguf"])
    for gptq in ({"name": "gptq", "static_groups": True}, {"name": "gptq", "act_order": False}):
        plan_algorithms(Recipe.model_validate({"weights": weights, "algorithms": [gptq]}), formats=["gguf"])
    per_channel = {**weights, "group_size": None}
    plan_algorithms(Recipe.model_validate({"weights": per_channel, "algorithms": ["gptq"]}), formats=["gguf"])


@pytest.mark.parametrize("bits", [4, 5])
def test_round_to_nearest_at_group_32_is_llama_cpps_own_q4_0_and_q5_0(bits):
    """Symmetric round-to-nearest with signed scales is llama.cpp's Q4_0 / Q5_0 rule (d = the block's weight of
    largest magnitude / -2^(bits-1)): our blocks are byte for byte what gguf's reference quantizer writes."""
    from gguf.quants import quantize as gguf_quantize

    from slimquant.quant.math import round_to_nearest
    from slimquant.quant.scale_rounding import float16_scales
    from slimquant_gguf.blocks import encode_blocks

    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(0))
    args = WeightArgs(bits=bits, symmetric=True, group_size=32, scale_dtype="float16")
    ours, kind = encode_blocks(float16_scales(round_to_nearest(w, args)))
    assert kind.name == f"Q{bits}_0"
    assert np.array_equal(ours, gguf_quantize(w.numpy(), kind))
    absmax = WeightArgs(bits=bits, symmetric=True, group_size=32, scale_dtype="float16", symmetric_scale="absmax")
    assert not np.array_equal(encode_blocks(float16_scales(round_to_nearest(w, absmax)))[0], ours)


@pytest.mark.parametrize("arch, gguf_arch", [("llama", "llama"), ("mistral", "llama"), ("qwen2", "qwen2"),
                                             ("qwen3", "qwen3")])
@pytest.mark.parametrize("kind", ["Q8_0", "Q4_1"])
def test_every_written_architecture_loads_in_transformers_with_the_in_memory_logits(tmp_path, arch, gguf_arch, kind):
    """Qwen3 with head_dim 128: transformers' GGUF reader does not read qwen3.attention.key_length and takes
    Qwen3's default head_dim (llama.cpp reads it; the file holds it)."""
    if arch == "qwen3":
        config = tiny_model("qwen3").config
        config.head_dim = 128
        torch.manual_seed(0)
        model = transformers.Qwen3ForCausalLM(config).eval()
        quantize(model, {"weights": {**CASES[kind], "scale_dtype": "float16"}, "runtime": {"progress": False}})
    else:
        model = quantized(CASES[kind], arch=arch)
    expected = model(IDS).logits
    save_quantized(model, tmp_path / "out", save_type=["gguf"])
    reader = gguf.GGUFReader(tmp_path / "out" / "model.gguf")
    assert reader.fields["general.architecture"].contents() == gguf_arch
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), gguf_file="model.gguf").eval()
    assert torch.allclose(loaded(IDS).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["gemma", "opt", "phi", "mixtral"])
def test_architectures_gguf_does_not_write_are_refused_before_any_weight_is_read(arch):
    from slimquant.config.recipe import Recipe
    from slimquant.errors import RecipeError
    from slimquant.plugins import plan_algorithms
    from slimquant.runtime.preflight import check_before_loading

    recipe = Recipe.model_validate({"weights": {**CASES["Q8_0"], "scale_dtype": "float16"}})
    with pytest.raises(RecipeError, match=rf"the output formats cannot hold this model: save_type gguf: the model is "
                                          rf"a '{arch}' model; the gguf exporter writes llama, mistral, qwen2, qwen3"):
        check_before_loading(recipe, plan_algorithms(recipe, formats=["gguf"]), tiny_model(arch).config)


def test_the_api_refuses_an_architecture_before_quantizing_when_told_the_format():
    from slimquant.errors import RecipeError

    model = tiny_model("opt")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(RecipeError, match="save_type gguf: the model is a 'opt' model"):
        quantize(model, {"weights": {**CASES["Q8_0"], "scale_dtype": "float16"}, "runtime": {"progress": False}},
                 save_type="gguf")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
