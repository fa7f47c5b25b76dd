"""Lazy loading (model.lazy): a safetensors checkpoint quantized a decoder layer at a time, written as it goes.

The output must be byte for byte what quantizing the whole model in memory and saving it writes; only one decoder
layer may be real at a time; what the lazy path cannot do is refused before any work, and a failure leaves no output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import ARCHS, MOE_ARCHS, tiny_model, token_samples

import slimquant
from slimquant.config.recipe import ModelSpec
from slimquant.errors import ModelStructureError, NonFiniteError, OutputError, RecipeError
from slimquant.export import save_quantized
from slimquant.export.names import sha256_file
from slimquant.export.stream import DTYPE_NAMES, SafetensorsStream
from slimquant.lazy import quantize_checkpoint
from slimquant.model.lazy import LazyCheckpoint
from slimquant.model.loading import load_model

DENSE = [a for a in ARCHS if a not in MOE_ARCHS]
RECIPES = {
    "gptq": {"scheme": "W4A16", "weights": {"bits": 4, "group_size": 16, "symmetric": True}, "algorithms": ["gptq"]},
    "smoothquant": {"scheme": "W8A8", "algorithms": ["smoothquant", "minmax"]},
    "data-free": {"scheme": "W8A16"},
}


def saved_checkpoint(tmp_path: Path, arch: str = "llama", **save_kwargs) -> Path:
    path = tmp_path / f"src-{arch}"
    tiny_model(arch).save_pretrained(path, **save_kwargs)
    return path


def digests(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())}


def recipe_for(name: str, source: Path, lazy: bool) -> dict:
    return {**RECIPES[name], "model": {"path": str(source), "lazy": lazy}, "runtime": {"progress": False}}


def eager_output(source: Path, name: str, output: Path, samples, part_file_size: float = 0) -> dict[str, str]:
    model = load_model(ModelSpec(path=str(source)))
    report = slimquant.quantize(model, recipe_for(name, source, False), samples=samples)
    save_quantized(model, output, part_file_size=part_file_size, linear_types=report.linear_types())
    return digests(output)


def samples_for(name: str):
    return None if name == "data-free" else token_samples(4, 16)


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("arch", DENSE)
def test_lazy_output_is_byte_identical_to_quantizing_in_memory(tmp_path, arch, recipe):
    source = saved_checkpoint(tmp_path, arch)
    eager = eager_output(source, recipe, tmp_path / "eager", samples_for(recipe))
    quantize_checkpoint(recipe_for(recipe, source, True), tmp_path / "lazy", samples=samples_for(recipe))
    assert digests(tmp_path / "lazy") == eager


def test_sharded_checkpoint_in_sharded_output(tmp_path):
    source = saved_checkpoint(tmp_path, "llama", max_shard_size="100KB")
    assert (source / "model.safetensors.index.json").exists()
    part = 40_000 / 1024**3  # a few tensors per shard
    eager = eager_output(source, "gptq", tmp_path / "eager", token_samples(4, 16), part_file_size=part)
    quantize_checkpoint(recipe_for("gptq", source, True), tmp_path / "lazy", samples=token_samples(4, 16),
                        part_file_size=part)
    assert sum(name.endswith(".safetensors") for name in eager) > 3
    assert digests(tmp_path / "lazy") == eager


def test_only_one_decoder_layer_is_ever_real(tmp_path, monkeypatch):
    source = saved_checkpoint(tmp_path)
    load_layer = LazyCheckpoint.load_layer
    loaded = []

    def checked_load(self, index, device="cpu"):
        for i, layer in enumerate(self.layers):
            assert all(p.is_meta for p in layer.parameters()), f"layer {i} is still in memory when {index} loads"
        assert all(p.is_meta for p in self.model.lm_head.parameters())
        loaded.append(index)
        return load_layer(self, index, device)

    monkeypatch.setattr(LazyCheckpoint, "load_layer", checked_load)
    quantize_checkpoint(recipe_for("gptq", source, True), tmp_path / "out", samples=token_samples(4, 16))
    assert loaded == [0, 1]


def test_stream_writes_what_save_file_writes(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t.{9 - i}.{j}": (torch.randn(3 + j, 5, generator=g) * 50).to(dtype)
               for i, dtype in enumerate(DTYPE_NAMES) for j in range(2)}
    tensors.update(scalar=torch.tensor(2.5), empty=torch.zeros(0, 4, dtype=torch.int8))
    save_file(tensors, str(tmp_path / "reference.safetensors"), metadata={"format": "pt"})
    stream = SafetensorsStream(tmp_path, "stream", 0, {"format": "pt"})
    for key, tensor in tensors.items():
        stream.add(key, tensor)
    (path,) = stream.close()
    assert path.read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    assert [p.name for p in tmp_path.iterdir() if "spool" in p.name] == []


def test_lazy_loading_from_the_command_line(tiny_model_dir, calib_text_file, tmp_path):
    from test_cli import run

    result = run("quantize", "--model", tiny_model_dir, "--lazy", "--calib-file", calib_text_file,
                 "--num-samples", 2, "--seqlen", 16, "-a", "gptq", "--w-bits", 4, "--group-size", 16,
                 "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "slimquant eval" in result.output
    description = json.loads((tmp_path / "out" / "quant_model_description_w4a16.json").read_text())
    assert len(description["slimquant"]["linears"]) == 14
    assert (tmp_path / "out" / "tokenizer.json").exists()
    assert not list(tmp_path.glob("out.checkpoint*"))


@pytest.mark.parametrize("args,message", [
    ((), "give --output"),
    (("-o", "OUT", "--eval-text", "CALIB"), "slimquant eval"),
    (("-o", "OUT", "--kl-samples", 2), "slimquant eval"),
    (("-o", "OUT", "--format", "numpy"), "not numpy"),
])
def test_command_line_refuses_what_lazy_loading_cannot_do(tiny_model_dir, calib_text_file, tmp_path, args, message):
    from test_cli import run

    args = [tmp_path / "out" if a == "OUT" else calib_text_file if a == "CALIB" else a for a in args]
    result = run("quantize", "--model", tiny_model_dir, "--lazy", "--calib-file", calib_text_file, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change,message", [
    ({"budget": {"avg_bits": 6, "candidates": [{"bits": 4, "group_size": 16}, {"bits": 8}]}}, "budget"),
    ({"kv_cache": {"bits": 8}}, "kv_cache"),
    ({"calibration": {"source": "generate"}}, "generate"),
    ({"model": {"lazy": True}}, "model.path must be a folder"),
])
def test_recipes_the_lazy_path_cannot_run_are_refused_before_reading(tmp_path, change, message):
    source = saved_checkpoint(tmp_path)
    recipe = recipe_for("gptq", source, True)
    if "budget" in change:  # the budget chooses the weights
        del recipe["weights"]
    for key, value in change.items():
        recipe[key] = {**recipe.get(key, {}), **value} if key == "runtime" else value
    with pytest.raises(RecipeError, match=message):
        quantize_checkpoint(recipe, tmp_path / "out", samples=token_samples(4, 16))
    assert not (tmp_path / "out").exists()


def test_needing_data_without_samples_is_refused(tmp_path):
    source = saved_checkpoint(tmp_path)
    with pytest.raises(RecipeError, match="needs calibration data"):
        quantize_checkpoint(recipe_for("gptq", source, True), tmp_path / "out")
    assert list(tmp_path.iterdir()) == [source]


def test_a_nan_weight_is_named_and_nothing_is_written(tmp_path):
    source = saved_checkpoint(tmp_path)
    tensors = load_file(str(source / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        quantize_checkpoint(recipe_for("gptq", source, True), tmp_path / "out", samples=token_samples(4, 16))
    assert list(tmp_path.iterdir()) == [source]


def test_an_existing_output_is_refused_before_any_work(tmp_path):
    source = saved_checkpoint(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text("{}")
    with pytest.raises(OutputError, match="not empty"):
        quantize_checkpoint(recipe_for("gptq", source, True), tmp_path / "out", samples=token_samples(4, 16))
    assert (tmp_path / "out" / "results.json").read_text() == "{}"


def test_a_checkpoint_with_other_tensor_names_is_refused(tmp_path):
    source = saved_checkpoint(tmp_path, MOE_ARCHS[0])  # transformers fuses the experts it stores one by one
    with pytest.raises(ModelStructureError, match="has no tensor named .* without lazy loading"):
        quantize_checkpoint(recipe_for("gptq", source, True), tmp_path / "out", samples=token_samples(4, 16))


def test_a_tensor_of_another_shape_is_named(tmp_path):
    source = saved_checkpoint(tmp_path)
    tensors = load_file(str(source / "model.safetensors"))
    tensors["model.layers.0.mlp.down_proj.weight"] = tensors["model.layers.0.mlp.down_proj.weight"][:, :64].contiguous()
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelStructureError, match=r"model\.layers\.0\.mlp\.down_proj\.weight has shape \[64, 64\]"):
        quantize_checkpoint(recipe_for("gptq", source, True), tmp_path / "out", samples=token_samples(4, 16))


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_or_absent_checkpoint_file_is_named(tmp_path, damage):
    source = saved_checkpoint(tmp_path)
    weights = source / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:5000])
        match = "cannot read the safetensors file"
    else:
        weights.unlink()
        match = "holds no .*safetensors"
    with pytest.raises(ModelStructureError, match=match):
        quantize_checkpoint(recipe_for("gptq", source, True), tmp_path / "out", samples=token_samples(4, 16))
    assert not (tmp_path / "out").exists()


class Crash(Exception):
    pass


def crash_after_first_layer(monkeypatch) -> None:
    from slimquant.runtime.checkpoint import Checkpoint

    save_layer = Checkpoint.save_layer

    def save_then_crash(self, index, *args, **kwargs):
        save_layer(self, index, *args, **kwargs)
        if index == 0:
            raise Crash("killed after layer 0")

    monkeypatch.setattr(Checkpoint, "save_layer", save_then_crash)


@pytest.mark.parametrize("recipe", ["gptq", "data-free"])
def test_a_killed_lazy_run_resumes_to_the_same_bytes(tmp_path, monkeypatch, recipe):
    source = saved_checkpoint(tmp_path)
    eager = eager_output(source, recipe, tmp_path / "eager", samples_for(recipe))
    lazy = recipe_for(recipe, source, True)
    lazy["runtime"].update(checkpoint_dir=str(tmp_path / "ckpt"))
    crash_after_first_layer(monkeypatch)
    with pytest.raises(Crash):
        quantize_checkpoint(lazy, tmp_path / "lazy", samples=samples_for(recipe))
    assert not (tmp_path / "lazy").exists() and (tmp_path / "ckpt" / "manifest.json").exists()
    monkeypatch.undo()
    lazy["runtime"].update(resume=True)
    report = quantize_checkpoint(lazy, tmp_path / "lazy", samples=samples_for(recipe))
    assert report.resumed_layers == 1
    assert digests(tmp_path / "lazy") == eager
    assert not (tmp_path / "ckpt").exists()  # removed once the output is saved


def test_resuming_against_a_changed_checkpoint_is_refused(tmp_path, monkeypatch):
    from slimquant.errors import CheckpointError

    source = saved_checkpoint(tmp_path)
    lazy = recipe_for("gptq", source, True)
    lazy["runtime"].update(checkpoint_dir=str(tmp_path / "ckpt"))
    crash_after_first_layer(monkeypatch)
    with pytest.raises(Crash):
        quantize_checkpoint(lazy, tmp_path / "lazy", samples=token_samples(4, 16))
    monkeypatch.undo()
    tensors = load_file(str(source / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] += 1
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    lazy["runtime"].update(resume=True)
    with pytest.raises(CheckpointError, match="the model differs"):
        quantize_checkpoint(lazy, tmp_path / "lazy", samples=token_samples(4, 16))
