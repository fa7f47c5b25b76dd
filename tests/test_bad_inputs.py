"""Bad input, as a hostile but realistic user gives it: a clear one-line error and exit 2, before the model is loaded
wherever the input allows, and nothing written."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from tiny_models import VOCAB, tiny_model, token_samples
from tiny_tokenizer import build_tokenizer
from typer.testing import CliRunner

import slimquant
from slimquant.cli import app
from slimquant.errors import CalibrationError, ModelStructureError, NonFiniteError, OutputError, RecipeError

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def quick(model_dir, calib, *extra):
    return run("quantize", "--model", model_dir, "--calib-file", calib, "--num-samples", 2, "--seqlen", 16,
               "--kl-samples", 1, *extra)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the job gets as far as loading the model."""
    from slimquant import workflow

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(workflow, "load_model", refuse)
    monkeypatch.setattr(workflow, "load_config", refuse)


def nothing_written(directory: Path, before: set[str]) -> bool:
    return {p.name for p in directory.iterdir()} == before


# -- the CLI, before the model is loaded --------------------------------------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["--num-samples", 0], "num_samples"),
    (["--seqlen", 0], "seqlen"),
    (["--num-samples", -3], "num_samples"),
    (["--group-size", -1], "group_size"),
    (["--save-type", "onnx", "--output", "OUT"], "onnx"),
    (["--part-file-size", -1, "--output", "OUT"], "part_file_size"),
    (["--eval-text", "MISSING"], "evaluation text file"),
    (["--eval-text", "CALIB", "--eval-window", 1], "--eval-window"),
    (["--eval-windows", 0], "--eval-windows"),
    (["--layer-report", "DIR"], "is a directory"),
    (["-a", "safe_tensor"], "output format, not an algorithm"),
    (["-a", "ascend"], "unknown algorithm 'ascend'"),
])
def test_job_arguments_are_refused_before_the_model_is_loaded(tiny_model_dir, calib_text_file, tmp_path,
                                                               no_model_load, args, message):
    substitutes = {"OUT": tmp_path / "out", "MISSING": tmp_path / "missing.txt", "CALIB": calib_text_file,
                   "DIR": tmp_path}
    before = {p.name for p in tmp_path.iterdir()}
    result = quick(tiny_model_dir, calib_text_file, *[substitutes.get(a, a) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "calibration file" not in result.output or "MISSING" not in args
    assert nothing_written(tmp_path, before)


def test_output_that_cannot_be_written_is_refused_first(tiny_model_dir, calib_text_file, tmp_path, no_model_load,
                                                        monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    result = quick(tiny_model_dir, calib_text_file, "--output", a_file)
    assert result.exit_code == 2 and "not a directory" in result.output
    result = quick(tiny_model_dir, calib_text_file, "--output", a_file / "sub" / "out")
    assert result.exit_code == 2 and "is a file" in result.output

    real_access = os.access
    read_only = tmp_path / "ro"
    read_only.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == read_only else real_access(p, mode))
    result = quick(tiny_model_dir, calib_text_file, "--output", read_only / "out")
    assert result.exit_code == 2 and "not writable" in result.output
    assert list(read_only.iterdir()) == []


def test_a_missing_output_parent_is_created(tiny_model_dir, calib_text_file, tmp_path):
    out = tmp_path / "new" / "deeper" / "out"
    result = quick(tiny_model_dir, calib_text_file, "--output", out)
    assert result.exit_code == 0, result.output
    assert any(out.glob("quant_model_description*.json"))


def test_group_size_of_zero_on_the_cli_means_per_channel(tiny_model_dir, calib_text_file):
    result = quick(tiny_model_dir, calib_text_file, "--w-bits", 4, "--group-size", 0)
    assert result.exit_code == 0, result.output
    assert "'strategy': 'channel'" in result.output


@pytest.mark.parametrize("group", [0, -1])
def test_non_positive_group_size_in_a_recipe_file_is_an_error(tmp_path, group):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"weights: {{bits: 4, group_size: {group}}}\n")
    result = run("quantize", recipe)
    assert result.exit_code == 2 and "group_size must be a positive integer" in result.output


def test_missing_calibration_file_names_the_calibration_file(tiny_model_dir, tmp_path, no_model_load):
    result = quick(tiny_model_dir, tmp_path / "nope.txt")
    assert result.exit_code == 2 and "calibration file" in result.output


# -- the model ----------------------------------------------------------------------------------------------------


def _save(model, path: Path, tokenizer: bool = True) -> Path:
    model.save_pretrained(path)
    if tokenizer:
        build_tokenizer().save_pretrained(path)
    return path


def _bert_config():
    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=128, max_position_embeddings=128)


@pytest.mark.parametrize("cls", ["BertForMaskedLM", "BertModel"])
def test_encoder_models_are_not_causal_lms(tmp_path, calib_text_file, cls):
    model = getattr(transformers, cls)(_bert_config())
    path = _save(model, tmp_path / cls)
    before = {p.name for p in tmp_path.iterdir()}
    result = quick(path, calib_text_file, "--output", tmp_path / "out")
    assert result.exit_code == 2 and "encoder" in result.output
    assert nothing_written(tmp_path, before)
    with pytest.raises(ModelStructureError, match="encoder"):
        slimquant.quantize(model, {"scheme": "W8A16"}, samples=token_samples(1))


def test_a_checkpoint_without_its_lm_head_is_refused(tmp_path, calib_text_file):
    bare = tiny_model("llama").model  # LlamaModel: no lm_head, so AutoModelForCausalLM would invent one
    path = _save(bare, tmp_path / "bare")
    result = quick(path, calib_text_file)
    assert result.exit_code == 2 and "lm_head.weight" in result.output and "random" in result.output


