"""Atomic output directories, argument checks, and clear errors when a saved output is broken."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from export_helpers import base_model, float_llama, quantized, rewrite_weights, saved

from slimquant.errors import OutputError, PluginError
from slimquant.export import atomic_output_dir, save_quantized
from slimquant.loader import load_quantized


@pytest.fixture(scope="module")
def float_model():
    return base_model()


# -- atomic output ------------------------------------------------------------------------------------------


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_existing_output_is_refused_then_replaced_with_overwrite(float_model, tmp_path):
    model, report = quantized(float_model, "W8A8_DYNAMIC")
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        save_quantized(model, out)
    with pytest.raises(OutputError, match="not a slimquant output"):  # --overwrite replaces only slimquant outputs
        save_quantized(model, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    save_quantized(model, out)
    (out / "extra.txt").write_text("x")
    save_quantized(model, out, overwrite=True)
    assert not (out / "extra.txt").exists() and (out / "quant_model_weight_w8a8_dynamic.safetensors").is_file()
    assert _leftovers(tmp_path) == []


def test_failed_save_leaves_the_old_output_and_no_temporary_dir(float_model, tmp_path, monkeypatch):
    from slimquant.export import ascend

    model, _ = quantized(float_model, "W8A8_DYNAMIC")
    out = tmp_path / "o"
    save_quantized(model, out)
    (out / "keep.txt").write_text("mine")
    before = sorted(p.name for p in out.iterdir())

    def broken(layout, out_dir):
        (out_dir / "quant_weight.npz").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(ascend, "write_numpy", broken)
    with pytest.raises(PluginError, match="plugin 'numpy' failed in export: RuntimeError: disk full"):
        save_quantized(model, out, save_type=["safe_tensor", "numpy"], overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before
    assert _leftovers(tmp_path) == []


def test_atomic_dir_turns_os_errors_into_output_errors(tmp_path):
    with pytest.raises(OutputError, match="cannot write"):
        with atomic_output_dir(tmp_path / "o") as tmp:
            (tmp / "missing" / "x").write_text("x")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        with atomic_output_dir(tmp_path / "file"):
            pass


def test_bad_arguments_are_refused_before_writing(float_model, tmp_path):
    model, report = quantized(float_model, "W8A8_DYNAMIC")
    with pytest.raises(OutputError, match="save_type"):
        save_quantized(model, tmp_path / "a", save_type=["no-such-format"])
    with pytest.raises(OutputError, match="part_file_size"):
        save_quantized(model, tmp_path / "b", part_file_size=-1)
    wrong = {**report.linear_types(), "model.layers.0.mlp.up_proj": "W4A16"}
    with pytest.raises(OutputError, match="up_proj"):
        save_quantized(model, tmp_path / "c", linear_types=wrong)
    assert list(tmp_path.iterdir()) == []


# -- loading broken outputs ---------------------------------------------------------------------------------


@pytest.fixture()
def good_output(float_model, tmp_path):
    return saved(float_model, "W8A8", tmp_path)[1]


@pytest.mark.parametrize("verify", [True, False])
def test_truncated_weight_file_is_named(float_model, good_output, verify):
    path = good_output / "quant_model_weight_w8a8.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(OutputError, match="quant_model_weight_w8a8.safetensors"):
        load_quantized(copy.deepcopy(float_model), good_output, verify=verify)


def test_corrupt_bytes_fail_the_checksum(float_model, good_output):
    path = good_output / "quant_model_weight_w8a8.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(OutputError, match="corrupt"):
        load_quantized(copy.deepcopy(float_model), good_output)


def test_missing_tensor_is_named(float_model, good_output):
    rewrite_weights(good_output, lambda t: {k: v for k, v in t.items() if k != "model.norm.weight"})
    with pytest.raises(OutputError, match="model.norm.weight"):
        load_quantized(copy.deepcopy(float_model), good_output)
    desc_path = good_output / "quant_model_description_w8a8.json"
    desc = json.loads(desc_path.read_text())
    del desc["model.norm.weight"]
    desc_path.write_text(json.dumps(desc))
    with pytest.raises(OutputError, match="model.norm.weight is missing"):
        load_quantized(copy.deepcopy(float_model), good_output)


def test_description_naming_absent_tensors_is_refused(float_model, good_output):
    desc_path = good_output / "quant_model_description_w8a8.json"
    desc = json.loads(desc_path.read_text())
    desc["model.layers.9.mlp.up_proj.weight"] = "W8A8"
    desc_path.write_text(json.dumps(desc))
    with pytest.raises(OutputError, match=r"model\.layers\.9\.mlp\.up_proj\.weight"):
        load_quantized(copy.deepcopy(float_model), good_output)


def test_wrong_shapes_are_named(float_model, good_output):
    key = "model.layers.1.self_attn.k_proj.weight_scale"
    rewrite_weights(good_output, lambda t: {**t, key: torch.ones(24, 2)})
    with pytest.raises(OutputError, match=key):
        load_quantized(copy.deepcopy(float_model), good_output)


def test_other_architecture_and_broken_description_are_refused(float_model, good_output):
    with pytest.raises(OutputError, match="same architecture"):
        load_quantized(float_llama(intermediate_size=96), good_output)
    (good_output / "quant_model_description_w8a8.json").write_text("{not json")
    with pytest.raises(OutputError, match="quant_model_description_w8a8.json"):
        load_quantized(copy.deepcopy(float_model), good_output)


def test_missing_shard_is_named(float_model, tmp_path):
    _, out = saved(float_model, "W8A8", tmp_path, part_file_size=40e3 / 1024**3)
    victim = sorted(out.glob("quant_model_weight_w8a8-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(OutputError, match=victim.name):
        load_quantized(copy.deepcopy(float_model), out)
