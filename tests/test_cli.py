"""The CLI's commands, help texts and exit codes (0 ok, 1 failure, 2 bad input)."""

import pytest
from typer.testing import CliRunner

from slimquant.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def quick(model_dir, calib, *extra):
    return run("quantize", "--model", model_dir, "--calib-file", calib, "--num-samples", 2, "--seqlen", 16,
               "--kl-samples", 1, *extra)


@pytest.mark.parametrize("command", ["quantize", "eval", "plugins", "inspect"])
def test_help_is_complete(command):
    """Every parameter of the command has a help text, and --help lists every one of them."""
    import typer.main

    params = typer.main.get_command(app).commands[command].params
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})  # option names are cut at 80 columns
    assert result.exit_code == 0
    for param in params:
        assert param.help, f"{command}: {param.name} has no help text"
        shown = max(param.opts, key=len) if param.param_type_name == "option" else param.name
        assert shown in result.output, f"{command} --help does not list {shown}"


def test_plugins_lists_minmax_with_its_roles():
    result = run("plugins")
    assert result.exit_code == 0
    [line] = [line for line in result.output.splitlines() if " minmax " in line]
    assert "weights, activations" in line and " no " in line


def test_quantize_a_local_model_end_to_end(tiny_model_dir, calib_text_file, tmp_path):
    result = quick(tiny_model_dir, calib_text_file, "--scheme", "W8A8", "--layer-report", tmp_path / "l.json")
    assert result.exit_code == 0, result.output
    assert "W8A8" in result.output and "top-1" in result.output
    assert (tmp_path / "l.json").exists()


@pytest.mark.parametrize("args,message", [
    (["--scheme", "W9A9"], "scheme"),
    (["--w-bits", "12"], "bits"),
    (["--group-size", "-5"], "group_size"),
    (["-a", "gtpq"], "gtpq"),
    (["--ignore", "model.layers.7.mlp.down_proj"], "matches no layer"),
    (["--device", "tpu"], "device"),
])
def test_bad_input_exits_2_with_a_message(tiny_model_dir, calib_text_file, args, message):
    result = quick(tiny_model_dir, calib_text_file, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_bad_recipe_file_and_missing_model(tmp_path, calib_text_file):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("scheme: W8A16\nalgorithms: [minmax]\ncalibraton: {}\n")
    result = run("quantize", recipe)
    assert result.exit_code == 2 and "calibraton" in result.output
    result = run("quantize", "--model", tmp_path / "nowhere", "--calib-file", calib_text_file)
    assert result.exit_code == 2 and "does not exist" in result.output


def test_empty_calibration_file_exits_2(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    result = quick(tiny_model_dir, empty)
    assert result.exit_code == 2 and "empty" in result.output


def test_existing_output_is_never_overwritten_without_the_flag(tiny_model_dir, calib_text_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.txt").write_text("precious")
    result = quick(tiny_model_dir, calib_text_file, "--output", out)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (out / "results.txt").read_text() == "precious"


def test_an_unexpected_failure_exits_1(tiny_model_dir, calib_text_file, monkeypatch):
    from slimquant.runtime import pipeline

    def boom(self, samples):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(pipeline.LayerwiseQuantizer, "run", boom)
    result = quick(tiny_model_dir, calib_text_file)
    assert result.exit_code == 1 and "disk on fire" in result.output


def test_quantize_save_inspect_and_eval_round_trip(tiny_model_dir, calib_text_file, tmp_path):
    out = tmp_path / "w4"
    result = quick(tiny_model_dir, calib_text_file, "--w-bits", 4, "--group-size", 48, "--output", out)
    assert result.exit_code == 0, result.output
    result = run("inspect", out, "--layers")
    assert result.exit_code == 0, result.output
    assert "W4A16" in result.output and "int4x2" in result.output and "48" in result.output
    report = tmp_path / "eval.json"
    result = run("eval", out, "--model", tiny_model_dir, "--text", calib_text_file, "--window", 32,
                 "--windows", 2, "--kl-samples", 1, "--layer-errors", "--report", report)
    assert result.exit_code == 0, result.output
    assert "perplexity (quantized)" in result.output and report.exists()
    assert (tmp_path / "eval.layers.json").exists()


def test_inspect_and_eval_refuse_what_is_not_an_output(tmp_path):
    result = run("inspect", tmp_path / "missing")
    assert result.exit_code == 2 and "missing" in result.output
    (tmp_path / "junk").mkdir()
    result = run("inspect", tmp_path / "junk")
    assert result.exit_code == 2 and "quant_model_description" in result.output
    result = run("eval", tmp_path / "missing")
    assert result.exit_code == 2 and "no saved output" in result.output
