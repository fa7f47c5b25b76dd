"""Resume after a crash: a run killed after (or while writing) layer k's checkpoint, then resumed, saves the same bytes
as an uninterrupted run; a checkpoint of another run, or a damaged one, is refused with the reason."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from tiny_models import CONFIGS, token_samples

import slimquant
from slimquant.errors import CheckpointError
from slimquant.export import save_quantized
from slimquant.export.names import sha256_file
from slimquant.runtime import checkpoint as checkpoint_module
from slimquant.runtime.checkpoint import Checkpoint, remove_checkpoint

LAYERS = 4
GPTQ = {"scheme": "W4A16", "weights": {"bits": 4, "group_size": 16, "symmetric": True}, "algorithms": ["gptq"]}
SMOOTHQUANT = {"scheme": "W8A8", "algorithms": ["smoothquant", "minmax"]}
RTN = {"scheme": "W8A16"}


class Crash(Exception):
    pass


def four_layer_llama() -> torch.nn.Module:
    config = CONFIGS["llama"]()
    config.num_hidden_layers = LAYERS
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def recipe_with(recipe: dict, checkpoint_dir, resume: bool = False) -> dict:
    runtime = {"progress": False, "checkpoint_dir": str(checkpoint_dir), "resume": resume}
    return {**recipe, "runtime": runtime}


def quantize_and_save(recipe: dict, output, samples=None) -> dict[str, str]:
    model = four_layer_llama()
    report = slimquant.quantize(model, recipe, samples=token_samples(4, 16) if samples is None else samples)
    save_quantized(model, output, linear_types=report.linear_types())
    if report.checkpoint is not None:
        remove_checkpoint(report.checkpoint)
    return {p.name: sha256_file(p) for p in sorted(output.iterdir())}


def crash_after_layer(monkeypatch, k: int) -> None:
    save_layer = Checkpoint.save_layer

    def save_then_crash(self, index, *args, **kwargs):
        save_layer(self, index, *args, **kwargs)
        if index == k:
            raise Crash(f"killed after layer {k}")

    monkeypatch.setattr(Checkpoint, "save_layer", save_then_crash)


def crash_while_writing_layer(monkeypatch, k: int) -> None:
    """The process dies half-way through writing layer k's hidden states: a partial temporary file is left behind."""
    write = checkpoint_module._write_tensors

    def write_half(path, tensors):
        if path.name == f"hidden.{k:05d}.safetensors":
            partial = path.with_name(f"{path.name}{checkpoint_module.TMP_MARK}999")
            partial.write_bytes(b"\x00" * 100)
            raise Crash(f"killed while writing {path.name}")
        return write(path, tensors)

    monkeypatch.setattr(checkpoint_module, "_write_tensors", write_half)


@pytest.fixture(scope="module")
def plugins_installed():
    pytest.importorskip("slimquant_gptq")
    pytest.importorskip("slimquant_smoothquant")


@pytest.mark.parametrize("recipe", [GPTQ, SMOOTHQUANT, RTN], ids=["gptq", "smoothquant-minmax-w8a8", "rtn"])
@pytest.mark.parametrize("crash", [crash_after_layer, crash_while_writing_layer], ids=["after", "while-writing"])
def test_resumed_run_saves_the_same_bytes(tmp_path, monkeypatch, plugins_installed, recipe, crash):
    uninterrupted = quantize_and_save(recipe_with(recipe, tmp_path / "ckpt-a"), tmp_path / "a")
    assert not (tmp_path / "ckpt-a").exists()  # removed once saved

    checkpoint_dir = tmp_path / "ckpt-b"
    with monkeypatch.context() as patch:
        crash(patch, 1)
        with pytest.raises(Crash):
            quantize_and_save(recipe_with(recipe, checkpoint_dir), tmp_path / "b")
    manifest = json.loads((checkpoint_dir / "manifest.json").read_text())
    finished = 2 if crash is crash_after_layer else 1
    assert len(manifest["layers"]) == finished

    model = four_layer_llama()
    report = slimquant.quantize(model, recipe_with(recipe, checkpoint_dir, resume=True), samples=token_samples(4, 16))
    assert report.resumed_layers == finished and len(report.layers) == LAYERS
    assert not list(checkpoint_dir.glob("*.tmp-*"))
    save_quantized(model, tmp_path / "b", linear_types=report.linear_types())
    resumed = {p.name: sha256_file(p) for p in sorted((tmp_path / "b").iterdir())}
    assert resumed == uninterrupted


def test_data_free_run_resumes(tmp_path, monkeypatch):
    model = four_layer_llama()
    slimquant.quantize(model, {"scheme": "W8A16", "runtime": {"progress": False}})
    save_quantized(model, tmp_path / "a")
    uninterrupted = {p.name: sha256_file(p) for p in sorted((tmp_path / "a").iterdir())}
    recipe = {"scheme": "W8A16", "runtime": {"progress": False, "checkpoint_dir": str(tmp_path / "ckpt")}}
    with monkeypatch.context() as patch:
        crash_after_layer(patch, 2)
        with pytest.raises(Crash):
            slimquant.quantize(four_layer_llama(), recipe)
    model = four_layer_llama()
    report = slimquant.quantize(model, {**recipe, "runtime": {**recipe["runtime"], "resume": True}})
    assert report.resumed_layers == 3 and report.data_free
    save_quantized(model, tmp_path / "b")
    assert {p.name: sha256_file(p) for p in sorted((tmp_path / "b").iterdir())} == uninterrupted


