"""slimquant deletes only what it created (issue 31): checkpoint directories carry a marker and are refused when
they are someone else's, --overwrite replaces only a slimquant output that is not an input of the run, manifest
names stay inside the checkpoint, the output's place (lock, temporary directory) is taken before any work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

import slimquant
from slimquant.cli import app
from slimquant.errors import CheckpointError, OutputError
from slimquant.export import atomic
from slimquant.export.atomic import OUTPUT_MARKER, OutputReservation
from slimquant.export.names import sha256_file
from slimquant.runtime.checkpoint import MARKER, Checkpoint, remove_checkpoint

REPO = Path(__file__).resolve().parents[1]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def data_free(model_dir, *extra):
    """The quickest run: W8A16 round-to-nearest, no calibration, no KL."""
    return run("quantize", "--model", model_dir, "--scheme", "W8A16", "--kl-samples", 0, *extra)


def one_line_error(result, *words) -> str:
    assert result.exit_code == 2, result.output
    message = result.output.strip().splitlines()[-1]  # after the plan, when the refusal comes after printing it
    assert message.startswith("error:") and result.output.count("error:") == 1, result.output
    for word in words:
        assert str(word) in message, message
    return message


def listing(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): sha256_file(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def precious_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("precious")
    (path / "sub").mkdir()
    (path / "sub" / "data.bin").write_bytes(b"\x01\x02")
    return path


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


@pytest.fixture()
def never_load(monkeypatch):
    """Fail the test if the model is loaded: what is checked up front must be refused before that."""
    from slimquant import workflow

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(workflow, "load_model", loaded)


@pytest.fixture(scope="module")
def saved_output(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("saved") / "out"
    result = data_free(tiny_model_dir, "-o", out)
    assert result.exit_code == 0, result.output
    return out


def a_copy_of(output: Path, where: Path) -> Path:
    shutil.copytree(output, where)
    return where


# -- 1. checkpoint directories --------------------------------------------------------------------------------


def test_an_unrelated_checkpoint_dir_is_refused_and_kept(tiny_model_dir, tmp_path, never_load):
    project = precious_folder(tmp_path / "project")
    before = listing(project)
    result = data_free(tiny_model_dir, "-o", tmp_path / "out", "--checkpoint-dir", project)
    one_line_error(result, project, "not a slimquant checkpoint")
    assert listing(project) == before and not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]


def test_an_unrelated_default_checkpoint_beside_the_output_is_refused(tiny_model_dir, tmp_path, never_load):
    taken = precious_folder(tmp_path / "out.checkpoint")
    before = listing(taken)
    result = data_free(tiny_model_dir, "-o", tmp_path / "out")
    one_line_error(result, "out.checkpoint", "not a slimquant checkpoint")
    assert listing(taken) == before


def test_the_current_directory_as_checkpoint_is_refused(tiny_model_dir, tmp_path, monkeypatch, never_load):
    here = precious_folder(tmp_path / "here")
    monkeypatch.chdir(here)
    before = listing(here)
    one_line_error(data_free(tiny_model_dir, "-o", tmp_path / "out", "--checkpoint-dir", "."), "checkpoint")
    assert listing(here) == before


def test_the_model_folder_as_checkpoint_is_refused(tiny_model_dir, tmp_path, never_load):
    before = listing(tiny_model_dir)
    result = data_free(tiny_model_dir, "-o", tmp_path / "out", "--checkpoint-dir", tiny_model_dir)
    one_line_error(result, tiny_model_dir)
    result = data_free(tiny_model_dir, "-o", tmp_path / "out", "--checkpoint-dir", tiny_model_dir.parent)
    one_line_error(result, "holds the run's input")
    assert listing(tiny_model_dir) == before


@pytest.mark.parametrize("inside", [".", "ckpt"])
def test_a_checkpoint_in_the_output_is_refused(tiny_model_dir, tmp_path, never_load, inside):
    out = tmp_path / "out"
    result = data_free(tiny_model_dir, "-o", out, "--checkpoint-dir", out / inside)
    one_line_error(result, "the output directory")
    assert list(tmp_path.iterdir()) == []


def test_an_uncreatable_checkpoint_dir_is_refused_before_loading(tiny_model_dir, tmp_path, never_load):
    result = data_free(tiny_model_dir, "-o", tmp_path / "out", "--checkpoint-dir", "/proc/no/such/ckpt")
    one_line_error(result, "/proc/no/such/ckpt")
    assert list(tmp_path.iterdir()) == []  # the output's reservation was given back


def test_a_run_refused_before_its_first_layer_leaves_no_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    from slimquant.errors import NonFiniteError
    from slimquant.runtime.engine import LayerEngine

    def refuse(*args, **kwargs):  # after the checkpoint was opened, before its first layer
        raise NonFiniteError("an activation holds Inf")

    monkeypatch.setattr(LayerEngine, "quantize_linear", refuse)
    result = data_free(tiny_model_dir, "-o", tmp_path / "new" / "out")
    one_line_error(result, "Inf")
    assert list(tmp_path.iterdir()) == []  # no out.checkpoint, no lock, no temporary dir, no parent folder
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(data_free(tiny_model_dir, "--checkpoint-dir", empty, "-o", tmp_path / "o2"), "Inf")
    assert empty.is_dir() and list(empty.iterdir()) == []  # an empty folder we did not create stays, emptied


def four_layer_llama() -> torch.nn.Module:
    from tiny_models import CONFIGS

    config = CONFIGS["llama"]()
    config.num_hidden_layers = 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def checkpointed(directory: Path, resume: bool = False, keep: bool = True) -> slimquant.QuantizationReport:
    recipe = {"scheme": "W8A16", "runtime": {"progress": False, "checkpoint_dir": str(directory), "resume": resume,
                                             "keep_checkpoint": keep}}
    return slimquant.quantize(four_layer_llama(), recipe)


def test_remove_checkpoint_deletes_only_its_own_files(tmp_path):
    created = tmp_path / "created"
    report = checkpointed(created, keep=False)
    assert report.checkpoint == created and (created / MARKER).is_file()
    remove_checkpoint(created)
    assert not created.exists()  # slimquant made it and emptied it

    existing = tmp_path / "existing"
    existing.mkdir()
    checkpointed(existing)
    (existing / "notes.txt").write_text("added by the user meanwhile")
    remove_checkpoint(existing)
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]

    checkpointed(created)
    (created / "notes.txt").write_text("mine")
    remove_checkpoint(created)
    assert sorted(p.name for p in created.iterdir()) == ["notes.txt"]  # created by slimquant, but not empty

    foreign = precious_folder(tmp_path / "foreign")
    (foreign / "manifest.json").write_text("{}")
    before = listing(foreign)
    remove_checkpoint(foreign)
    assert listing(foreign) == before


# -- 2. --overwrite -------------------------------------------------------------------------------------------


def test_overwrite_of_a_folder_that_is_not_a_slimquant_output_is_refused(tiny_model_dir, tmp_path, never_load):
    other = precious_folder(tmp_path / "other")
    before = listing(other)
    one_line_error(data_free(tiny_model_dir, "-o", other, "--overwrite"), other, "not a slimquant output")
    assert listing(other) == before


def test_overwrite_of_the_model_folder_or_the_current_directory_is_refused(tiny_model_dir, tmp_path, monkeypatch,
                                                                         never_load):
    before = listing(tiny_model_dir)
    one_line_error(data_free(tiny_model_dir, "-o", tiny_model_dir, "--overwrite"), tiny_model_dir)
    assert listing(tiny_model_dir) == before
    here = a_copy_of(tiny_model_dir, tmp_path / "here")
    (here / OUTPUT_MARKER).write_text("{}")  # even when it looks like an output
    monkeypatch.chdir(here)
    one_line_error(data_free(tiny_model_dir, "-o", ".", "--overwrite"), "current directory")
    one_line_error(data_free(".", "-o", tmp_path, "--overwrite"), "holds")
    assert (here / "config.json").is_file()


def test_overwrite_of_an_output_holding_an_input_is_refused(tiny_model_dir, saved_output, tmp_path, never_load):
    holder = a_copy_of(saved_output, tmp_path / "holder")
    calib = holder / "calib.txt"
    calib.write_text("the a of and to in is was for on that with " * 20)
    result = run("quantize", "--model", tiny_model_dir, "--calib-file", calib, "--num-samples", 2, "--seqlen", 16,
                 "--kl-samples", 0, "-o", holder, "--overwrite")
    one_line_error(result, "holds the run's input")
    assert calib.is_file()


def test_export_onto_its_own_input_is_refused(tiny_model_dir, saved_output, tmp_path):
    out = a_copy_of(saved_output, tmp_path / "out")
    before = listing(out)
    result = run("export", out, "--to", "safe_tensor", "-o", out, "--overwrite", "--model", tiny_model_dir)
    one_line_error(result, out, "is the run's input")
    assert listing(out) == before


def test_overwrite_replaces_a_slimquant_output_old_or_new_and_an_empty_dir_is_taken(tiny_model_dir, saved_output,
                                                                                   tmp_path):
    out = a_copy_of(saved_output, tmp_path / "out")
    (out / "stale.txt").write_text("x")
    assert data_free(tiny_model_dir, "-o", out, "--overwrite").exit_code == 0
    assert listing(out) == listing(saved_output)
    (out / OUTPUT_MARKER).unlink()  # an output written before the marker existed: known by its description
    assert data_free(tiny_model_dir, "-o", out, "--overwrite").exit_code == 0
    assert (out / OUTPUT_MARKER).is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert data_free(tiny_model_dir, "-o", empty).exit_code == 0
    assert leftovers(tmp_path, "out") == leftovers(tmp_path, "empty") == []


# -- 3. manifest names and structure --------------------------------------------------------------------------


class Crash(Exception):
    pass


@pytest.fixture()
def crashed(tmp_path, monkeypatch) -> Path:
    """A checkpoint of 2 finished layers, beside a victim file holding layer 0's bytes."""
    directory = tmp_path / "ckpt"
    save_layer = Checkpoint.save_layer

    def save_then_crash(self, index, *args, **kwargs):
        save_layer(self, index, *args, **kwargs)
        if index == 1:
            raise Crash

    with monkeypatch.context() as patch:
        patch.setattr(Checkpoint, "save_layer", save_then_crash)
        with pytest.raises(Crash):
            checkpointed(directory)
    shutil.copy(directory / "layer.00000.safetensors", tmp_path / "victim.safetensors")
    return directory


