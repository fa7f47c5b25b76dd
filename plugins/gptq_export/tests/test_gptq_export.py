"""GPTQ checkpoint export: the layout read back independently equals the fake-quantized weights; refusals."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from slimquant import quantize
from slimquant.errors import OutputError
from slimquant.export import save_quantized
from slimquant.plugins import EXPORTERS
from slimquant.quant.fake_linear import FakeQuantLinear
from slimquant.testing import check_declaration, tiny_model, token_samples
from slimquant_gptq_export import GPTQExporter, GPTQv2Exporter, pack_rows, unpack_rows

IDS = token_samples(1, 16, seed=99)[0]


def quantized(arch, weights, **recipe):
    model = tiny_model(arch)
    weights = {"scale_dtype": "float16", **weights}
    quantize(model, {"weights": weights, **recipe, "runtime": {"progress": False}}, samples=None)
    return model


def fakes(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def read_back(tensors, name, bits, v2):
    """The GPTQ reading, element by element in numpy: w[i, o] = scales[g, o] * (q[i, o] - z[g, o])."""
    qweight = tensors[f"{name}.qweight"].numpy().view(np.uint32)
    qzeros = tensors[f"{name}.qzeros"].numpy().view(np.uint32)
    scales = tensors[f"{name}.scales"].float().numpy()
    g_idx = tensors[f"{name}.g_idx"].numpy()
    per_word, mask = 32 // bits, (1 << bits) - 1
    inputs, outputs = qweight.shape[0] * per_word, scales.shape[1]
    w = np.zeros((outputs, inputs), dtype=np.float32)
    for i in range(inputs):
        q = (qweight[i // per_word] >> np.uint32(bits * (i % per_word))) & mask
        g = g_idx[i]
        z = np.array([(qzeros[g, o // per_word] >> np.uint32(bits * (o % per_word))) & mask
                      for o in range(outputs)], dtype=np.float32) + (0 if v2 else 1)
        w[:, i] = scales[g] * (q.astype(np.float32) - z)
    return torch.from_numpy(w)


def test_contract():
    check_declaration(GPTQExporter, EXPORTERS)
    check_declaration(GPTQv2Exporter, EXPORTERS)


def test_packing_by_hand():
    values = torch.tensor([[1], [2], [3], [4], [5], [6], [7], [15]])
    assert pack_rows(values, 4).item() == int("F7654321", 16) - 2**32
    assert torch.equal(unpack_rows(pack_rows(values, 4), 4), values)
    assert pack_rows(torch.tensor([[1], [2], [3], [255]]), 8).item() == int("FF030201", 16) - 2**32


@pytest.mark.parametrize("fmt", ["gptq", "gptq-v2"])
@pytest.mark.parametrize("weights", [
    {"bits": 4, "symmetric": True, "group_size": 32},
    {"bits": 4, "symmetric": False, "group_size": 32},
    {"bits": 8, "symmetric": True},
    {"bits": 2, "symmetric": False, "group_size": 48},  # a short last group: 64 = 48 + 16
])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_layout_reads_back_to_the_fake_quantized_weights(tmp_path, fmt, weights, arch):
    model = quantized(arch, weights)
    if fmt == "gptq" and not weights["symmetric"]:
        for fake in fakes(model).values():  # v1 cannot hold a zero point of 0 (its qzeros store zero - 1)
            fake.weight_zero.clamp_(min=-(2 ** (weights["bits"] - 1)) + 1)
    out = save_quantized(model, tmp_path / "out", save_type=[fmt])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["checkpoint_format"]) == ("gptq", "gptq_v2" if fmt == "gptq-v2" else "gptq")
    assert (qc["bits"], qc["sym"], qc["group_size"], qc["desc_act"]) == (
        weights["bits"], weights["symmetric"], weights.get("group_size", -1), False)
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert tmp_path / "out" / "model.safetensors" in out
    for name, fake in fakes(model).items():
        assert tensors[f"{name}.scales"].dtype == torch.float16
        assert f"{name}.weight" not in tensors
        expected = fake.qweight.dequantize()
        assert torch.equal(read_back(tensors, name, weights["bits"], fmt == "gptq-v2"), expected), name
    tied = model.config.tie_word_embeddings
    assert "model.embed_tokens.weight" in tensors and ("lm_head.weight" in tensors) != tied


def test_act_order_groups_are_stored_in_g_idx(tmp_path):
    model = quantized("llama", {"bits": 4, "symmetric": True, "group_size": 16})
    for fake in fakes(model).values():
        perm = torch.randperm(fake.qweight.shape[1], generator=torch.Generator().manual_seed(0))
        g_idx = torch.empty_like(perm)
        g_idx[perm] = torch.arange(fake.qweight.shape[1]) // 16
        fake.g_idx = g_idx.to(torch.int32)
    save_quantized(model, tmp_path / "out", save_type=["gptq"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["desc_act"]
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, fake in fakes(model).items():
        assert torch.equal(read_back(tensors, name, 4, False), fake.qweight.dequantize()), name


def refused(tmp_path, model, fmt="gptq"):
    with pytest.raises(OutputError) as err:
        save_quantized(model, tmp_path / "out", save_type=[fmt])
    assert not (tmp_path / "out").exists()
    return str(err.value)


def test_a_zero_point_of_zero_is_refused_in_v1_and_kept_in_v2(tmp_path):
    model = quantized("llama", {"bits": 4, "symmetric": False, "group_size": 32})
    name, fake = next(iter(fakes(model).items()))
    fake.weight_zero[0, 0] = -8
    assert f"{name}: a zero point of 0 cannot be stored in checkpoint format gptq" in refused(tmp_path, model)
    save_quantized(model, tmp_path / "v2", save_type=["gptq-v2"])
    tensors = load_file(str(tmp_path / "v2" / "model.safetensors"))
    assert torch.equal(read_back(tensors, name, 4, True), fake.qweight.dequantize())


def test_what_the_format_lacks_is_refused(tmp_path):
    assert "not exactly float16" in refused(tmp_path, quantized("llama", {"bits": 4, "group_size": 32,
                                                                           "scale_dtype": "float32"}))
    assert "3-bit" in refused(tmp_path, quantized("llama", {"bits": 3, "group_size": 32}))
    model = quantized("llama", {"bits": 4, "group_size": 32}, ignore=["*.o_proj"])
    assert "model.layers.0.self_attn.o_proj: left in float" in refused(tmp_path, model)
    model = quantized("llama", {"bits": 4, "group_size": 32},
                      overrides=[{"targets": ["*.down_proj"], "weights": {"bits": 8, "scale_dtype": "float16"}}])
    assert "different schemes" in refused(tmp_path, model)
    model = quantized("llama", {"bits": 4, "symmetric": False, "group_size": 32})
    name, fake = next(iter(fakes(model).items()))
    fake.weight_zero.add_(0.25)
    assert f"cannot hold fractional zero points (fractional_zeros): {name}" in refused(tmp_path, model, "gptq-v2")


def test_the_plan_check_refuses_before_quantizing():
    from slimquant.config.recipe import Recipe
    from slimquant.errors import RecipeError
    from slimquant.plugins import plan_algorithms

    with pytest.raises(RecipeError, match="scale_dtype: GPTQ checkpoints store float16 scales"):
        plan_algorithms(Recipe.model_validate({"weights": {"bits": 4, "group_size": 32}}), formats=["gptq"])
    with pytest.raises(RecipeError, match="activations: GPTQ checkpoints are weight-only"):
        plan_algorithms(Recipe.model_validate({"scheme": "W8A8", "weights": {"scale_dtype": "float16"}}),
                        formats=["gptq"])


def test_another_hugging_face_format_in_the_same_folder_is_refused(tmp_path):
    model = quantized("llama", {"bits": 4, "symmetric": True, "group_size": 32})
    with pytest.raises(OutputError, match="config.json.*already written"):
        save_quantized(model, tmp_path / "out", save_type=["compressed-tensors", "gptq"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt,symmetric", [("gptq", True), ("gptq-v2", False)])
def test_transformers_loads_the_checkpoint(tmp_path, fmt, symmetric):
    """With optimum + gptqmodel installed (not in CI: bench/bench_export.py's gptq-venv). GPTQModel's CPU kernel
    dequantizes into float16, so its weights are the fake-quantized ones rounded to float16."""
    pytest.importorskip("gptqmodel")
    pytest.importorskip("optimum")
    import transformers

    model = quantized("llama", {"bits": 4, "symmetric": symmetric, "group_size": 32})
    save_quantized(model, tmp_path / "out", save_type=[fmt])
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    for name, fake in fakes(model).items():
        weight = loaded.get_submodule(name).dequantize_weight()
        assert torch.equal(weight.t().float(), fake.weight.half().float()), name
    with torch.no_grad():
        assert torch.allclose(loaded(IDS).logits, model(IDS).logits, atol=5e-3)


def test_export_command_converts_a_saved_output(tmp_path):
    from typer.testing import CliRunner

    from slimquant.cli import app

    model = quantized("llama", {"bits": 4, "symmetric": True, "group_size": 32})
    tiny_model("llama").save_pretrained(tmp_path / "float")
    save_quantized(model, tmp_path / "saved")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "saved"), "--to", "gptq", "--output",
                                      str(tmp_path / "gptq"), "--model", str(tmp_path / "float")])
    assert result.exit_code == 0, result.output
    tensors = load_file(str(tmp_path / "gptq" / "model.safetensors"))
    for name, fake in fakes(model).items():
        assert torch.equal(read_back(tensors, name, 4, False), fake.qweight.dequantize()), name