@pytest.fixture
def crashed_checkpoint(tmp_path, monkeypatch):
    """A checkpoint of an RTN W8A16 run on token_samples(4, 16), killed after layer 1."""
    checkpoint_dir = tmp_path / "ckpt"
    with monkeypatch.context() as patch:
        crash_after_layer(patch, 1)
        with pytest.raises(Crash):
            slimquant.quantize(four_layer_llama(), recipe_with(RTN, checkpoint_dir), samples=token_samples(4, 16))
    return checkpoint_dir


def test_another_recipe_is_refused(crashed_checkpoint):
    other = {**RTN, "weights": {"bits": 8, "group_size": 32, "symmetric": True}}
    with pytest.raises(CheckpointError, match="the recipe differs"):
        slimquant.quantize(four_layer_llama(), recipe_with(other, crashed_checkpoint, resume=True),
                           samples=token_samples(4, 16))


def test_other_samples_are_refused(crashed_checkpoint):
    with pytest.raises(CheckpointError, match="the samples differ") as raised:
        slimquant.quantize(four_layer_llama(), recipe_with(RTN, crashed_checkpoint, resume=True),
                           samples=token_samples(4, 16, seed=1))
    assert "recipe differs" not in str(raised.value) and "model differs" not in str(raised.value)


def test_another_model_is_refused(crashed_checkpoint):
    model = four_layer_llama()
    with torch.no_grad():
        model.model.layers[3].mlp.down_proj.weight[0, 0] += 1
    with pytest.raises(CheckpointError, match="the model differs"):
        slimquant.quantize(model, recipe_with(RTN, crashed_checkpoint, resume=True), samples=token_samples(4, 16))


def test_a_machine_whose_calibration_precision_differs_is_refused(crashed_checkpoint, monkeypatch):
    from slimquant.runtime import precision

    native = precision.native_bfloat16
    monkeypatch.setattr(precision, "native_bfloat16", lambda device: not native(device))  # `auto` resolves otherwise
    with pytest.raises(CheckpointError, match="the calibration passes computed in"):
        slimquant.quantize(four_layer_llama(), recipe_with(RTN, crashed_checkpoint, resume=True),
                           samples=token_samples(4, 16))


def test_a_checkpoint_is_not_overwritten_without_resume(crashed_checkpoint):
    with pytest.raises(CheckpointError, match="holds a checkpoint of an earlier run"):
        slimquant.quantize(four_layer_llama(), recipe_with(RTN, crashed_checkpoint), samples=token_samples(4, 16))


@pytest.mark.parametrize("damaged", ["layer.00001.safetensors", "hidden.00001.safetensors"])
def test_a_truncated_checkpoint_file_is_refused(crashed_checkpoint, damaged):
    path = crashed_checkpoint / damaged
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=f"{damaged} is corrupt or truncated"):
        slimquant.quantize(four_layer_llama(), recipe_with(RTN, crashed_checkpoint, resume=True),
                           samples=token_samples(4, 16))


def test_a_corrupt_manifest_is_refused(crashed_checkpoint):
    (crashed_checkpoint / "manifest.json").write_text('{"format": 1, "layers": [')
    with pytest.raises(CheckpointError, match="manifest.json cannot be read"):
        slimquant.quantize(four_layer_llama(), recipe_with(RTN, crashed_checkpoint, resume=True),
                           samples=token_samples(4, 16))


def test_resume_without_a_checkpoint_starts_from_the_first_layer(tmp_path):
    report = slimquant.quantize(four_layer_llama(), recipe_with(RTN, tmp_path / "none", resume=True),
                                samples=token_samples(4, 16))
    assert report.resumed_layers == 0 and len(report.layers) == LAYERS


def test_cli_resume(tiny_model_dir, calib_text_file, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from slimquant.cli import app

    def quantize(output, *extra):
        args = ["quantize", "--model", tiny_model_dir, "--calib-file", calib_text_file, "--num-samples", 2,
                "--seqlen", 16, "--kl-samples", 0, "--scheme", "W8A8", "-o", output, *extra]
        return CliRunner().invoke(app, [str(a) for a in args])

    assert quantize(tmp_path / "a").exit_code == 0
    assert not (tmp_path / "a.checkpoint").exists()
    with monkeypatch.context() as patch:
        crash_after_layer(patch, 0)
        crashed = quantize(tmp_path / "b")
    assert crashed.exit_code == 1 and (tmp_path / "b.checkpoint" / "manifest.json").exists()
    refused = quantize(tmp_path / "b")
    assert refused.exit_code == 2 and "holds a checkpoint" in refused.output
    resumed = quantize(tmp_path / "b", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert not (tmp_path / "b.checkpoint").exists()
    hashes = {d: {p.name: sha256_file(p) for p in sorted((tmp_path / d).iterdir())} for d in ("a", "b")}
    assert hashes["a"] == hashes["b"]