def edit_manifest(directory: Path, edit) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    edit(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["../victim.safetensors", "{victim}", "sub/layer.00000.safetensors",
                                  "layer.00001.safetensors"])
def test_a_manifest_naming_another_file_is_refused_before_it_is_read(crashed, name):
    victim = crashed.parent / "victim.safetensors"
    name = name.format(victim=victim)

    def point_away(manifest):
        manifest["layers"][0]["file"] = name

    edit_manifest(crashed, point_away)
    with pytest.raises(CheckpointError, match="names file") as refused:
        checkpointed(crashed, resume=True)
    assert "\n" not in str(refused.value)
    assert victim.is_file() and (crashed / "layer.00000.safetensors").is_file()


@pytest.mark.parametrize("edit", [
    lambda m: m["layers"][0].pop("sha256"),
    lambda m: m["layers"].__setitem__(0, 1),
    lambda m: m.__setitem__("hidden", {"file": 3}),
    lambda m: m.__setitem__("hidden", {"file": "../hidden.00001.safetensors", "sha256": "0", "batches": 1}),
    lambda m: m.pop("fingerprint"),
    lambda m: m.__setitem__("num_layers", "4"),
    lambda m: m["layers"][1].__setitem__("state", []),
], ids=["no-sha256", "entry-not-object", "hidden-wrong-type", "hidden-outside", "no-fingerprint", "num-layers-text",
        "state-not-object"])
