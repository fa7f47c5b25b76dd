"""Checks that need only the recipe, the formats and the model's configuration run before any weight is read:
the model is never loaded for a run that would be refused (issue 31, items 9 and 10)."""

from __future__ import annotations

import pytest
from tiny_tokenizer import build_tokenizer
from typer.testing import CliRunner

from slimquant.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any weight read fails the test: the refusal must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model's weights were loaded before the refusal")

    for module in ("slimquant.workflow", "slimquant.evaluate", "slimquant.export.convert"):
        monkeypatch.setattr(f"{module}.load_model", refuse)


def quantize(model_dir, calib, *extra):
    return run("quantize", "--model", model_dir, "--calib-file", calib, "--num-samples", 2, "--seqlen", 16,
               "--kl-samples", 0, *extra)


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error:"), result.output
    return lines[-1]


def test_format_that_cannot_hold_the_scheme_is_refused_before_loading(tiny_model_dir, calib_text_file, tmp_path,
                                                                       no_model_loading):
    out = tmp_path / "out"
    result = quantize(tiny_model_dir, calib_text_file, "--scheme", "W8A8", "--format", "gguf", "-o", out)
    assert "gguf" in one_line_error(result) and "activations" in result.output
    assert not out.exists() and not (tmp_path / "out.checkpoint").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.fixture
def narrow_model_dir(tmp_path):
    """A Llama whose Linears read 48 channels: not whole 32-weight gguf blocks."""
    import transformers

    from slimquant.testing.models import VOCAB

    path = tmp_path / "narrow-model"
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def test_per_linear_format_check_uses_the_real_shapes_before_loading(narrow_model_dir, tmp_path, no_model_loading):
    out = tmp_path / "out"
    result = run("quantize", "--model", narrow_model_dir, "--scheme", "W4A16", "--w-sym", "--group-size", 32,
                 "--format", "gguf", "-o", out)
    line = one_line_error(result)
    assert "48 input channels" in line and "Linears" in line  # one line for every Linear with that problem
    assert not out.exists() and not (tmp_path / "out.checkpoint").exists()


@pytest.mark.parametrize("extra,message", [
    (["--ignore", "model.layers.0.mlp.no_such_proj"], "matches no layer"),
    (["--scheme", "W4A16", "--group-size", 4096], "larger than"),
])
def test_structure_checks_run_before_loading(tiny_model_dir, calib_text_file, tmp_path, no_model_loading, extra,
                                             message):
    result = quantize(tiny_model_dir, calib_text_file, *extra, "-o", tmp_path / "out")
    assert message in one_line_error(result)
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("budget,message", [
    ("budget: {avg_bits: 4.5, candidates: [{bits: 4, group_size: 16}, {bits: 8}]}", "below the smallest"),
    ("budget: {avg_bits: 6, candidates: [{bits: 4}, {bits: 8}]}\nignore: ['re:.*']", "every Linear is ignored"),
])
def test_impossible_budget_is_refused_before_loading(tiny_model_dir, calib_text_file, tmp_path, no_model_loading,
                                                     budget, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"algorithms: [minmax]\n{budget}\n")
    result = run("quantize", recipe, "--model", tiny_model_dir, "--calib-file", calib_text_file, "--num-samples", 2,
                 "--seqlen", 16, "--kl-samples", 0)
    assert message in one_line_error(result)


def test_budget_candidate_a_format_cannot_hold_is_refused_before_loading(tiny_model_dir, calib_text_file, tmp_path,
                                                                         no_model_loading):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("algorithms: [minmax]\nweights: {bits: 4, group_size: 32, symmetric: true, "
                      "scale_dtype: float16}\nbudget: {avg_bits: 5, candidates: [{bits: 4, group_size: 32, "
                      "symmetric: true, scale_dtype: float16}, {bits: 6, scale_dtype: float16}]}\n")
    result = run("quantize", recipe, "--model", tiny_model_dir, "--calib-file", calib_text_file, "--num-samples", 2,
                 "--seqlen", 16, "--kl-samples", 0, "--format", "gguf", "-o", tmp_path / "out")
    line = one_line_error(result)
    assert "budget.candidates[1]" in line and "gguf" in line


@pytest.fixture
def saved_output(tiny_model_dir, tmp_path):
    out = tmp_path / "saved"
    result = run("quantize", "--model", tiny_model_dir, "--scheme", "W8A16", "-o", out)
    assert result.exit_code == 0, result.output
    return out


def _truncate_weights(output):
    (weights,) = output.glob("*.safetensors")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def test_truncated_output_is_refused_before_export_loads_the_model(saved_output, tiny_model_dir, tmp_path,
                                                                   no_model_loading):
    _truncate_weights(saved_output)
    result = run("export", saved_output, "--to", "compressed-tensors", "-o", tmp_path / "ct", "--model",
                 tiny_model_dir)
    assert "corrupt or truncated" in one_line_error(result)
    assert not (tmp_path / "ct").exists()


def test_truncated_output_is_refused_before_eval_loads_the_model(saved_output, tiny_model_dir, no_model_loading):
    _truncate_weights(saved_output)
    result = run("eval", saved_output, "--model", tiny_model_dir, "--kl-samples", 0)
    assert "corrupt or truncated" in one_line_error(result)


@pytest.fixture
def other_model_dir(tmp_path):
    from tiny_models import tiny_model

    path = tmp_path / "other-model"
    model = tiny_model("qwen2")
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("command", ["export", "eval"])
def test_output_onto_another_models_config_is_refused_before_loading(saved_output, other_model_dir, tmp_path,
                                                                     no_model_loading, command):
    if command == "export":
        result = run("export", saved_output, "--to", "compressed-tensors", "-o", tmp_path / "ct", "--model",
                     other_model_dir)
    else:
        result = run("eval", saved_output, "--model", other_model_dir, "--kl-samples", 0)
    assert "llama" in one_line_error(result)


def test_format_gives_its_scale_dtype_to_a_recipe_that_names_none(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    result = run("quantize", "--model", tiny_model_dir, "--scheme", "W4A16", "--w-sym", "--group-size", 32,
                 "--format", "gguf", "-o", out)
    assert result.exit_code == 0, result.output
    assert "scale_dtype float16: gguf stores float16 scales" in result.output
    assert list(out.glob("*.gguf"))


def test_a_named_scale_dtype_is_kept_and_refused_by_the_format(tiny_model_dir, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("scheme: W4A16\nweights: {symmetric: true, group_size: 32, scale_dtype: float32}\n")
    result = run("quantize", recipe, "--model", tiny_model_dir, "--format", "gguf", "-o", tmp_path / "out")
    assert "scale_dtype" in one_line_error(result)


def test_cli_weight_flags_override_the_preset_field_by_field(tiny_model_dir, tmp_path):
    result = run("quantize", "--model", tiny_model_dir, "--scheme", "W4A16", "--group-size", 32)
    assert result.exit_code == 0, result.output
    plan = " ".join(result.output.split())
    assert "'symmetric': False" in plan and "'group_size': 32" in plan
