"""Issue 31: bad inputs that gave raw exceptions, silent NaNs or misleading messages now get one clear line (exit 2)
as early as the input allows: non-finite saved tensors and weights, unbounded budgets, seeds and sample counts,
deep or duplicate-keyed recipes, broken GGUF and pickle models, a full disk, case-mistyped plugin names; and a
scheme's explicit arguments override its preset field by field."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml
from export_helpers import float_llama, rewrite_weights
from safetensors import SafetensorError
from tiny_models import tiny_model, token_samples
from tiny_tokenizer import build_tokenizer
from typer.testing import CliRunner

import slimquant
from slimquant import workflow
from slimquant.cli import app
from slimquant.config import Recipe
from slimquant.config.recipe import MAX_SAMPLES, UniqueKeyLoader
from slimquant.errors import ModelStructureError, NonFiniteError, OutputError, RecipeError
from slimquant.export import save_quantized, writers
from slimquant.export.problems import summarize
from slimquant.export.reader import QuantizedFiles
from slimquant.loader import load_quantized
from slimquant.model import checks
from slimquant.model.gguf_file import check_gguf_file
from slimquant.model.loading import load_config
from slimquant.plugins import plan_algorithms

runner = CliRunner()
UP = "model.layers.0.mlp.up_proj"


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    """The CLI's error, which must be one line."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("error:", "failed:"))]
    assert len(errors) == 1, result.output
    assert lines[-1] == errors[0], result.output  # nothing after it: not a second line of the same message
    return errors[0]


def save_model(model, path: Path) -> Path:
    model.config.bos_token_id, model.config.eos_token_id = 1, 2
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory) -> Path:
    return save_model(tiny_model("llama"), tmp_path_factory.mktemp("float"))


@pytest.fixture(scope="module")
def saved_output(float_dir, tmp_path_factory) -> Path:
    model = transformers.AutoModelForCausalLM.from_pretrained(float_dir)
    report = slimquant.quantize(model, {"scheme": "W8A16", "model": {"device": "cpu"}}, samples=token_samples(2, 16))
    out = tmp_path_factory.mktemp("saved") / "w8a16"
    save_quantized(model, out, linear_types=report.linear_types())
    return out


def poisoned_copy(saved_output: Path, tmp_path: Path, key: str = "model.norm.weight") -> Path:
    """The output with a NaN in one float tensor and its checksum recorded again, as a buggy writer would leave."""
    out = tmp_path / "poisoned"
    shutil.copytree(saved_output, out)

    def poison(t):
        t = t.clone()
        t.view(-1)[3] = float("nan")
        return t

    rewrite_weights(out, lambda tensors: {**tensors, key: poison(tensors[key])})
    return out


# -- item 6: a NaN in a saved float tensor ----------------------------------------------------------------------