def test_a_malformed_manifest_is_one_checkpoint_error(crashed, edit):
    edit_manifest(crashed, edit)
    with pytest.raises(CheckpointError, match="malformed") as refused:
        checkpointed(crashed, resume=True)
    assert "\n" not in str(refused.value)


def test_a_traversal_manifest_is_refused_by_the_cli_before_loading(tiny_model_dir, crashed, tmp_path, never_load):
    edit_manifest(crashed, lambda m: m["layers"][0].__setitem__("file", "../victim.safetensors"))
    result = data_free(tiny_model_dir, "-o", tmp_path / "out", "--checkpoint-dir", crashed, "--resume")
    one_line_error(result, "../victim.safetensors")
    assert (tmp_path / "victim.safetensors").is_file()


# -- 4. the output's place, taken up front ---------------------------------------------------------------------


def test_an_output_that_cannot_be_created_fails_before_loading(tiny_model_dir, never_load):
    one_line_error(data_free(tiny_model_dir, "-o", "/proc/no/such/out"), "/proc/no/such/out")


def test_parent_folders_made_for_a_failed_run_are_removed(tiny_model_dir, tmp_path, monkeypatch):
    from slimquant import workflow

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(workflow, "load_model", boom)
    result = data_free(tiny_model_dir, "-o", tmp_path / "new" / "deeper" / "out")
    assert result.exit_code == 1, result.output
    assert list(tmp_path.iterdir()) == []


