"""Hostile or broken saved outputs: every bad input is an OutputError naming the file, tensor, Linear or field.

The architecture the output was saved from, the description's schema, the description against the tensors,
checksums (required unless verify=False) and weight-file names (plain names inside the output directory).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from export_helpers import base_model, description, float_llama, logits, rewrite_weights, saved
from rich.console import Console
from tiny_models import tiny_model, token_samples
from typer.testing import CliRunner

import slimquant
from slimquant.cli import app
from slimquant.errors import OutputError
from slimquant.export import reader, save_quantized
from slimquant.export.names import sha256_file
from slimquant.export.reader import QuantizedFiles
from slimquant.inspect_output import describe
from slimquant.loader import load_quantized

DOWN = "model.layers.0.mlp.down_proj"
O_PROJ = "model.layers.0.self_attn.o_proj"
SHARD_GIB = 40e3 / 1024**3


@pytest.fixture(scope="module")
def float_model():
    return base_model()


def edit_description(out: Path, mutate) -> None:
    (path,) = out.glob("quant_model_description_*.json")
    desc = json.loads(path.read_text())
    mutate(desc)
    path.write_text(json.dumps(desc))


def edit_linear(out: Path, name: str, mutate) -> None:
    edit_description(out, lambda desc: mutate(desc["slimquant"]["linears"][name]))


def add_tensor(out: Path, key: str, tensor: torch.Tensor, kind: str) -> None:
    rewrite_weights(out, lambda t: {**t, key: tensor})
    edit_description(out, lambda desc: desc.update({key: kind}))


def drop_tensor(out: Path, key: str) -> None:
    rewrite_weights(out, lambda t: {k: v for k, v in t.items() if k != key})
    edit_description(out, lambda desc: desc.pop(key))


def change_tensor(out: Path, key: str, change) -> None:
    rewrite_weights(out, lambda t: {**t, key: change(t[key])})


def record_checksum(out: Path, path: Path) -> None:
    """What a careful attacker does after editing a file: record its new sha256."""
    edit_description(out, lambda desc: desc["slimquant"]["files"].update({path.name: sha256_file(path)}))


def quantized_tiny(arch_model: torch.nn.Module, scheme: str = "W8A16") -> torch.nn.Module:
    model = copy.deepcopy(arch_model)
    slimquant.quantize(model, {"scheme": scheme, "model": {"device": "cpu"}, "runtime": {"progress": False}},
                       samples=token_samples(2, 16))
    return model


# -- 1. the architecture the output was saved from -------------------------------------------------------------


def test_description_records_the_architecture_and_every_model_tensor(float_model, tmp_path):
    _, out = saved(float_model, "W8A8", tmp_path)
    meta = description(out)["slimquant"]
    assert (meta["format"], meta["model_type"], meta["architectures"]) == (2, "llama", None)
    assert sorted(meta["float_tensors"]) == sorted(float_model.state_dict())
    named = float_llama(attention_bias=False, mlp_bias=False)
    named.config.architectures = ["LlamaForCausalLM"]
    save_quantized(quantized_tiny(named), tmp_path / "named")
    assert description(tmp_path / "named")["slimquant"]["architectures"] == ["LlamaForCausalLM"]
    other = float_llama(attention_bias=False, mlp_bias=False)
    other.config.architectures = ["LlamaForSequenceClassification"]
    with pytest.raises(OutputError, match="saved from LlamaForCausalLM, but this model is "
                                          "LlamaForSequenceClassification"):
        load_quantized(other, tmp_path / "named")


def test_an_output_of_another_architecture_with_the_same_shapes_is_refused(tmp_path):
    llama, qwen2 = tiny_model("llama"), tiny_model("qwen2")
    llama_shapes = {k: v.shape for k, v in llama.state_dict().items()}
    assert all(qwen2.state_dict()[k].shape == shape for k, shape in llama_shapes.items())  # only biases differ
    save_quantized(quantized_tiny(llama), tmp_path / "o")
    with pytest.raises(OutputError, match="saved from a 'llama' model, but this model is a 'qwen2' model"):
        load_quantized(qwen2, tmp_path / "o")


def test_a_bias_the_output_saved_without_is_refused(tmp_path):
    save_quantized(quantized_tiny(float_llama(attention_bias=False, mlp_bias=False)), tmp_path / "o")
    biased = float_llama(attention_bias=True, mlp_bias=False)
    with pytest.raises(OutputError, match=r"model\.layers\.0\.self_attn\.q_proj: the model's Linear has a bias, "
                                          r"but the output saved it without one"):
        load_quantized(biased, tmp_path / "o")


def test_model_tensors_the_output_neither_holds_nor_quantizes_are_refused(float_model, tmp_path):
    _, out = saved(float_model, "W8A8", tmp_path)
    model = copy.deepcopy(float_model)
    model.get_submodule(DOWN).register_buffer("lora_scale", torch.ones(1))
    with pytest.raises(OutputError, match=rf"neither holds nor quantizes: {DOWN}\.lora_scale"):
        load_quantized(model, out)


@pytest.mark.parametrize("version", [1, 3, "2", True, None])
def test_other_format_versions_are_refused_with_a_hint_to_re_save(float_model, tmp_path, version):
    _, out = saved(float_model, "W8A8", tmp_path)
    edit_description(out, lambda desc: desc["slimquant"].update(format=version))
    with pytest.raises(OutputError, match=rf"output format {version!r}, but this slimquant reads format 2 .*re-save"):
        load_quantized(copy.deepcopy(float_model), out)


# -- 2. the description's schema ---------------------------------------------------------------------------------


def _set(**fields):
    return lambda linear: linear.update(fields)


def _delete(field):
    return lambda linear: linear.pop(field)


SCHEMA_CASES = {
    "missing key": (_delete("bits"), "field bits: Field required"),
    "string for an int": (_set(bits="8"), "field bits: Input should be a valid integer"),
    "float for an int": (_set(in_features=80.0), "field in_features: Input should be a valid integer"),
    "bits above 8": (_set(bits=9), "field bits: Input should be less than or equal to 8"),
    "bits 0": (_set(bits=0), "field bits: Input should be greater than or equal to 1"),
    "negative group size": (_set(group_size=-1), "field group_size: Input should be greater than or equal to 0"),
    "zero in_features": (_set(in_features=0), "field in_features: Input should be greater than 0"),
    "string for a bool": (_set(symmetric="yes"), "field symmetric: Input should be a valid boolean"),
    "unknown key": (_set(scale=1.0), "field scale: Extra inputs are not permitted"),
    "unknown packing": (_set(pack="int3x3"), "field pack: Input should be 'int4x2'"),
    "packing 8-bit codes": (_set(pack="int4x2"), "field pack: int4x2 holds codes of at most 4 bits, but bits is 8"),
    "groups disagree": (_set(groups=2), "field groups: 2, but in_features 80"),
    "string for the act dict": (_set(act="static"), "field act: Input should be a valid dictionary"),
    "act without bits": (lambda linear: linear["act"].pop("bits"), "field act.bits: Field required"),
    "static act without granularity": (lambda linear: linear["act"].pop("per_channel"),
                                       "field act: static activations .* need per_channel"),
    "extra tensor name with a dot": (_set(extras=["a.b"]), r"field extras\.0: String should match pattern"),
    "extra named like a standard tensor": (_set(extras=["weight"]), "field extras: names must be unique"),
    "int kernel flag wrong": (_set(int_kernel=False), "field int_kernel: must be true"),
}


@pytest.mark.parametrize("case", list(SCHEMA_CASES))
def test_malformed_linear_metadata_names_the_linear_and_field(float_model, tmp_path, case):
    mutate, message = SCHEMA_CASES[case]
    _, out = saved(float_model, "W8A8", tmp_path)
    edit_linear(out, DOWN, mutate)
    expected = rf"quant_model_description_w8a8\.json: invalid slimquant metadata: Linear {DOWN}[:,] .*{message}"
    with pytest.raises(OutputError, match=expected):
        load_quantized(copy.deepcopy(float_model), out)
    with pytest.raises(OutputError, match=expected):
        describe(out, Console(quiet=True))


@pytest.mark.parametrize("mutate,message", [
    (lambda meta: meta.update(linears={DOWN: "W8A8"}), rf"Linear {DOWN}: Input should be a valid dictionary"),
    (lambda meta: meta.update(linears=[]), "field linears: Input should be a valid dictionary"),
    (lambda meta: meta.update(tied=["lm_head.weight"]), "field tied: Input should be a valid dictionary"),
    (lambda meta: meta.update(tied={"x": "model.embed_tokens.weight"}), "field tied: x -> .* float_tensors lacks"),
    (lambda meta: meta.pop("float_tensors"), "field float_tensors: Field required"),
    (lambda meta: meta["linears"][DOWN].update(bias=False),
     rf"field float_tensors: holds {DOWN}\.bias, but Linear {DOWN} has bias: false"),
    (lambda meta: meta.update(model_type=7), "field model_type: Input should be a valid string"),
    (lambda meta: meta.update(files={"a.safetensors": "not a sha"}), r"field files\.a\.safetensors: String should"),
])
def test_malformed_output_metadata_names_the_field(float_model, tmp_path, mutate, message):
    _, out = saved(float_model, "W8A8", tmp_path)
    edit_description(out, lambda desc: mutate(desc["slimquant"]))
    with pytest.raises(OutputError, match=f"invalid slimquant metadata: .*{message}"):
        load_quantized(copy.deepcopy(float_model), out)


def test_cli_inspect_and_eval_report_malformed_metadata_as_bad_input(float_model, tiny_model_dir, tmp_path):
    _, out = saved(float_model, "W8A8", tmp_path)
    edit_linear(out, DOWN, _set(act="static"))
    runner = CliRunner()
    for args in (["inspect", str(out)], ["eval", str(out), "--model", str(tiny_model_dir), "--kl-samples", "0"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert f"Linear {DOWN}, field act" in result.output


# -- 2. the description against the tensors ----------------------------------------------------------------------


TENSOR_CASES = {
    "bits 16 on int4-packed codes": ("W4A16", lambda out: edit_linear(out, DOWN, _set(bits=16)),
                                     rf"Linear {DOWN}, field bits: Input should be less than or equal to 8"),
    "bits 2 on 4-bit codes": ("W4A16", lambda out: edit_linear(out, DOWN, _set(bits=2)),
                              rf"tensor {DOWN}\.weight holds codes in \[-8, 7\], outside the 2-bit range \[-2, 1\]"),
    "packed codes as int8": ("W4A16", lambda out: change_tensor(out, f"{DOWN}.weight", lambda t: t.to(torch.int8)),
                             rf"tensor {DOWN}\.weight has dtype torch\.int8, expected torch\.uint8"),
    "codes as float": ("W8A8", lambda out: change_tensor(out, f"{DOWN}.weight", lambda t: t.float()),
                       rf"tensor {DOWN}\.weight has dtype torch\.float32, expected torch\.int8"),
    "integer scales": ("W8A8", lambda out: change_tensor(out, f"{DOWN}.weight_scale", lambda t: t.to(torch.int32)),
                       rf"tensor {DOWN}\.weight_scale has dtype torch\.int32, expected a floating-point type"),
    "NaN scale": ("W4A16", lambda out: change_tensor(out, f"{DOWN}.weight_scale", lambda t: t * torch.nan),
                  rf"tensor {DOWN}\.weight_scale holds NaN or Inf"),
    "symmetric with offsets": ("W4A16", lambda out: edit_linear(out, DOWN, _set(symmetric=True)),
                               rf"{DOWN}: the description says symmetric: true, but tensor {DOWN}\.weight_offset "
                               "holds non-zero offsets"),
    "asymmetric without offsets": ("W4A16", lambda out: drop_tensor(out, f"{DOWN}.weight_offset"),
                                   rf"{DOWN}: asymmetric weights \(symmetric: false\) need tensor "
                                   rf"{DOWN}\.weight_offset, which the output lacks"),
    "g_idx flag without tensor": ("W4A16", lambda out: edit_linear(out, DOWN, _set(g_idx=True)),
                                  rf"permuted groups \(g_idx: true\) need tensor {DOWN}\.g_idx"),
    "g_idx out of range": ("W4A16", lambda out: (add_tensor(out, f"{DOWN}.g_idx",
                                                            torch.full((80,), 3, dtype=torch.int32), "W4A16"),
                                                 edit_linear(out, DOWN, _set(g_idx=True))),
                           rf"tensor {DOWN}\.g_idx names groups in \[3, 3\], outside \[0, 2\]"),
    "g_idx as float": ("W4A16", lambda out: (add_tensor(out, f"{DOWN}.g_idx", torch.zeros(80), "W4A16"),
                                             edit_linear(out, DOWN, _set(g_idx=True))),
                       rf"tensor {DOWN}\.g_idx has dtype torch\.float32, expected torch\.int32"),
    "g_idx of the wrong length": ("W4A16", lambda out: (add_tensor(out, f"{DOWN}.g_idx",
                                                                   torch.zeros(81, dtype=torch.int32), "W4A16"),
                                                        edit_linear(out, DOWN, _set(g_idx=True))),
                                  rf"tensor {DOWN}\.g_idx has shape \[81\], expected \[80\]"),
    "tensor the metadata does not account for": ("W4A16", lambda out: add_tensor(
        out, f"{DOWN}.g_idx", torch.zeros(80, dtype=torch.int32), "W4A16"),
        rf"{DOWN}: the output holds {DOWN}\.g_idx, which the description of this Linear does not account for"),
    "static act without input_scale": ("W8A8", lambda out: drop_tensor(out, f"{DOWN}.input_scale"),
                                       rf"static activations \(dynamic: false\) need tensor {DOWN}\.input_scale"),
    "static act without input_offset": ("W8A8", lambda out: drop_tensor(out, f"{DOWN}.input_offset"),
                                        rf"static activations \(dynamic: false\) need tensor {DOWN}\.input_offset"),
    "symmetric act with offsets": ("W8A8", lambda out: edit_linear(out, DOWN, lambda m: m["act"].update(
        symmetric=True)), rf"symmetric activations, but tensor {DOWN}\.input_offset holds non-zero offsets"),
    "per-tensor act with per-channel scales": ("mixed", lambda out: edit_linear(out, O_PROJ, lambda m: m.update(
        int_kernel=True, act={**m["act"], "per_channel": False})),
        rf"tensor {O_PROJ}\.input_scale has shape \[48\], expected \[1\]"),
    "tampered quant_bias": ("W8A8", lambda out: change_tensor(out, f"{DOWN}.quant_bias", lambda t: t + 1),
                            rf"tensor {DOWN}\.quant_bias differs"),
    "tampered deq_scale": ("W8A8", lambda out: change_tensor(out, f"{DOWN}.deq_scale", lambda t: t * 2),
                           rf"tensor {DOWN}\.deq_scale differs"),
    "quantized tensor typed FLOAT": ("W8A8", lambda out: edit_description(out, lambda d: d.update(
        {f"{DOWN}.weight": "FLOAT"})), rf"tensor {DOWN}\.weight is typed 'FLOAT', expected 'W8A8'"),
    "type that is not a string": ("W8A8", lambda out: edit_description(out, lambda d: d.update(
        {"model.norm.weight": 5})), r"tensor model\.norm\.weight is typed 5, expected 'FLOAT'"),
    "untyped tensor in the file": ("W8A8", lambda out: rewrite_weights(out, lambda t: {**t, "x.y": torch.ones(1)}),
                                   r"hold 1 tensor\(s\) the description does not type: x\.y"),
}


@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_description_and_tensors_must_agree(float_model, tmp_path, case):
    kind, tamper, message = TENSOR_CASES[case]
    _, out = saved(float_model, kind, tmp_path)
    tamper(out)
    with pytest.raises(OutputError, match=message):
        load_quantized(copy.deepcopy(float_model), out)
    with pytest.raises(OutputError, match=message):
        describe(out, Console(quiet=True))


# -- 3. checksums are required unless the caller opts out --------------------------------------------------------


@pytest.mark.parametrize("remove", [lambda meta: meta.update(files={}), lambda meta: meta.pop("files")])
def test_missing_checksums_are_refused_unless_verify_is_off(float_model, tmp_path, remove):
    model, out = saved(float_model, "W8A8", tmp_path)
    edit_description(out, lambda desc: remove(desc["slimquant"]))
    message = (r"weight file quant_model_weight_w8a8\.safetensors: its sha256 checksum is missing .*"
               r"load_quantized\(model, dir, verify=False\)")
    with pytest.raises(OutputError, match=message):
        load_quantized(copy.deepcopy(float_model), out)
    with pytest.raises(OutputError, match=message):
        describe(out, Console(quiet=True))
    assert torch.equal(logits(load_quantized(copy.deepcopy(float_model), out, verify=False)), logits(model))
    assert "model.norm.weight" in QuantizedFiles(out, verify=False)
    assert describe(out, Console(quiet=True), verify=False)["linears"] == 14


def test_a_missing_index_checksum_is_refused(float_model, tmp_path):
    _, out = saved(float_model, "W8A8", tmp_path, part_file_size=SHARD_GIB)
    index = "quant_model_weight_w8a8.safetensors.index.json"
    edit_description(out, lambda desc: desc["slimquant"]["files"].pop(index))
    with pytest.raises(OutputError, match=rf"{index}: its sha256 checksum is missing"):
        load_quantized(copy.deepcopy(float_model), out)


def test_a_changed_index_fails_its_checksum(float_model, tmp_path):
    _, out = saved(float_model, "W8A8", tmp_path, part_file_size=SHARD_GIB)
    index = out / "quant_model_weight_w8a8.safetensors.index.json"
    index.write_text(index.read_text() + " ")
    with pytest.raises(OutputError, match=f"{index.name} is corrupt"):
        load_quantized(copy.deepcopy(float_model), out)


# -- 4. weight-file names stay inside the output directory -------------------------------------------------------


@pytest.mark.parametrize("name", ["../x.safetensors", "../../x.safetensors", "sub/x.safetensors", "..\\x.safetensors",
                                  "ABSOLUTE", "", ".", ".."])
@pytest.mark.parametrize("verify", [True, False])
def test_index_entries_outside_the_directory_are_refused_before_opening_anything(float_model, tmp_path,
                                                                                  monkeypatch, name, verify):
    _, out = saved(float_model, "W8A8", tmp_path, part_file_size=SHARD_GIB)
    first = sorted(out.glob("quant_model_weight_w8a8-*.safetensors"))[0]
    outside = tmp_path / "x.safetensors"
    shutil.copy(first, outside)  # a readable file that an unchecked loader would open and parse
    (out / "sub").mkdir()
    shutil.copy(first, out / "sub" / "x.safetensors")
    name = str(outside) if name == "ABSOLUTE" else name
    index = out / "quant_model_weight_w8a8.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: name if f == first.name else f for k, f in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    record_checksum(out, index)
    opened = []
    real_open = reader.safe_open
    monkeypatch.setattr(reader, "safe_open", lambda path, **kw: opened.append(path) or real_open(path, **kw))
    with pytest.raises(OutputError, match=re.escape(f"weight file {name!r} is not a plain file name")):
        load_quantized(copy.deepcopy(float_model), out, verify=verify)
    assert opened == []


@pytest.mark.parametrize("name", ["../x.safetensors", "/tmp/x.safetensors", "sub/x", ""])
def test_checksum_entries_must_be_plain_file_names(float_model, tmp_path, name):
    _, out = saved(float_model, "W8A8", tmp_path)
    edit_description(out, lambda desc: desc["slimquant"]["files"].update({name: "0" * 64}))
    with pytest.raises(OutputError, match=r"field files: .* is not a plain file name inside the output directory"):
        load_quantized(copy.deepcopy(float_model), out, verify=False)


def test_a_valid_output_still_loads_and_inspects(float_model, tmp_path):
    model, out = saved(float_model, "mixed", tmp_path, part_file_size=SHARD_GIB)
    assert describe(out, Console(quiet=True))["model_type"] == "llama"
    assert torch.equal(logits(load_quantized(copy.deepcopy(float_model), out)), logits(model))