def test_a_nan_in_a_saved_float_tensor_is_refused_on_load(saved_output, float_dir, tmp_path):
    out = poisoned_copy(saved_output, tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(float_dir)
    with pytest.raises(OutputError, match=r"tensor model\.norm\.weight holds NaN or Inf \(1 value\(s\)\) in weight "
                                          r"file .*quant_model_weight_w8a16\.safetensors"):
        load_quantized(model, out)


def test_eval_and_export_of_an_output_with_a_nan_fail_with_one_line(saved_output, float_dir, tmp_path):
    out = poisoned_copy(saved_output, tmp_path)
    result = run("eval", out, "--model", float_dir, "--kl-samples", 1)
    assert result.exit_code == 2, result.output
    assert "model.norm.weight holds NaN or Inf" in error_line(result)
    result = run("export", out, "--to", "safe_tensor", "-o", tmp_path / "exported", "--model", float_dir)
    assert result.exit_code == 2, result.output
    assert "model.norm.weight holds NaN or Inf" in error_line(result)
    assert not (tmp_path / "exported").exists()


# -- item 11: non-finite weights and buffers, found before any generation ---------------------------------------


def test_a_nan_weight_is_named_before_any_text_is_generated(tmp_path, monkeypatch):
    model = tiny_model("llama")
    with torch.no_grad():
        model.get_submodule(UP).weight[3, 5] = float("nan")
    model_dir = save_model(model, tmp_path / "nan-model")

    def never(*args, **kwargs):
        raise AssertionError("text was generated with a non-finite model")

    monkeypatch.setattr(workflow, "generate_samples", never)
    result = run("quantize", "--model", model_dir, "--num-samples", 1, "--seqlen", 8)  # KL samples, generated data
    assert result.exit_code == 2, result.output
    assert f"{UP}.weight holds 1 NaN/Inf" in error_line(result)


def test_a_nan_buffer_is_found_and_check_finite_false_is_honoured():
    model = tiny_model("llama")
    model.model.rotary_emb.inv_freq[0] = float("inf")  # a non-persistent buffer: not in the state dict
    with pytest.raises(NonFiniteError, match=r"model\.rotary_emb\.inv_freq holds 1 NaN/Inf"):
        slimquant.quantize(model, {"scheme": "W8A16", "calibration": {"num_samples": 1, "seqlen": 8}},
                           samples=token_samples(1))
    slimquant.quantize(model, {"scheme": "W8A16", "runtime": {"check_finite": False}})  # data-free: no forward


# -- raw exceptions: budgets, seeds, sample counts ----------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,message", [
    ("budget: {avg_bits: .inf, candidates: [{bits: 4}, {bits: 8}]}", "budget.avg_bits: Input should be a finite"),
    ("budget: {avg_bits: 1.0e+300, candidates: [{bits: 4}, {bits: 8}]}", "budget.avg_bits: Input should be less"),
    ('{"calibration": {"seed": 1e30}}', "calibration.seed"),
    ("calibration: {seed: 4294967296}", "calibration.seed: Input should be less than or equal to 4294967295"),
    ("calibration: {seed: -1}", "calibration.seed: Input should be greater than or equal to 0"),
    ('{"calibration": {"num_samples": 1e7}}', f"calibration.num_samples: Input should be less than or equal to "
                                              f"{MAX_SAMPLES}"),
])
def test_out_of_range_numbers_are_one_line_recipe_errors(tmp_path, float_dir, text, message):
    recipe = write(tmp_path / ("r.json" if text.startswith("{") else "r.yaml"), text)
    with pytest.raises(RecipeError, match=message) as info:
        Recipe.load(recipe)
    assert "\n" not in str(info.value)
    result = run("quantize", recipe, "--model", float_dir)
    assert result.exit_code == 2, result.output
    assert message.split(":")[0] in error_line(result)


def test_a_budget_with_every_linear_ignored_is_refused():
    recipe = {"budget": {"avg_bits": 6, "candidates": [{"bits": 4}, {"bits": 8}]}, "ignore": ["re:.*"]}
    with pytest.raises(RecipeError, match="budget: every Linear is ignored, nothing to budget"):
        slimquant.quantize(tiny_model("llama"), recipe, samples=token_samples(2))


def test_calibration_that_cannot_fit_in_memory_is_refused_before_loading(float_dir, monkeypatch):
    monkeypatch.setattr(checks, "physical_memory_bytes", lambda: 2**20)

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(workflow, "load_model", refuse)
    result = run("quantize", "--model", float_dir, "--num-samples", 64, "--seqlen", 64)
    assert result.exit_code == 2, result.output
    assert "64 x 64 = 4096 tokens would keep about" in error_line(result)


def test_more_windows_than_the_calibration_text_holds(float_dir, tmp_path):
    text = write(tmp_path / "calib.txt", "the cat sat on the mat " * 5)
    result = run("quantize", "--model", float_dir, "--calib-file", text, "--num-samples", 500, "--seqlen", 8,
                 "--kl-samples", 0)
    assert result.exit_code == 2, result.output
    assert "num_samples=500 asks for more windows of seqlen=8 tokens than its" in error_line(result)