def test_a_second_run_on_one_output_is_refused_and_leaves_the_first_runs_checkpoint(tiny_model_dir, tmp_path,
                                                                                    never_load):
    out = tmp_path / "out"
    first = OutputReservation(out).open()  # another run, holding the lock and its checkpoint
    checkpoint = tmp_path / "out.checkpoint"
    checkpoint.mkdir()
    (checkpoint / MARKER).write_text('{"format": 1, "created_by_slimquant": true}')
    before = listing(checkpoint)
    try:
        one_line_error(data_free(tiny_model_dir, "-o", out), "another slimquant run", f"process {os.getpid()}")
        assert listing(checkpoint) == before and first.tmp.is_dir()
    finally:
        first.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.checkpoint"]  # lock and temporary dir removed


def test_an_interrupt_while_the_temporary_dir_is_made_leaves_nothing(tmp_path, monkeypatch):
    real_mkdir = Path.mkdir

    def mkdir_then_sigterm(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)
        if atomic.TMP_MARK in self.name:
            raise KeyboardInterrupt

    monkeypatch.setattr(Path, "mkdir", mkdir_then_sigterm)
    with pytest.raises(KeyboardInterrupt):
        OutputReservation(tmp_path / "new" / "out").open()
    assert list(tmp_path.iterdir()) == []


# -- 5. --plot and --layer-report ------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["/proc/no/plots", "a-file"])
def test_an_unwritable_plot_folder_is_refused_before_work(tiny_model_dir, tmp_path, never_load, where):
    (tmp_path / "a-file").write_text("x")
    plot = Path(where) if where.startswith("/") else tmp_path / where
    one_line_error(data_free(tiny_model_dir, "-o", tmp_path / "out", "--plot", plot), "--plot")
    assert not (tmp_path / "out").exists()


def test_a_layer_report_on_a_full_disk_leaves_no_file(tmp_path, monkeypatch):
    from slimquant.eval.layer_errors import save_errors

    real_write = Path.write_text

    def half_then_full(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full)
    with pytest.raises(OutputError, match="report.json"):
        save_errors({"model.layers.0.mlp.up_proj": 0.1}, tmp_path / "report.json")
    assert list(tmp_path.iterdir()) == []


# -- 6. what an interruption says ------------------------------------------------------------------------------


def test_an_interrupt_after_the_output_was_written_says_so(tiny_model_dir, tmp_path, monkeypatch):
    from slimquant import workflow

    def interrupt(directory):
        raise KeyboardInterrupt

    monkeypatch.setattr(workflow, "remove_checkpoint", interrupt)
    out = tmp_path / "out"
    result = data_free(tiny_model_dir, "-o", out)
    assert result.exit_code == 130, result.output
    assert "nothing was written" not in result.output
    assert f"after the output {out} was written" in " ".join(result.output.split())
    assert "out.checkpoint" in result.output and (out / OUTPUT_MARKER).is_file()


# -- the chaos script -------------------------------------------------------------------------------------------


def test_the_chaos_script_passes():
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(REPO / "scripts" / "chaos.sh")], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("\nok ") + result.stdout.startswith("ok ") >= 6, result.stdout
    assert "FAIL" not in result.stdout, result.stdout