def test_a_model_without_a_head_is_refused_by_the_api():
    with pytest.raises(ModelStructureError, match="head"):
        slimquant.quantize(tiny_model("llama").model, {"scheme": "W8A16"}, samples=token_samples(1))


def test_model_folder_without_tokenizer_files(tmp_path, calib_text_file, no_model_load):
    path = _save(tiny_model("llama"), tmp_path / "no-tokenizer", tokenizer=False)
    result = quick(path, calib_text_file)
    assert result.exit_code == 2 and "no tokenizer files" in result.output
    assert "sentencepiece" not in result.output


def test_seqlen_beyond_the_models_positions(tmp_path, calib_text_file):
    path = _save(tiny_model("gpt2"), tmp_path / "gpt2")  # 128 positions
    result = run("quantize", "--model", path, "--calib-file", calib_text_file, "--num-samples", 1, "--seqlen", 200,
                 "--kl-samples", 0)
    assert result.exit_code == 2 and "128 positions" in result.output


def test_trust_remote_code_is_shown_in_the_plan(tiny_model_dir, calib_text_file, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {trust_remote_code: true}\nscheme: W8A16\n")
    result = quick(tiny_model_dir, calib_text_file, "--kl-samples", 0)
    assert "trust_remote_code" not in result.output
    result = run("quantize", recipe, "--model", tiny_model_dir, "--calib-file", calib_text_file, "--num-samples", 1,
                 "--seqlen", 8, "--kl-samples", 0)
    assert result.exit_code == 0, result.output
    assert "trust_remote_code" in result.output and "code will run" in result.output


def test_a_nan_in_a_tensor_calibration_never_reaches_is_refused():
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight[3, 5] = float("nan")
    with pytest.raises(NonFiniteError, match="lm_head.weight"):
        slimquant.quantize(model, {"scheme": "W8A16"}, samples=token_samples(1))


def test_an_explicit_group_wider_than_a_linear_is_refused():
    with pytest.raises(RecipeError, match="group_size=256 is larger than"):
        slimquant.quantize(tiny_model("llama"), {"weights": {"bits": 4, "group_size": 256}},
                           samples=token_samples(1))


# -- the Python API -----------------------------------------------------------------------------------------------


def test_api_without_a_recipe():
    with pytest.raises(RecipeError, match="recipe must be"):
        slimquant.quantize(tiny_model("llama"), None, samples=token_samples(1))


@pytest.mark.parametrize("sample,message", [
    (torch.zeros(1, 0, dtype=torch.long), "no tokens"),
    (torch.full((1, 8), VOCAB, dtype=torch.long), f"token id {VOCAB}"),
    (torch.full((1, 8), -1, dtype=torch.long), "token id -1"),
    (torch.zeros(1, 200, dtype=torch.long), "positions"),
])
def test_unusable_calibration_samples(sample, message):
    with pytest.raises(CalibrationError, match=message):
        slimquant.quantize(tiny_model("llama"), {"scheme": "W8A16"}, samples=[sample])


def test_msmodelslim_arguments():
    from slimquant.compat.msmodelslim import Calibrator, QuantConfig

    with pytest.raises(RecipeError, match="group_size"):
        QuantConfig(group_size=-5)
    with pytest.raises(RecipeError, match="L999"):
        Calibrator(tiny_model("llama"), QuantConfig(w_bit=8, a_bit=16), calib_data=token_samples(1),
                   disable_level="L999")


def test_calibrator_save_type_as_a_single_string(tmp_path):
    from slimquant.compat.msmodelslim import Calibrator, QuantConfig

    cal = Calibrator(tiny_model("llama"), QuantConfig(w_bit=8, a_bit=16, mm_tensor=False),
                     calib_data=token_samples(1), progress=False)
    cal.run()
    files = cal.save(tmp_path / "out", save_type="safe_tensor")
    assert any(f.suffix == ".safetensors" for f in files)
    with pytest.raises(OutputError, match="unknown save_type"):
        cal.save(tmp_path / "out2", save_type="safe_tensors")


# -- interruption -------------------------------------------------------------------------------------------------


def test_ctrl_c_says_nothing_was_written(tiny_model_dir, calib_text_file, tmp_path, monkeypatch):
    from slimquant import workflow

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(workflow, "load_model", interrupted)
    result = quick(tiny_model_dir, calib_text_file, "--output", tmp_path / "out")
    assert result.exit_code == 130
    assert "interrupted: nothing was written" in result.output
    assert not (tmp_path / "out").exists()


SAVER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from slimquant.cli import install_signal_handlers
    from slimquant.export.atomic import atomic_output_dir
    install_signal_handlers()
    with atomic_output_dir(Path(sys.argv[1])) as tmp:
        (tmp / "part.bin").write_bytes(b"x" * 1000)
        print("writing", flush=True)
        time.sleep(60)
""")


def _start_saver(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    return proc


def _leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_sigterm_during_save_removes_the_temporary_directory(tmp_path):
    out = tmp_path / "out"
    proc = _start_saver(out)
    assert _leftovers(out)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert _leftovers(out) == [] and not out.exists()


def test_what_sigkill_leaves_is_removed_by_the_next_run(tmp_path, caplog):
    from slimquant.export.atomic import atomic_output_dir

    out = tmp_path / "out"
    proc = _start_saver(out)
    proc.kill()
    proc.wait(timeout=30)
    assert sorted(n.split("-")[0] for n in _leftovers(out)) == [".out.lock", ".out.tmp"]  # the lock is free again
    with atomic_output_dir(out) as tmp:
        (tmp / "done.txt").write_text("ok")
    assert _leftovers(out) == []
    assert (out / "done.txt").exists()
    assert "left by an interrupted run" in caplog.text