# -- raw exceptions: deep nesting ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["deep.yaml", "deep.json"])
def test_deeply_nested_recipes_are_refused(tmp_path, name):
    recipe = write(tmp_path / name, '{"algorithms": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(RecipeError, match="nested too deeply"):
        Recipe.load(recipe)


def test_a_deeply_nested_description_is_refused(saved_output, tmp_path):
    out = tmp_path / "deep"
    shutil.copytree(saved_output, out)
    (description,) = out.glob("quant_model_description_*.json")
    description.write_text('{"slimquant": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(OutputError, match="nested too deeply"):
        QuantizedFiles(out)
    result = run("inspect", out)
    assert result.exit_code == 2 and "nested too deeply" in error_line(result)


# -- raw exceptions: broken GGUF files -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> Path:
    gguf = pytest.importorskip("gguf")
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.block_count", 1)
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    writer.add_tensor("token_embd.weight", np.ones((8, 16), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(16, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("keep", [10, 100, -1])
def test_a_truncated_gguf_is_named_before_transformers_reads_it(small_gguf, tmp_path, keep):
    check_gguf_file(small_gguf)  # the whole file passes
    data = small_gguf.read_bytes()
    broken = write_bytes(tmp_path / "broken.gguf", data[:keep])
    with pytest.raises(ModelStructureError, match=r"broken\.gguf is not a valid GGUF file \(truncated\?\)"):
        load_config(Recipe.parse({"model": {"path": str(broken)}}).model)


def test_a_gguf_without_its_suffix_is_still_read_as_gguf(small_gguf, tmp_path):
    broken = write_bytes(tmp_path / "model.weights", small_gguf.read_bytes()[:-8])
    with pytest.raises(ModelStructureError, match="is not a valid GGUF file") as info:
        load_config(Recipe.parse({"model": {"path": str(broken)}}).model)
    assert "JSON" not in str(info.value)


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- raw exceptions: a full disk -----------------------------------------------------------------------------------


def test_a_full_disk_during_save_names_the_file(tmp_path, monkeypatch):
    model = tiny_model("llama")
    report = slimquant.quantize(model, {"scheme": "W8A16"})

    def disk_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(writers, "save_file", disk_full)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match=r"cannot write .*quant_model_weight_w8a16\.safetensors: .*No space left"):
        save_quantized(model, out, linear_types=report.linear_types())
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary directory left either


# -- misleading messages ------------------------------------------------------------------------------------------


def test_an_algorithm_name_in_the_wrong_case_says_names_are_case_sensitive(float_dir):
    result = run("quantize", "--model", float_dir, "-a", "GPTQ")
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert "names are case-sensitive: did you mean 'gptq'?" in line and "pip install" not in line


def test_pickled_weights_are_refused_without_torchs_advice(float_dir, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(float_dir, folder)
    (folder / "model.safetensors").unlink()
    torch.save({"x": torch.ones(1)}, folder / "pytorch_model.bin")
    result = run("quantize", "--model", folder)
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert "pytorch_model.bin" in line and "slimquant does not load pickle" in line
    assert "weights_only" not in result.output


@pytest.mark.parametrize("name,text,message", [
    ("r.yaml", "scheme: W8A16\nignore: []\nscheme: W4A16\n", "key 'scheme' appears twice in one mapping "
                                                              r"\(lines 1 and 3\)"),
    ("r.yaml", "algorithms: [{name: minmax, name: gptq}]\n", "key 'name' appears twice"),
    ("r.json", '{"scheme": "W8A16", "scheme": "W4A16"}', "key 'scheme' appears twice in one object"),
])
def test_duplicate_keys_are_refused(tmp_path, name, text, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.load(write(tmp_path / name, text))


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    text = "base: &b {bits: 4, group_size: 64}\n"
    recipe = write(tmp_path / "r.yaml", text + "weights:\n  <<: *b\n  group_size: 32\n")
    assert yaml.load(recipe.read_text(), Loader=UniqueKeyLoader)["weights"] == {"bits": 4, "group_size": 32}


def test_a_recipe_error_is_one_line(tmp_path, float_dir):
    recipe = write(tmp_path / "r.yaml", "scheme: W9A16\nweights: {bits: 9}\n")
    with pytest.raises(RecipeError) as info:
        Recipe.load(recipe)
    assert "\n" not in str(info.value) and "2 problem(s): scheme:" in str(info.value)
    result = run("quantize", recipe, "--model", float_dir)
    assert result.exit_code == 2 and "weights.bits" in error_line(result)


def test_identical_problems_on_many_linears_are_counted_once():
    names = [f"model.layers.{i}.mlp.up_proj" for i in range(12)]
    problems = [f"{n}: scales are not float16" for n in names] + ["the model's KV cache is quantized"]
    line = summarize(problems, names)
    assert line == ("<Linear>: scales are not float16 (12 Linears: model.layers.0.mlp.up_proj, ...); "
                    "the model's KV cache is quantized")
    assert summarize([f"{names[10]}: odd"], names) == f"{names[10]}: odd"


def test_an_exporter_says_a_problem_once_with_its_count(tmp_path):
    pytest.importorskip("slimquant_gguf")
    model = float_llama()
    report = slimquant.quantize(model, {"scheme": "W8A8", "model": {"device": "cpu"}}, samples=token_samples(2, 16))
    with pytest.raises(OutputError) as info:
        save_quantized(model, tmp_path / "out", save_type=["gguf"], linear_types=report.linear_types())
    message = str(info.value)
    assert "\n" not in message and "Linears: model.layers.0." in message, message
    assert not (tmp_path / "out").exists()


# -- recipe semantics: explicit arguments override a preset field by field ----------------------------------------


def test_explicit_weights_keep_the_presets_other_fields():
    weights = Recipe.parse({"scheme": "W4A16", "weights": {"bits": 4, "group_size": 64}}).base_scheme().weights
    assert (weights.bits, weights.group_size, weights.symmetric) == (4, 64, False)
    per_channel = Recipe.parse({"scheme": "W4A16", "weights": {"strategy": "channel"}}).base_scheme().weights
    assert (per_channel.group_size, per_channel.symmetric) == (None, False)
    act = Recipe.parse({"scheme": "W8A8", "activations": {"symmetric": True}}).base_scheme().activations
    assert (act.bits, act.strategy, act.symmetric, act.dynamic) == (8, "tensor", True, False)


def test_override_weights_keep_the_fields_of_the_overrides_scheme():
    from slimquant.runtime.plan import override_scheme

    recipe = Recipe.parse({"scheme": "W8A16", "overrides": [
        {"targets": ["x"], "scheme": "W4A16", "weights": {"group_size": 32}}]})
    weights = override_scheme(recipe.base_scheme(), recipe.overrides[0]).weights
    assert (weights.bits, weights.group_size, weights.symmetric) == (4, 32, False)


def test_hqq_accepts_w4a16_with_an_explicit_group_size():
    plan_algorithms(Recipe.parse({"scheme": "W4A16", "weights": {"bits": 4, "group_size": 64},
                                  "algorithms": ["hqq"]}))


def test_the_plan_prints_the_resolved_scheme(float_dir, tmp_path):
    recipe = write(tmp_path / "r.yaml", "scheme: W4A16\nweights: {bits: 4, group_size: 16}\n")
    result = run("quantize", recipe, "--model", float_dir, "--kl-samples", 0)
    assert result.exit_code == 0, result.output
    assert "'symmetric': False" in result.output and "'group_size': 16" in result.output
